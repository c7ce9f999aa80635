"""Why a stage attempt waits, read from its pods. Pure, and the same for every cluster backend:
whatever kind runs an attempt, its processes are pods (the backend's `pod_selector` finds them).

A pod waits when the scheduler cannot place it (its PodScheduled condition says why, in the
scheduler's words), when scheduling gates hold it, or when the kubelet cannot start its
containers: an image it cannot pull, a container it cannot create (a missing Secret or ConfigMap
key), or containers still being created minutes after the pod was placed (a volume that does not
mount; the kubelet tells that in events, which `kubectl describe pod` shows).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .api.status import parse_time

UNSCHEDULABLE = "Unschedulable"
SCHEDULING_GATED = "SchedulingGated"
IMAGE_PULL = "ImagePullBackOff"
"""The kubelet alternates ErrImagePull (each try) and ImagePullBackOff (between tries): one cause."""
CONTAINER_CREATING = "ContainerCreating"
STARTING_ERRORS = (
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
)
"""Container waiting reasons that do not clear by themselves, reported as the kubelet names them."""
CAUSES = (UNSCHEDULABLE, SCHEDULING_GATED, IMAGE_PULL, *STARTING_ERRORS, CONTAINER_CREATING)
"""Every cause, the most telling first: several pods waiting for different causes report the first."""
SLOW_START_SECONDS = 300
"""Containers still being created this long after the pod was placed count as waiting."""
MAX_MESSAGE = 2048


@dataclass(frozen=True)
class Wait:
    """Why an attempt waits: a CamelCase cause and a sentence naming the pod."""

    reason: str
    message: str


def _condition(pod: Mapping[str, Any], ctype: str) -> Mapping[str, Any]:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == ctype), {})


def _containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    status = pod.get("status") or {}
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def pod_wait(pod: Mapping[str, Any], now: datetime) -> Wait | None:
    """Why one pod waits; None when it does not (or has run, or is going away)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase", "Pending") != "Pending":
        return None
    name, namespace = meta.get("name", "?"), meta.get("namespace", "")
    scheduled = _condition(pod, "PodScheduled")
    if scheduled.get("status") == "False" and scheduled.get("reason") == UNSCHEDULABLE:
        said = (scheduled.get("message") or "no node fits").strip()
        return Wait(UNSCHEDULABLE, f"pod {name} cannot be scheduled: {said}")
    gates = [g.get("name", "?") for g in (pod.get("spec") or {}).get("schedulingGates") or []]
    if gates or scheduled.get("reason") == SCHEDULING_GATED:
        return Wait(SCHEDULING_GATED, f"pod {name} is held by scheduling gates: {', '.join(gates) or '?'}")
    for container in _containers(pod):
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason, said = waiting.get("reason") or "", (waiting.get("message") or "").strip()
        where = f"pod {name} container {container.get('name', '?')}"
        if reason in ("ErrImagePull", IMAGE_PULL):
            image = container.get("image") or "its image"
            return Wait(IMAGE_PULL, f"{where} cannot pull {image}: {said or reason}")
        if reason in STARTING_ERRORS:
            return Wait(reason, f"{where}: {reason}: {said or 'the kubelet cannot start it'}")
    placed = parse_time(scheduled.get("lastTransitionTime")) if scheduled.get("status") == "True" else None
    if placed and (now - placed).total_seconds() >= SLOW_START_SECONDS:  # placed, still Pending
        node = (pod.get("spec") or {}).get("nodeName") or "its node"
        return Wait(
            CONTAINER_CREATING,
            f"pod {name} has been starting its containers on {node} since "
            f"{scheduled['lastTransitionTime']} (mounting volumes or pulling the image; "
            f"kubectl describe pod -n {namespace} {name} shows the kubelet's events, e.g. FailedMount)",
        )
    return None


def why_waiting(pods: Iterable[Mapping[str, Any]], now: datetime) -> Wait | None:
    """Why an attempt waits, from its pods: the most telling cause, said for the first pod (by
    name) with it, counting the others."""
    waits = sorted(
        ((w, str((p.get("metadata") or {}).get("name"))) for p in pods if (w := pod_wait(p, now))),
        key=lambda item: (CAUSES.index(item[0].reason), item[1]),
    )
    if not waits:
        return None
    first = waits[0][0]
    others = sum(1 for w, _ in waits[1:] if w.reason == first.reason)
    more = f" (and {others} more pod{'s' if others > 1 else ''})" if others else ""
    return Wait(first.reason, (first.message + more)[:MAX_MESSAGE])
