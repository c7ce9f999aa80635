"""Kubeflow training-operator v1 PyTorchJobs: the operator's children.

Reading a job: the training-operator appends conditions (Created, Running, Restarting, Suspended,
Succeeded, Failed) and flips older ones to False, so "which condition is True" is the state;
Failed is sticky. Suspension is read from `spec.runPolicy.suspend` rather than the Suspended
condition: whoever suspended the job (the user through us, or Kueue) wrote the spec, the condition
only follows once the training-operator has deleted the pods. A job has started once one of its
pods ran: a Running (or later) condition exists, or a replica counts an active, succeeded or
failed pod.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..api import LlavaRun, Stage
from ..api.spec import pytorchjob_refusals
from ..backend import RunObjects, stamp, suspend_patch_at
from ..jobstate import JobPhase, JobState
from ..render import render_stage_job
from .shared import describe_failed_pod, pod_pointer, trainer_identity

JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
MAIN_CONTAINER = "pytorch"
STARTED_CONDITIONS = ("Running", "Restarting", "Succeeded", "Failed")
"""Conditions the training-operator only ever writes once a pod ran (False ones included)."""


def _true_conditions(job: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    conditions = (job.get("status") or {}).get("conditions") or []
    return {c.get("type", ""): c for c in conditions if c.get("status") == "True"}


def _failed_replica(job: Mapping[str, Any]) -> str | None:
    replicas = (job.get("status") or {}).get("replicaStatuses") or {}
    for replica in ("Master", "Worker"):
        if (replicas.get(replica) or {}).get("failed"):
            return replica
    return None


def _started(job: Mapping[str, Any]) -> bool:
    status = job.get("status") or {}
    if any(c.get("type") in STARTED_CONDITIONS for c in status.get("conditions") or []):
        return True
    replicas = (status.get("replicaStatuses") or {}).values()
    return any((r or {}).get(n) for r in replicas for n in ("active", "succeeded", "failed"))


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
        started=_started(job),
    )


def failed_pod_hint(job_name: str, state: JobState) -> str | None:
    """The pod to look at when no pod list is available: the Master's is named predictably."""
    if state.failed_replica == "Master":
        return f"{job_name}-master-0"
    return None


def _runs(job: Mapping[str, Any]) -> dict[str, Any]:
    """What a job runs, for the spec digest: its labels (the Kueue queue) and spec, suspension aside."""
    spec = dict(job["spec"])
    spec["runPolicy"] = {k: v for k, v in (spec.get("runPolicy") or {}).items() if k != "suspend"}
    return {"labels": job["metadata"].get("labels") or {}, "spec": spec}


class PyTorchJobBackend:
    """Kubeflow training-operator v1 PyTorchJobs, and the per-run RBAC their trainer uses."""

    group = "kubeflow.org"
    version = "v1"
    plural = "pytorchjobs"
    kind = "PyTorchJob"

    def refusals(self, run: LlavaRun) -> list[str]:
        return pytorchjob_refusals(run.spec)

    def render(self, run: LlavaRun, stage: Stage, attempt: int) -> dict[str, Any]:
        job = render_stage_job(run, stage, attempt)
        return stamp(job, suspend=run.spec.suspend, runs=_runs(job))

    def run_objects(self, run: LlavaRun) -> RunObjects:
        return trainer_identity(run)

    def state(self, child: Mapping[str, Any]) -> JobState:
        return pytorchjob_state(child)

    def suspend_patch(self, suspend: bool) -> dict[str, Any]:
        return suspend_patch_at({"runPolicy": {"suspend": suspend}}, suspend)

    def where_to_look(
        self, child_name: str, state: JobState, namespace: str, pods: list[Mapping[str, Any]]
    ) -> str:
        """The failed pod (from the pod list, else the Master's predictable name) and its log command."""
        described = describe_failed_pod(pods, MAIN_CONTAINER)
        pod, what = described if described else (failed_pod_hint(child_name, state), "")
        return pod_pointer(pod, what, namespace, MAIN_CONTAINER) if pod else ""

    def pod_selector(self, child_name: str) -> str:
        return f"{JOB_NAME_LABEL}={child_name}"


PYTORCHJOB = PyTorchJobBackend()
