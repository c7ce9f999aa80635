"""Suspension through the real controllers of each backend: the user's `spec.suspend`, and a queue
(Kueue) suspending the job itself, which the operator reports as Queued and never overrides."""

from __future__ import annotations

import time

import pytest

from tests.cluster import wait_for

from .childkinds import ChildKind
from .support import (
    Kube,
    OperatorProcess,
    PodSteerer,
    condition,
    first_pods_hang,
    job_name,
    llavarun,
    wait_events,
    wait_pods,
    wait_run,
)

pytestmark = pytest.mark.e2e


def job_suspended(kube: Kube, backend: ChildKind, namespace: str, job: str) -> bool:
    return backend.suspended(backend.jobs(kube, namespace)[job])


def wait_no_pods(kube: Kube, backend: ChildKind, namespace: str, job: str, timeout: float = 30) -> None:
    wait_for(
        lambda: not kube.pods(namespace, backend.pods_of(job)),
        timeout=timeout,
        interval=0.2,
        what=f"the pods of {job} to be deleted",
    )


def test_spec_suspend_suspends_the_job_deletes_its_pods_and_resume_completes_the_run(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str, backend: ChildKind
) -> None:
    ns, run = cluster_namespace, "pausable"
    job = job_name(run, "pretrain")
    with PodSteerer(kube, ns, first_pods_hang(2)):
        kube.create_run(
            llavarun(run, ns, ["pretrain"], nodes={"pretrain": 2}, run_duration="2s", backend=backend.kind)
        )
        wait_pods(kube, ns, backend.pods_of(job), "Running", count=2)
        wait_run(kube, ns, run, "running", phase="Running")

        kube.patch_run(ns, run, {"spec": {"suspend": True}})
        st = wait_run(kube, ns, run, "suspended", phase="Suspended")
        assert job_suspended(kube, backend, ns, job)
        wait_no_pods(kube, backend, ns, job)
        backend.wait_job(kube, ns, job, state="Suspended", timeout=30)  # its controller's own verdict
        assert (condition(st, "Suspended")["status"], condition(st, "Suspended")["reason"]) == (
            "True",
            "Suspended",
        )
        assert st["stages"]["pretrain"]["phase"] == "Suspended"

        kube.patch_run(ns, run, {"spec": {"suspend": False}})
        wait_for(
            lambda: not job_suspended(kube, backend, ns, job), timeout=30, interval=0.2, what="job resumed"
        )
        st = wait_run(kube, ns, run, "succeeded after resuming", timeout=60, phase="Succeeded")

    assert list(backend.jobs(kube, ns, run)) == [job]  # the same job was resumed, not replaced
    assert (condition(st, "Suspended")["status"], condition(st, "Suspended")["reason"]) == (
        "False",
        "Resumed",
    )
    assert st["stages"]["pretrain"]["attempts"] == 1
    reasons = wait_events(kube, ns, run, "RunSucceeded")
    assert reasons.count("Suspended") == 1 and reasons.count("Resumed") == 1


def test_queue_suspending_the_job_shows_queued_and_is_never_overridden(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str, backend: ChildKind
) -> None:
    """Kueue preempts a workload by setting the job's runPolicy.suspend and admits it by clearing
    it; the operator reports Queued meanwhile and leaves the field alone."""
    ns, run = cluster_namespace, "queued"
    job = job_name(run, "pretrain")
    with PodSteerer(kube, ns, first_pods_hang(1)):
        kube.create_run(
            llavarun(
                run,
                ns,
                ["pretrain"],
                placement={"queueName": "gpu-queue"},
                run_duration="2s",
                backend=backend.kind,
            )
        )
        wait_pods(kube, ns, backend.pods_of(job), "Running")
        labels = backend.jobs(kube, ns)[job]["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"

        backend.patch_job(kube, ns, job, backend.suspend_patch(True))  # as Kueue would
        st = wait_run(kube, ns, run, "queued", phase="Queued")
        assert (condition(st, "Queued")["status"], condition(st, "Queued")["reason"]) == (
            "True",
            "JobSuspendedByQueue",
        )
        assert condition(st, "Suspended")["status"] == "False"
        wait_no_pods(kube, backend, ns, job)
        time.sleep(2.5 * running_operator.resync_seconds)  # several resyncs and child events later...
        assert job_suspended(kube, backend, ns, job)  # ...still as the queue left it
        assert kube.status(ns, run)["phase"] == "Queued"

        backend.patch_job(kube, ns, job, backend.suspend_patch(False))  # admitted
        st = wait_run(kube, ns, run, "succeeded after admission", timeout=60, phase="Succeeded")

    assert list(backend.jobs(kube, ns, run)) == [job]
    assert (condition(st, "Queued")["status"], condition(st, "Queued")["reason"]) == ("False", "Admitted")
    reasons = wait_events(kube, ns, run, "RunSucceeded")
    assert reasons.count("Queued") == 1 and "Suspended" not in reasons
