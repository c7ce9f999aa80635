"""Read a Kubeflow PyTorchJob (kubeflow.org/v1) as one stage attempt's state.

The training-operator appends conditions (Created, Running, Restarting, Suspended, Succeeded,
Failed) and flips older ones to False, so "which condition is True" is the state; Failed is
sticky. Suspension is read from `spec.runPolicy.suspend` rather than the Suspended condition:
whoever suspended the job (the user through us, or Kueue) wrote the spec, the condition only
follows once the training-operator has deleted the pods.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
MAIN_CONTAINER = "pytorch"


class JobPhase(StrEnum):
    CREATED = "Created"
    """Exists; pods not running yet (pending scheduling or images)."""
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED)


@dataclass(frozen=True)
class JobState:
    """What the plan needs to know about one child job."""

    phase: JobPhase
    reason: str = ""
    message: str = ""
    start_time: str | None = None
    completion_time: str | None = None
    failed_replica: str | None = None
    """Replica type (Master/Worker) with failed pods, from status.replicaStatuses."""
    suspended: bool = False
    """spec.runPolicy.suspend as the job holds it now (set by us or by Kueue)."""


def _true_conditions(job: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    conditions = (job.get("status") or {}).get("conditions") or []
    return {c.get("type", ""): c for c in conditions if c.get("status") == "True"}


def _failed_replica(job: Mapping[str, Any]) -> str | None:
    replicas = (job.get("status") or {}).get("replicaStatuses") or {}
    for replica in ("Master", "Worker"):
        if (replicas.get(replica) or {}).get("failed"):
            return replica
    return None


def pytorchjob_state(job: Mapping[str, Any]) -> JobState:
    """The state of a PyTorchJob from its status conditions and runPolicy."""
    status = job.get("status") or {}
    suspended = bool(((job.get("spec") or {}).get("runPolicy") or {}).get("suspend"))
    true = _true_conditions(job)
    if "Failed" in true:
        phase = JobPhase.FAILED
    elif "Succeeded" in true:
        phase = JobPhase.SUCCEEDED
    elif suspended:
        phase = JobPhase.SUSPENDED
    elif "Restarting" in true:
        phase = JobPhase.RESTARTING
    elif "Running" in true:
        phase = JobPhase.RUNNING
    else:
        phase = JobPhase.CREATED
    condition = true.get(phase.value, {})
    return JobState(
        phase=phase,
        reason=str(condition.get("reason") or ""),
        message=str(condition.get("message") or ""),
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
        failed_replica=_failed_replica(job) if phase is JobPhase.FAILED else None,
        suspended=suspended,
    )


def failed_pod_hint(job_name: str, state: JobState) -> str | None:
    """The pod to look at when no pod list is available: the Master's is named predictably."""
    if state.failed_replica == "Master":
        return f"{job_name}-master-0"
    return None


def _termination(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == MAIN_CONTAINER:
            state = status.get("state") or {}
            last = status.get("lastState") or {}
            return state.get("terminated") or last.get("terminated")
    return None


def describe_failed_pod(pods: Iterable[Mapping[str, Any]]) -> tuple[str, str] | None:
    """(pod name, what happened) for the first failed pod, e.g. ("r-pretrain-master-0", "exit code 137,
    OOMKilled"); the earliest failure first, since later ones are usually its collateral damage."""
    failed = []
    for pod in pods:
        term = _termination(pod)
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
