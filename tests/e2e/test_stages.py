"""A LlavaRun's stages as real PyTorchJobs → pods (training-operator) → kwok on fake GPU nodes:
success in order, a failed worker retried, retries exhausted."""

from __future__ import annotations

from functools import partial
from itertools import pairwise
from typing import Any

import pytest

from tests.cluster import EXIT_CODE_ANNOTATION
from tests.cluster import GPU_RESOURCE as GPU

from .support import (
    ALL_STAGES,
    KUBEFLOW,
    LABEL_ATTEMPT,
    REPLICA_TYPE_LABEL,
    Kube,
    OperatorProcess,
    PodSteerer,
    Watcher,
    condition,
    fail,
    hang,
    job_name,
    job_state,
    llavarun,
    pod_labels,
    wait_events,
    wait_run,
)

pytestmark = pytest.mark.e2e


class JobTimeline:
    """When each PyTorchJob of a namespace first appeared and first showed a final condition."""

    def __init__(self) -> None:
        self.added: dict[str, float] = {}
        self.finished: dict[str, tuple[str, float]] = {}

    def __call__(self, job: dict[str, Any], seen_at: float) -> None:
        name = job["metadata"]["name"]
        self.added.setdefault(name, seen_at)
        state = job_state(job)
        if state in ("Succeeded", "Failed") and name not in self.finished:
            self.finished[name] = (state, seen_at)


