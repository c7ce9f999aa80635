"""What the cluster backends share: each stage attempt's trainer runs under the run's own identity,
and a failed attempt is explained by its pods, whatever kind of job made them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..api import LlavaRun
from ..backend import RunObjects
from ..render import render_rbac


def trainer_identity(run: LlavaRun) -> RunObjects:
    """The run's trainer identity: its ServiceAccount before the first child (a pod needs it at
    admission; none when the spec names one), then a Role allowing `patch llavaruns/status` on this
    run only and its RoleBinding (the trainer needs them at its first status write, and its
    reporter retries)."""
    objects = render_rbac(run)
    before = tuple(o for o in objects if o["kind"] == "ServiceAccount")
    return RunObjects(before=before, after=tuple(o for o in objects if o["kind"] != "ServiceAccount"))


def _termination(pod: Mapping[str, Any], container: str) -> Mapping[str, Any] | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == container:
            state = status.get("state") or {}
            last = status.get("lastState") or {}
            return state.get("terminated") or last.get("terminated")
    return None


def describe_failed_pod(pods: Iterable[Mapping[str, Any]], container: str) -> tuple[str, str] | None:
    """(pod name, what happened) for the first failed pod, e.g. ("r-pretrain-master-0", "exit code 137,
    OOMKilled"); the earliest failure first, since later ones are usually its collateral damage."""
    failed = []
    for pod in pods:
        term = _termination(pod, container)
        phase = (pod.get("status") or {}).get("phase")
        if phase == "Failed" or (term and term.get("exitCode")):
            failed.append((str((term or {}).get("finishedAt") or "~"), pod, term or {}))
    if not failed:
        return None
    _, pod, term = min(failed, key=lambda item: (item[0], item[1]["metadata"]["name"]))
    parts = []
    if term.get("exitCode") is not None:
        parts.append(f"exit code {term['exitCode']}")
    reason = term.get("reason") or (pod.get("status") or {}).get("reason")
    if reason:
        parts.append(str(reason))
    message = (term.get("message") or "").strip().splitlines()
    if message:
        parts.append(message[-1][:200])
    return str(pod["metadata"]["name"]), ", ".join(parts) or "failed"


def pod_pointer(pod: str, what: str, namespace: str, container: str) -> str:
    """`pod <pod>: <what> (kubectl logs ...)`: the pod to read, what happened to it, and how."""
    said = f": {what}" if what else ""
    return f"pod {pod}{said} (kubectl logs -n {namespace} {pod} -c {container})"
