"""What an end-to-end scenario needs to know of each backend's child jobs, so one scenario runs
through both: PyTorchJobs (training-operator v1) and TrainJobs (Kubeflow Trainer v2 over JobSet).

Each kind says where its jobs live, which label every pod of a job carries, which pod is the first
node's, how a queue suspends a job, and a verdict in the training-operator's words ("Succeeded",
"Failed", "Suspended", ...) so assertions read the same for both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tests.cluster import wait_for

from .support import KUBEFLOW, LABEL_RUN, POLL, REPLICA_TYPE_LABEL, Kube, job_state

TRAINJOBS = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
JOBSETS = ("jobset.x-k8s.io", "v1alpha2", "jobsets")
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def trainjob_verdict(job: Mapping[str, Any]) -> str | None:
    """A TrainJob's state in the training-operator's words: Complete is "Succeeded"."""
    true = {c["type"] for c in (job.get("status") or {}).get("conditions") or [] if c["status"] == "True"}
    if "Failed" in true:
        return "Failed"
    if "Complete" in true:
        return "Succeeded"
    if (job.get("spec") or {}).get("suspend") and "Suspended" in true:
        return "Suspended"
    return "Created" if job.get("status") else None


@dataclass(frozen=True)
class ChildKind:
    kind: str
    resource: tuple[str, str, str]
    job_label: str
    """Every pod of a job carries it, valued with the job's name."""
    container: str
    """The trainer's container (what `kubectl logs -c` needs)."""
    verdict: Callable[[Mapping[str, Any]], str | None]
    suspend_path: tuple[str, ...]
    """Where in the job's spec a queue (Kueue) writes `suspend`."""
    first_node: Callable[[Mapping[str, Any]], bool]
    """Is this pod the first node's (the PyTorchJob master, the TrainJob's completion index 0)?"""

    def jobs(self, kube: Kube, namespace: str, run: str | None = None) -> dict[str, dict[str, Any]]:
        """This kind's jobs by name (of one run, by its label)."""
        selector = f"{LABEL_RUN}={run}" if run else None
        items = kube.custom.list_namespaced_custom_object(
            *self.resource[:2], namespace, self.resource[2], label_selector=selector
        )
        return {j["metadata"]["name"]: j for j in items["items"]}

    def pods_of(self, job: str) -> str:
        """The label selector of a job's pods."""
        return f"{self.job_label}={job}"

    def suspended(self, job: Mapping[str, Any]) -> bool:
        value: Any = job["spec"]
        for key in self.suspend_path:
            value = value.get(key) or {}
        return bool(value)

    def suspend_patch(self, suspend: bool) -> dict[str, Any]:
        patch: dict[str, Any] = {self.suspend_path[-1]: suspend}
        for key in reversed(self.suspend_path[:-1]):
            patch = {key: patch}
        return {"spec": patch}

    def patch_job(self, kube: Kube, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        kube.custom.patch_namespaced_custom_object(
            *self.resource[:2], namespace, self.resource[2], name, dict(patch)
        )

    def wait_job(
        self, kube: Kube, namespace: str, name: str, timeout: float = 60, state: str | None = None
    ) -> dict[str, Any]:
        """Wait for a job to exist (and, with `state`, to reach that verdict)."""

        def found() -> dict[str, Any] | None:
            job = self.jobs(kube, namespace).get(name)
            return job if job and (state is None or self.verdict(job) == state) else None

        what = f"{self.kind} {namespace}/{name} {state or ''}"
        return dict(wait_for(found, timeout=timeout, interval=POLL, what=what))


PYTORCHJOB = ChildKind(
    kind="PyTorchJob",
    resource=KUBEFLOW,
    job_label="training.kubeflow.org/job-name",
    container="pytorch",
    verdict=job_state,
    suspend_path=("runPolicy", "suspend"),
    first_node=lambda pod: (pod["metadata"].get("labels") or {}).get(REPLICA_TYPE_LABEL) == "master",
)
TRAINJOB = ChildKind(
    kind="TrainJob",
    resource=TRAINJOBS,
    job_label=JOBSET_NAME_LABEL,
    container="node",
    verdict=trainjob_verdict,
    suspend_path=("suspend",),
    first_node=lambda pod: (pod["metadata"].get("labels") or {}).get(COMPLETION_INDEX_LABEL) == "0",
)
KINDS = {k.kind: k for k in (PYTORCHJOB, TRAINJOB)}