class LastSeen:
    """The last state seen of every object (deleted ones included) by name."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}

    def __call__(self, obj: dict[str, Any], _seen_at: float) -> None:
        self.objects[obj["metadata"]["name"]] = obj


def test_four_stage_run_succeeds_through_real_jobs_and_pods_in_order(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str
) -> None:
    ns, run = cluster_namespace, "llava13b"
    log_start = running_operator.log_mark()
    timeline, pods = JobTimeline(), LastSeen()
    list_jobs = partial(kube.custom.list_namespaced_custom_object, *KUBEFLOW[:2], ns, KUBEFLOW[2])
    list_pods = partial(kube.core.list_namespaced_pod, ns)
    with Watcher(list_jobs, timeline), Watcher(list_pods, pods):
        kube.create_run(llavarun(run, ns, ALL_STAGES, nodes={"pretrain": 2}))
        st = wait_run(kube, ns, run, "succeeded", timeout=120, phase="Succeeded")

    names = [job_name(run, s) for s in ALL_STAGES]
    assert sorted(timeline.added, key=timeline.added.get) == names  # type: ignore[arg-type]
    for before, after in pairwise(names):
        assert timeline.finished[before][0] == "Succeeded"
        assert timeline.finished[before][1] <= timeline.added[after], f"{after} started before {before} ended"

    generation = kube.run(ns, run)["metadata"]["generation"]  # type: ignore[index]
    assert (st["stage"], st["currentJob"], st["observedGeneration"]) == ("evaluate", names[-1], generation)
    for stage in ALL_STAGES:
        record = st["stages"][stage]
        assert (record["phase"], record["job"], record["attempts"]) == ("Succeeded", job_name(run, stage), 1)
        assert record["startTime"] <= record["completionTime"]
    for before, after in pairwise(ALL_STAGES):
        assert st["stages"][before]["completionTime"] <= st["stages"][after]["startTime"]
    assert {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]} == {
        "Succeeded": ("True", "AllStagesSucceeded"),
        "Failed": ("False", "NotFailed"),
        "Suspended": ("False", "NotSuspended"),
        "Queued": ("False", "NotQueued"),
    }

    jobs = kube.jobs(ns, run)
    assert sorted(jobs) == sorted(names)
    assert {n: job_state(j) for n, j in jobs.items()} == dict.fromkeys(names, "Succeeded")
    masters = [f"{n}-master-0" for n in names]
    assert sorted(pods.objects) == sorted([*masters, f"{job_name(run, 'pretrain')}-worker-0"])
    assert {pods.objects[m]["status"]["phase"] for m in masters} == {"Succeeded"}
    # Scheduled onto the tainted GPU pool, 8 GPUs per pod (prepare is CPU only).
    assert all(p["spec"]["nodeName"].startswith("gpu-node-") for p in pods.objects.values())
    gpus = {n: p["spec"]["containers"][0]["resources"]["limits"].get(GPU) for n, p in pods.objects.items()}
    assert gpus.pop(masters[0]) is None
    assert set(gpus.values()) == {"8"}

    reasons = wait_events(kube, ns, run, "RunSucceeded")
    assert sorted(reasons) == sorted(["StageStarted", "StageSucceeded"] * 4 + ["RunSucceeded"])
    assert running_operator.errors(since=log_start) == []


def test_failed_worker_is_retried_as_attempt_r1_and_the_run_succeeds(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str
) -> None:
    """Attempt 0's worker exits 1 (its master would run on): the training-operator fails the job,
    the operator starts `<run>-pretrain-r1`, whose pods finish normally."""
    ns, run = cluster_namespace, "flaky"

    def break_attempt_zero(pod: dict[str, Any]) -> dict[str, Any] | None:
        labels = pod_labels(pod)
        if labels.get(LABEL_ATTEMPT) != "0":
            return None
        return fail() if labels.get(REPLICA_TYPE_LABEL) == "worker" else hang()

    with PodSteerer(kube, ns, break_attempt_zero) as steerer:
        kube.create_run(llavarun(run, ns, ["pretrain"], nodes={"pretrain": 2}, run_duration="3s"))
        st = wait_run(kube, ns, run, "succeeded", timeout=90, phase="Succeeded")
    assert sorted(steerer.steered) == [f"{run}-pretrain-master-0", f"{run}-pretrain-worker-0"]

    first, retry = job_name(run, "pretrain"), job_name(run, "pretrain", 1)
    jobs = kube.jobs(ns, run)
    assert sorted(jobs) == [first, retry]
    assert (job_state(jobs[first]), job_state(jobs[retry])) == ("Failed", "Succeeded")
    assert jobs[retry]["metadata"]["labels"][LABEL_ATTEMPT] == "1"

    record = st["stages"]["pretrain"]
    assert (record["phase"], record["job"], record["attempts"]) == ("Succeeded", retry, 2)
    assert condition(st, "Succeeded")["status"] == "True"
    reasons = wait_events(kube, ns, run, "RunSucceeded")
    assert sorted(reasons) == ["RunSucceeded", "StageRetrying", "StageStarted", "StageSucceeded"]
    (retrying,) = kube.event_messages(ns, run, "StageRetrying")
    assert f"job {first} failed" in retrying and f"pod {first}-worker-0: exit code 1" in retrying


def test_exhausted_retries_fail_the_run_with_backoff_limit_exceeded(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str
) -> None:
    ns, run = cluster_namespace, "doomed"
    with PodSteerer(kube, ns, lambda pod: fail()):
        kube.create_run(llavarun(run, ns, ["prepare", "pretrain"], retries=1, run_duration="3s"))
        st = wait_run(kube, ns, run, "failed", timeout=90, phase="Failed")

    first, retry = job_name(run, "prepare"), job_name(run, "prepare", 1)
    assert sorted(kube.jobs(ns, run)) == [first, retry]  # and never a pretrain job
    failed, succeeded = condition(st, "Failed"), condition(st, "Succeeded")
    assert (failed["status"], failed["reason"]) == ("True", "BackoffLimitExceeded")
    assert failed["message"].startswith(f"job {retry} failed: ")
    assert (succeeded["status"], succeeded["reason"]) == ("False", "BackoffLimitExceeded")
    record = st["stages"]["prepare"]
    assert (record["phase"], record["job"], record["attempts"]) == ("Failed", retry, 2)
    assert record["message"] == failed["message"]
    assert "pretrain" not in st["stages"]
    reasons = wait_events(kube, ns, run, "StageFailed")
    assert sorted(reasons) == ["StageFailed", "StageRetrying", "StageStarted"]


def test_failure_message_names_the_failed_pod_and_its_exit_code(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str
) -> None:
    ns, run = cluster_namespace, "oom"
    with PodSteerer(kube, ns, lambda pod: fail()):
        kube.create_run(
            llavarun(
                run,
                ns,
                ["pretrain"],
                retries=0,
                run_duration="3s",
                pod_annotations={EXIT_CODE_ANNOTATION: "137"},
            )
        )
        st = wait_run(kube, ns, run, "failed", timeout=60, phase="Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == "StageFailed"
    pod = f"{job_name(run, 'pretrain')}-master-0"
    assert f"pod {pod}: exit code 137" in failed["message"]
    assert f"kubectl logs -n {ns} {pod} -c pytorch" in failed["message"]
