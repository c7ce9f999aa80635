"""Kubeflow Trainer v2 TrainJobs: the operator's other kind of child.

Rendering: the stage contract (`render.stage_values`, the same as a PyTorchJob's) goes into
`spec.trainer` (image, command, args, env, nodes, processes per node, resources) and into one
`runtimePatches` entry (manager `llavarun.io/operator`) for what the stage needs on its pods
(service account, volumes, placement, annotations, security context, grace period). The
ClusterTrainingRuntime it references (the chart's, or the run's `trainingRuntime`) carries a torch
ML policy, one replicated job `node` with container `node`, `restartPolicy: Never` and
`backoffLimit: 0`, so a failing pod fails the TrainJob at once and a retry is a new TrainJob.

Reading: the controller writes the conditions `Complete` (AllJobsCompleted) and `Failed`
(FailedJobs, DeadlineExceeded); suspension is read from `spec.suspend` (whoever suspended it, we or
Kueue, wrote the spec). A TrainJob has started once a Job of its JobSet was ready, succeeded or
failed (`status.jobsStatus`). Its JobSet has its name and labels every pod with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..api import LlavaRun, Stage
from ..api.spec import trainjob_refusals
from ..backend import RunObjects, stamp, suspend_patch_at
from ..jobstate import JobPhase, JobState
from ..kinds import DEFAULT_TRAINING_RUNTIME
from ..render import owner_reference, stage_values
from .shared import describe_failed_pod, pod_pointer, trainer_identity

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PATCH_MANAGER = "llavarun.io/operator"
REPLICATED_JOB = "node"
MAIN_CONTAINER = "node"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"


def _pod_patch(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The stage's pod template as a runtime patch (what `spec.trainer` cannot say)."""
    spec: dict[str, Any] = {
        "serviceAccountName": pod["service_account"],
        "terminationGracePeriodSeconds": pod["termination_grace_period_seconds"],
        "nodeSelector": pod["node_selector"],
        "tolerations": pod["tolerations"],
        "imagePullSecrets": pod["image_pull_secrets"],
        "securityContext": pod["pod_security_context"],
        "volumes": pod["volumes"],
        "containers": [
            {
                "name": MAIN_CONTAINER,
                "securityContext": pod["container_security_context"],
                "volumeMounts": pod["volume_mounts"],
            }
        ],
    }
    if pod["affinity"]:
        spec["affinity"] = pod["affinity"]
    return {"metadata": {"labels": pod["labels"], "annotations": pod["annotations"]}, "spec": spec}


