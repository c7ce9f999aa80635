"""The operator's few Kubernetes API calls, and applying a Plan with them.

The calls are `apiserver.request` (plain REST, JSON dicts in and out: the plan speaks dicts);
the run's status goes through `apiserver.patch_run_status`, the writer the trainer uses too.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config

from .api import API_VERSION, KIND
from .api.status import timestamp
from .apiserver import JSON, MERGE_PATCH, ApiError, collection_path, patch_run_status, request, run_path
from .backend import Backend
from .backends.choice import backend_record, chosen_kind, not_served
from .plan import Event, Plan, plan, refused

log = logging.getLogger("llavarun.operator")

_PLURALS = {"ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings"}
REPORTING_COMPONENT = "llavarun-operator"


class ChildRejected(Exception):
    """The apiserver refused to create a child as such (schema, admission webhook)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


class Kube:
    """A handful of REST calls; thread-safe like the underlying urllib3 pool."""

    def __init__(self, api: client.ApiClient, backend: Backend, others: Iterable[Backend] = ()) -> None:
        self.api = api
        self.backend = backend
        """Whose children `create`/`patch_child`/`delete_child` address: the operator's default
        backend, or a run's (`using`); `backends` are all it serves, by kind."""
        self.backends = {b.kind: b for b in (backend, *others)}
        self.instance = os.environ.get("HOSTNAME") or socket.gethostname()

    @classmethod
    def from_environment(cls, backend: Backend, others: Iterable[Backend] = ()) -> Kube:
        """In-cluster ServiceAccount, or KUBECONFIG / ~/.kube/config when run as a local process."""
        config.load_config()
        return cls(client.ApiClient(), backend, others)

    def using(self, backend: Backend) -> Kube:
        """The same connection, with `backend`'s children."""
        other = copy.copy(self)
        other.backend = backend
        return other

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = JSON,
    ) -> Any:
        return request(self.api, method, path, body, query, content_type)

    # --- the run ---------------------------------------------------------------------------------

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", run_path(namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def patch_run_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        patch_run_status(self.api, namespace, name, patch)

    # --- children --------------------------------------------------------------------------------

    def child_path(self, namespace: str, name: str = "") -> str:
        b = self.backend
        path = collection_path(f"{b.group}/{b.version}", b.plural, namespace)
        return f"{path}/{name}" if name else path

    def create(self, obj: Mapping[str, Any]) -> bool:
        """Create; False when it already exists (a previous reconcile, or a restart, made it).
        ChildRejected when the apiserver refuses a child of the backend's kind as such."""
        kind = obj["kind"]
        namespace = obj["metadata"]["namespace"]
        if kind == self.backend.kind:
            path = self.child_path(namespace)
        else:
            path = collection_path(obj["apiVersion"], _PLURALS[kind], namespace)
        try:
            self.request("POST", path, obj)
        except ApiError as err:
            if err.status == 409:
                return False
            if err.rejected and kind == self.backend.kind:
                raise ChildRejected(obj["metadata"]["name"], str(err.message)) from err
            raise
        return True

    def patch_child(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        try:
            self.request("PATCH", self.child_path(namespace, name), patch, content_type=MERGE_PATCH)
        except ApiError as err:
            if err.status != 404:
                raise

    def delete_child(self, namespace: str, name: str) -> None:
        try:
            self.request("DELETE", self.child_path(namespace, name), {"propagationPolicy": "Background"})
        except ApiError as err:
            if err.status != 404:
                raise

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Pods of a child, for failure messages; none when we may not list them."""
        try:
            found = self.request(
                "GET", f"/api/v1/namespaces/{namespace}/pods", query={"labelSelector": selector}
            )
        except ApiError as err:
            log.warning("cannot list pods for a failure message: %s", err)
            return []
        return list((found or {}).get("items") or [])

    # --- events ----------------------------------------------------------------------------------

    def post_event(self, run: Mapping[str, Any], event: Event) -> None:
        """A core/v1 Event on the run (what `kubectl describe llavarun` shows); best effort."""
        meta = run["metadata"]
        now = timestamp()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": event.reason,
            "message": event.message[:1024],
            "type": event.type,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": REPORTING_COMPONENT},
            "reportingComponent": REPORTING_COMPONENT,
            "reportingInstance": self.instance[:128],
        }
        try:
            self.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", body)
        except ApiError as err:
            log.warning(
                "cannot post event %s on %s/%s: %s", event.reason, meta["namespace"], meta["name"], err
            )


def converge(kube: Kube, namespace: str, name: str, children: list[Mapping[str, Any]]) -> Plan | None:
    """Read the run, plan, apply: one reconciliation. None when the run is gone or going."""
    body = kube.get_run(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None  # children go by garbage collection (ownerReferences), no finalizer needed
    now = datetime.now(UTC)
    kind = chosen_kind(body, kube.backend.kind)
    if kind not in kube.backends:
        return _apply(kube, body, refused(body, [not_served(body, kind, kube.backends)], now))
    kube = kube.using(kube.backends[kind])
    children = [c for c in children if c.get("kind", kind) == kind]
    result = plan(body, children, now, backend=kube.backend)
    pods = None
    if result.wants_pods:
        pods = {j: kube.list_pods(namespace, kube.backend.pod_selector(j)) for j in result.wants_pods}
        result = plan(body, children, now, pods=pods, backend=kube.backend)
    try:
        return _apply(kube, body, _recorded(result, body, kind))
    except ChildRejected as err:
        # Say why in the status; everything else of the plan still happens, and the next
        # reconcile (a resync at the latest) tries the child again.
        result = plan(body, children, now, pods=pods, backend=kube.backend, rejected={err.name: err.reason})
        result = replace(result, create=tuple(o for o in result.create if o["metadata"]["name"] != err.name))
        # Recorded all the same: a status with stages but no backend reads as a legacy PyTorchJob run.
        return _apply(kube, body, _recorded(result, body, kind))


def _recorded(result: Plan, body: Mapping[str, Any], kind: str) -> Plan:
    """The plan, recording the backend in status when it is not yet."""
    record = backend_record(body, kind)
    return replace(result, status={**result.status, **record}) if record else result


def _apply(kube: Kube, body: Mapping[str, Any], result: Plan) -> Plan | None:
    """apply(), except that a namespace being deleted ends the reconciliation quietly (None)."""
    try:
        apply(kube, body, result)
    except ApiError as err:
        if not err.namespace_terminating:
            raise
        meta = body["metadata"]
        log.info("%s/%s: namespace is being deleted, nothing to do", meta["namespace"], meta["name"])
        return None
    return result


def apply(kube: Kube, body: Mapping[str, Any], result: Plan) -> None:
    """Children first, then status, then events: a crash in between repeats the step, never skips it."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    for obj in result.create:
        if kube.create(obj):
            log.info("created %s %s/%s", obj["kind"], namespace, obj["metadata"]["name"])
    for child, patch in result.patch:
        kube.patch_child(namespace, child, patch)
        log.info("patched %s/%s: %s", namespace, child, json.dumps(patch, sort_keys=True))
    for child in result.delete:
        kube.delete_child(namespace, child)
        log.info("deleted %s/%s", namespace, child)
    if result.status:
        kube.patch_run_status(namespace, name, result.status)
    for event in result.events:
        log.info("%s/%s %s: %s", namespace, name, event.reason, event.message)
        kube.post_event(body, event)
