"""Faults: the operator SIGKILLed mid-stage, kube-apiserver restarted mid-stage, a run deleted
mid-stage. The Kubeflow controllers and kwok keep running throughout, as in a real cluster."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster import Cluster, wait_for

from .childkinds import JOBSETS, PYTORCHJOB, ChildKind
from .support import (
    ALL_STAGES,
    LABEL_STAGE,
    Kube,
    OperatorProcess,
    PodSteerer,
    hang,
    iter_stage_jobs,
    job_name,
    llavarun,
    pod_labels,
    wait_events,
    wait_pods,
    wait_run,
)

pytestmark = pytest.mark.e2e


def one_job_per_stage(
    kube: Kube, backend: ChildKind, namespace: str, run: str, stages: tuple[str, ...]
) -> None:
    jobs = backend.jobs(kube, namespace, run)
    assert sorted(jobs) == sorted(job_name(run, s) for s in stages)
    assert sorted(iter_stage_jobs(jobs)) == sorted((run, s, 0) for s in stages)


def test_operator_killed_mid_stage_resumes_the_run_without_duplicate_jobs(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str, backend: ChildKind
) -> None:
    """SIGKILL while pretrain runs; pretrain finishes while the operator is down; the restarted
    operator starts finetune once and the run completes."""
    ns, run = cluster_namespace, "crashy"
    pretrain = job_name(run, "pretrain")
    kube.create_run(llavarun(run, ns, ALL_STAGES, run_duration="2s", backend=backend.kind))
    wait_pods(kube, ns, backend.pods_of(pretrain), "Running")
    running_operator.kill()

    backend.wait_job(kube, ns, pretrain, state="Succeeded", timeout=30)  # nobody to start finetune meanwhile
    assert job_name(run, "finetune") not in backend.jobs(kube, ns, run)
    running_operator.start()
    wait_run(kube, ns, run, "succeeded", timeout=90, phase="Succeeded")

    one_job_per_stage(kube, backend, ns, run, ALL_STAGES)
    reasons = wait_events(kube, ns, run, "RunSucceeded")
    assert sorted(reasons) == sorted(["StageStarted", "StageSucceeded"] * 4 + ["RunSucceeded"])


def test_operator_killed_right_after_creating_a_job_does_not_create_it_twice(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str, backend: ChildKind
) -> None:
    ns, run = cluster_namespace, "abrupt"
    kube.create_run(llavarun(run, ns, ["prepare", "pretrain"], run_duration="2s", backend=backend.kind))
    backend.wait_job(kube, ns, job_name(run, "prepare"))
    running_operator.kill()
    running_operator.start()
    wait_run(kube, ns, run, "succeeded", timeout=60, phase="Succeeded")
    one_job_per_stage(kube, backend, ns, run, ("prepare", "pretrain"))


def test_apiserver_restart_mid_stage_is_survived_and_the_run_completes(
    e2e_cluster: Cluster, kube: Kube, running_operator: OperatorProcess, cluster_namespace: str
) -> None:
    ns, run = cluster_namespace, "outage"
    stages = ("prepare", "pretrain", "finetune")
    pid = running_operator.pid
    kube.create_run(llavarun(run, ns, stages, run_duration="2s"))
    wait_pods(kube, ns, PYTORCHJOB.pods_of(job_name(run, "pretrain")), "Running")

    e2e_cluster.restart_apiserver(downtime=2)
    wait_run(kube, ns, run, "succeeded after the outage", timeout=120, phase="Succeeded")

    assert running_operator.healthy() and running_operator.pid == pid  # recovered, not restarted
    one_job_per_stage(kube, PYTORCHJOB, ns, run, stages)


def test_deleting_a_run_mid_stage_garbage_collects_jobs_pods_services_and_rbac(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str, backend: ChildKind
) -> None:
    ns, run = cluster_namespace, "doomed"

    def pretrain_never_ends(pod: dict[str, Any]) -> dict[str, Any] | None:
        return hang() if pod_labels(pod).get(LABEL_STAGE) == "pretrain" else None

    with PodSteerer(kube, ns, pretrain_never_ends):
        kube.create_run(
            llavarun(
                run,
                ns,
                ["prepare", "pretrain"],
                nodes={"pretrain": 2},
                run_duration="3s",
                backend=backend.kind,
            )
        )
        pretrain = job_name(run, "pretrain")
        wait_pods(kube, ns, backend.pods_of(pretrain), "Running", count=2)
    assert len(backend.jobs(kube, ns, run)) == 2
    assert kube.services(ns)  # the job's (PyTorchJob: one per pod; TrainJob: its JobSet's headless one)
    children = [("serviceaccount", f"{run}-trainer"), ("role", f"{run}-status-writer"),
                ("rolebinding", f"{run}-status-writer")]  # fmt: skip
    assert all(kube.exists(kind, ns, name) for kind, name in children)

    kube.delete_run(ns, run)

    def all_gone() -> bool:
        leftovers = [*backend.jobs(kube, ns), *(p["metadata"]["name"] for p in kube.pods(ns))]
        leftovers += [s["metadata"]["name"] for s in kube.services(ns)]
        leftovers += [j.metadata.name for j in kube.batch.list_namespaced_job(ns).items]
        leftovers += [s["metadata"]["name"] for s in kube.custom.list_namespaced_custom_object(
            *JOBSETS[:2], ns, JOBSETS[2])["items"]]  # fmt: skip
        leftovers += [name for kind, name in children if kube.exists(kind, ns, name)]
        return not leftovers

    wait_for(all_gone, timeout=60, interval=0.2, what=f"garbage collection of everything {run} owned")
    assert kube.run(ns, run) is None