def render_trainjob(run: LlavaRun, stage: Stage, attempt: int, runtime: str) -> dict[str, Any]:
    """The TrainJob for one attempt of one stage, on the ClusterTrainingRuntime `runtime` (the
    run's `trainingRuntime` wins). ValueError when the run asks for what a TrainJob cannot do."""
    refused = trainjob_refusals(run.spec)
    if refused:
        raise ValueError("; ".join(refused))
    job, pod = stage_values(run, stage, attempt)
    metadata: dict[str, Any] = {
        "name": job["name"],
        "namespace": job["namespace"],
        "labels": job["labels"],
        "annotations": job["annotations"],
    }
    owner = owner_reference(run)
    if owner:
        metadata["ownerReferences"] = [owner]
    trainer: dict[str, Any] = {
        "image": pod["image"],
        "command": pod["command"],
        "args": pod["args"],
        "env": pod["env"],
        "numNodes": job["nodes"],
        "numProcPerNode": job["nproc_per_node"],
    }
    if pod["resources"]:
        trainer["resourcesPerNode"] = pod["resources"]
    patch = {"template": {"spec": {"template": _pod_patch(pod)}}}
    spec: dict[str, Any] = {
        "runtimeRef": {
            "apiGroup": GROUP,
            "kind": "ClusterTrainingRuntime",
            "name": run.spec.training_runtime or runtime,
        },
        "suspend": job["suspend"],
        "trainer": trainer,
        "runtimePatches": [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {
                    "template": {"spec": {"replicatedJobs": [{"name": REPLICATED_JOB, **patch}]}}
                },
            }
        ],
    }
    if job["active_deadline_seconds"]:
        spec["activeDeadlineSeconds"] = job["active_deadline_seconds"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob", "metadata": metadata, "spec": spec}


def _conditions(job: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    conditions = (job.get("status") or {}).get("conditions") or []
    return {c.get("type", ""): c for c in conditions if c.get("status") == "True"}


def _jobs(job: Mapping[str, Any], field: str) -> int:
    return sum(int(j.get(field) or 0) for j in (job.get("status") or {}).get("jobsStatus") or [])


def trainjob_state(job: Mapping[str, Any]) -> JobState:
    """The state of a TrainJob from its conditions, `spec.suspend` and `status.jobsStatus`."""
    suspended = bool((job.get("spec") or {}).get("suspend"))
    true = _conditions(job)
    ready = _jobs(job, "ready")
    started = bool(ready or _jobs(job, "succeeded") or _jobs(job, "failed") or "Complete" in true)
    if "Failed" in true:
        phase, condition = JobPhase.FAILED, true["Failed"]
    elif "Complete" in true:
        phase, condition = JobPhase.SUCCEEDED, true["Complete"]
    elif suspended:
        phase, condition = JobPhase.SUSPENDED, true.get("Suspended", {})
    elif ready:
        phase, condition = JobPhase.RUNNING, {}
    else:
        phase, condition = JobPhase.CREATED, {}
    meta = job.get("metadata") or {}
    message = str(condition.get("message") or "")
    if phase is JobPhase.FAILED:
        message = f"TrainJob {meta.get('namespace')}/{meta.get('name')}: {message}"
    return JobState(
        phase=phase,
        reason=str(condition.get("reason") or ""),
        message=message,
        start_time=meta.get("creationTimestamp"),
        completion_time=condition.get("lastTransitionTime") if phase.finished else None,
        failed_replica=None,
        suspended=suspended,
        started=started,
    )


def _runs(job: Mapping[str, Any]) -> dict[str, Any]:
    """What a TrainJob runs, for the spec digest: its labels (the Kueue queue) and spec, suspension aside."""
    spec = {k: v for k, v in job["spec"].items() if k != "suspend"}
    return {"labels": job["metadata"].get("labels") or {}, "spec": spec}


class TrainJobBackend:
    """Kubeflow Trainer v2 TrainJobs on a ClusterTrainingRuntime, and the per-run RBAC their trainer uses."""

    group = GROUP
    version = VERSION
    plural = "trainjobs"
    kind = "TrainJob"

    def __init__(self, runtime: str = DEFAULT_TRAINING_RUNTIME) -> None:
        self.runtime = runtime

    def refusals(self, run: LlavaRun) -> list[str]:
        return trainjob_refusals(run.spec)

    def render(self, run: LlavaRun, stage: Stage, attempt: int) -> dict[str, Any]:
        job = render_trainjob(run, stage, attempt, self.runtime)
        return stamp(job, suspend=run.spec.suspend, runs=_runs(job))

    def run_objects(self, run: LlavaRun) -> RunObjects:
        return trainer_identity(run)

    def state(self, child: Mapping[str, Any]) -> JobState:
        return trainjob_state(child)

    def suspend_patch(self, suspend: bool) -> dict[str, Any]:
        return suspend_patch_at({"suspend": suspend}, suspend)

    def where_to_look(
        self, child_name: str, state: JobState, namespace: str, pods: list[Mapping[str, Any]]
    ) -> str:
        """The failed pod of the TrainJob's JobSet (the failed pod stays), its exit code and log command."""
        described = describe_failed_pod(pods, MAIN_CONTAINER)
        return pod_pointer(*described, namespace, MAIN_CONTAINER) if described else ""

    def pod_selector(self, child_name: str) -> str:
        return f"{JOBSET_NAME_LABEL}={child_name}"


TRAINJOB = TrainJobBackend()
