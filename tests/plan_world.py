"""An in-memory apiserver and training-operator for driving `plan()` with the PyTorchJob backend.

`World` holds the run, its PyTorchJobs and the per-run RBAC objects the way the apiserver would
after each plan is applied (create = 409 when the name exists, JSON merge patches, deletes), and
plays the training-operator by setting a job's conditions, the scheduler and the kubelet by
setting its pods' status, and the trainer by writing status.progress. Tests read as: apply a run,
move a job, look at what the operator did.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from llava_operator.api.status import merge_patch
from llava_operator.backends.pytorchjob import PYTORCHJOB
from llava_operator.plan import Plan, plan

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
PYTORCHJOB_POD_LABEL = "training.kubeflow.org/job-name"


def stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def run_body(name: str = "r1", uid: str = "uid-1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llavarun.io/v1alpha1",
        "kind": "LlavaRun",
        "metadata": {"name": name, "namespace": "ns", "uid": uid, "generation": 1},
        "spec": {"image": "img:1", "storage": {"data": {"source": {"emptyDir": {}}}}, **spec},
    }


class World:
    """The apiserver as the operator sees it, plus a hand on the training-operator."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.run = body
        self.jobs: dict[str, dict[str, Any]] = {}
        self.rbac: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[str, str, str]] = []
        self.pods: dict[str, list[dict[str, Any]]] = {}
        """A job's pods, by job name (what listing its pod selector answers)."""
        self.now = T0
        self.creates = 0
        self.rejecting: dict[str, str] = {}
        """Jobs the apiserver refuses to create (as an admission webhook would), by name: why."""

    # --- the operator side -----------------------------------------------------------------------

    def plan(
        self, children: list[dict[str, Any]] | None = None, pods: Any = None, rejected: Any = None
    ) -> Plan:
        seen = list(self.jobs.values()) if children is None else children
        body, seen = copy.deepcopy(self.run), copy.deepcopy(seen)
        return plan(body, seen, self.now, pods=pods, backend=PYTORCHJOB, rejected=rejected)

    def apply(self, p: Plan) -> Plan:
        """In the operator's order (kube.apply): creates, patches, deletes, status, events."""
        for obj in p.create:
            self.creates += 1
            if obj["kind"] == PYTORCHJOB.kind and obj["metadata"]["name"] not in self.jobs:
                job = copy.deepcopy(obj)
                job["metadata"]["creationTimestamp"] = stamp(self.now)
                self.jobs[obj["metadata"]["name"]] = job
            else:
                self.rbac.setdefault((obj["kind"], obj["metadata"]["name"]), obj)
        for name, patch in p.patch:
            if name in self.jobs:  # a 404 is ignored
                self.jobs[name] = merge_patch(self.jobs[name], patch)
        for name in p.delete:
            self.jobs.pop(name, None)
        if p.status:
            self.run["status"] = merge_patch(self.run.get("status") or {}, p.status)
        self.events += [(e.type, e.reason, e.message) for e in p.events]
        return p

    def reconcile(self, pods: Any = None) -> Plan:
        p = self.plan(pods=pods)
        if p.wants_pods and pods is None:
            pods = {name: self.pods.get(name, []) for name in p.wants_pods}
            p = self.plan(pods=pods)
        refused = {o["metadata"]["name"]: self.rejecting[o["metadata"]["name"]]
                   for o in p.create if o["metadata"]["name"] in self.rejecting}  # fmt: skip
        if refused:  # as kube.converge: plan again knowing why, create the rest
            p = self.plan(pods=pods, rejected=refused)
            p = replace(p, create=tuple(o for o in p.create if o["metadata"]["name"] not in refused))
        return self.apply(p)

    def settle(self) -> None:
        """Reconcile until nothing changes (what the watch + resync do)."""
        for _ in range(10):
            p = self.reconcile()
            if not (p.status or p.create or p.patch or p.delete):
                return
        raise AssertionError("the plan does not converge")

    def edit(self, **spec: Any) -> None:
        """A user's edit of the spec (merge patch): the apiserver bumps the generation."""
        self.run["spec"] = merge_patch(self.run["spec"], spec)
        self.run["metadata"]["generation"] += 1

    # --- the training-operator side --------------------------------------------------------------

    def finish(self, name: str, outcome: str = "Succeeded", minutes: int = 10, **status: Any) -> None:
        self.now += timedelta(minutes=minutes)
        job = self.jobs[name]
        job.setdefault("metadata", {}).setdefault("creationTimestamp", "2026-11-26T12:00:00Z")
        job["status"] = {
            "conditions": [
                {"type": "Created", "status": "True"},
                {"type": "Running", "status": "False"},
                {
                    "type": outcome,
                    "status": "True",
                    "reason": f"PyTorchJob{outcome}",
                    "message": f"PyTorchJob ns/{name} is {outcome.lower()}.",
                },
            ],
            "completionTime": self.now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            **status,
        }

    def running(self, name: str) -> None:
        self.jobs[name]["status"] = {
            "conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}],
            "replicaStatuses": {"Master": {"active": 1}},
            "startTime": stamp(self.now),
        }
        self.pods.pop(name, None)

    def pending(self, name: str) -> None:
        """Created, its pods not scheduled (e.g. a taint without a toleration)."""
        self.jobs[name]["status"] = {
            "conditions": [{"type": "Created", "status": "True"}],
            "replicaStatuses": {"Master": {}},
        }

    def kueue_suspends(self, name: str, suspend: bool = True) -> None:
        self.jobs[name]["spec"]["runPolicy"]["suspend"] = suspend

    # --- the scheduler and the kubelet -----------------------------------------------------------

    def pod(self, job: str, replica: str = "master", index: int = 0, **status: Any) -> dict[str, Any]:
        """Set (or add) one pending pod of a job with this status; returns it."""
        name = f"{job}-{replica}-{index}"
        pod = {
            "metadata": {"name": name, "namespace": "ns", "labels": {PYTORCHJOB_POD_LABEL: job}},
            "spec": {},
            "status": {"phase": "Pending", **status},
        }
        pods = [p for p in self.pods.get(job, []) if p["metadata"]["name"] != name]
        self.pods[job] = sorted([*pods, pod], key=lambda p: p["metadata"]["name"])
        return pod

    def unschedulable(self, job: str, message: str, **where: Any) -> dict[str, Any]:
        """The scheduler found no node: PodScheduled=False, reason Unschedulable, its message."""
        scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
        return self.pod(job, **where, conditions=[scheduled])

    def container_waits(self, job: str, reason: str, message: str = "", **where: Any) -> dict[str, Any]:
        """Placed on a node; the kubelet's container status waits with `reason`."""
        scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp(self.now)}
        waiting = {"reason": reason, **({"message": message} if message else {})}
        container = {"name": "pytorch", "image": "img:1", "state": {"waiting": waiting}}
        return self.pod(job, **where, conditions=[scheduled], containerStatuses=[container])

    # --- the trainer -----------------------------------------------------------------------------

    def progress(self, stage: str, attempt: int = 0, **fields: Any) -> None:
        """The trainer's status.progress write (a merge patch of its own subtree), stamped now."""
        report = {"stage": stage, "attempt": attempt, "lastUpdate": stamp(self.now), **fields}
        self.run["status"] = merge_patch(self.run.get("status") or {}, {"progress": report})

    # --- reading ---------------------------------------------------------------------------------

    @property
    def status(self) -> dict[str, Any]:
        return self.run.get("status") or {}

    def condition(self, ctype: str) -> dict[str, Any]:
        return next(c for c in self.status["conditions"] if c["type"] == ctype)

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.events]
