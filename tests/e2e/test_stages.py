"""A LlavaRun's stages as real jobs → pods on fake GPU nodes (kwok), through each backend:
PyTorchJobs (training-operator) and TrainJobs (Trainer v2 → JobSet → Jobs). Success in order, a
failed worker retried, retries exhausted, the failed pod named."""

from __future__ import annotations

from functools import partial
from itertools import pairwise
from typing import Any

import pytest

from tests.cluster import EXIT_CODE_ANNOTATION
from tests.cluster import GPU_RESOURCE as GPU

from .childkinds import ChildKind
from .support import (
    ALL_STAGES,
    LABEL_ATTEMPT,
    Kube,
    OperatorProcess,
    PodSteerer,
    Watcher,
    condition,
    fail,
    hang,
    job_name,
    llavarun,
    pod_labels,
    wait_events,
    wait_run,
)

pytestmark = pytest.mark.e2e


class JobTimeline:
    """When each job of a namespace first appeared and first showed a final condition."""

    def __init__(self, backend: ChildKind) -> None:
        self.backend = backend
        self.added: dict[str, float] = {}
        self.finished: dict[str, tuple[str, float]] = {}

    def __call__(self, job: dict[str, Any], seen_at: float) -> None:
        name = job["metadata"]["name"]
        self.added.setdefault(name, seen_at)
        state = self.backend.verdict(job)
        if state in ("Succeeded", "Failed") and name not in self.finished:
            self.finished[name] = (state, seen_at)


class LastSeen:
    """The last state seen of every object (deleted ones included) by name."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}

    def __call__(self, obj: dict[str, Any], _seen_at: float) -> None:
        self.objects[obj["metadata"]["name"]] = obj


def test_four_stage_run_succeeds_through_real_jobs_and_pods_in_order(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str, backend: ChildKind
) -> None:
    ns, run = cluster_namespace, "llava13b"
    log_start = running_operator.log_mark()
    timeline, pods = JobTimeline(backend), LastSeen()
    list_jobs = partial(
        kube.custom.list_namespaced_custom_object, *backend.resource[:2], ns, backend.resource[2]
    )
    list_pods = partial(kube.core.list_namespaced_pod, ns)
    with Watcher(list_jobs, timeline), Watcher(list_pods, pods):
        kube.create_run(llavarun(run, ns, ALL_STAGES, nodes={"pretrain": 2}, backend=backend.kind))
        st = wait_run(kube, ns, run, "succeeded", timeout=120, phase="Succeeded")

    names = [job_name(run, s) for s in ALL_STAGES]
    assert sorted(timeline.added, key=timeline.added.get) == names  # type: ignore[arg-type]
    for before, after in pairwise(names):
        assert timeline.finished[before][0] == "Succeeded"
        assert timeline.finished[before][1] <= timeline.added[after], f"{after} started before {before} ended"

    generation = kube.run(ns, run)["metadata"]["generation"]  # type: ignore[index]
    assert (st["stage"], st["currentJob"], st["observedGeneration"]) == ("evaluate", names[-1], generation)
    assert st["backend"] == backend.kind
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

    jobs = backend.jobs(kube, ns, run)
    assert sorted(jobs) == sorted(names)
    assert {n: backend.verdict(j) for n, j in jobs.items()} == dict.fromkeys(names, "Succeeded")
    pods_of = {
        n: [p for p in pods.objects.values() if pod_labels(p).get(backend.job_label) == n] for n in names
    }
    assert {n: len(p) for n, p in pods_of.items()} == {n: 2 if "pretrain" in n else 1 for n in names}
    assert len(pods.objects) == 5
    firsts = {n: next(p for p in ps if backend.first_node(p)) for n, ps in pods_of.items()}
    assert {p["status"]["phase"] for p in firsts.values()} == {"Succeeded"}
    # Scheduled onto the tainted GPU pool, 8 GPUs per pod (prepare is CPU only).
    assert all(p["spec"]["nodeName"].startswith("gpu-node-") for p in pods.objects.values())

    def gpus(pod: dict[str, Any]) -> str | None:
        (trainer,) = [c for c in pod["spec"]["containers"] if c["name"] == backend.container]
        return (trainer.get("resources") or {}).get("limits", {}).get(GPU)

    assert [gpus(p) for p in pods_of[names[0]]] == [None]
    assert {gpus(p) for n in names[1:] for p in pods_of[n]} == {"8"}

    reasons = wait_events(kube, ns, run, "RunSucceeded")
    assert sorted(reasons) == sorted(["StageStarted", "StageSucceeded"] * 4 + ["RunSucceeded"])
    assert running_operator.errors(since=log_start) == []


def steered_to_fail(steered: dict[str, Any]) -> list[str]:
    """The pods a PodSteerer made fail."""
    return sorted(name for name, patch in steered.items() if patch == fail())


def test_failed_worker_is_retried_as_attempt_r1_and_the_run_succeeds(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str, backend: ChildKind
) -> None:
    """Attempt 0's second node exits 1 (the first would run on): the job fails, the operator starts
    `<run>-pretrain-r1`, whose pods finish normally."""
    ns, run = cluster_namespace, "flaky"

    def break_attempt_zero(pod: dict[str, Any]) -> dict[str, Any] | None:
        if pod_labels(pod).get(LABEL_ATTEMPT) != "0":
            return None
        return hang() if backend.first_node(pod) else fail()

    with PodSteerer(kube, ns, break_attempt_zero) as steerer:
        kube.create_run(
            llavarun(run, ns, ["pretrain"], nodes={"pretrain": 2}, run_duration="3s", backend=backend.kind)
        )
        st = wait_run(kube, ns, run, "succeeded", timeout=90, phase="Succeeded")
    first, retry = job_name(run, "pretrain"), job_name(run, "pretrain", 1)
    assert len(steerer.steered) == 2
    (failed_pod,) = steered_to_fail(steerer.steered)
    assert all(pod_labels(p)[backend.job_label] == retry for p in kube.pods(ns, f"{LABEL_ATTEMPT}=1"))

    jobs = backend.jobs(kube, ns, run)
    assert sorted(jobs) == [first, retry]
    assert (backend.verdict(jobs[first]), backend.verdict(jobs[retry])) == ("Failed", "Succeeded")
    assert jobs[retry]["metadata"]["labels"][LABEL_ATTEMPT] == "1"

    record = st["stages"]["pretrain"]
    assert (record["phase"], record["job"], record["attempts"]) == ("Succeeded", retry, 2)
    assert condition(st, "Succeeded")["status"] == "True"
    reasons = wait_events(kube, ns, run, "RunSucceeded")
    assert sorted(reasons) == ["RunSucceeded", "StageRetrying", "StageStarted", "StageSucceeded"]
    (retrying,) = kube.event_messages(ns, run, "StageRetrying")
    assert f"job {first} failed" in retrying and f"pod {failed_pod}: exit code 1" in retrying


def test_exhausted_retries_fail_the_run_with_backoff_limit_exceeded(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str, backend: ChildKind
) -> None:
    ns, run = cluster_namespace, "doomed"
    with PodSteerer(kube, ns, lambda pod: fail()):
        kube.create_run(
            llavarun(run, ns, ["prepare", "pretrain"], retries=1, run_duration="3s", backend=backend.kind)
        )
        st = wait_run(kube, ns, run, "failed", timeout=90, phase="Failed")

    first, retry = job_name(run, "prepare"), job_name(run, "prepare", 1)
    assert sorted(backend.jobs(kube, ns, run)) == [first, retry]  # and never a pretrain job
    failed, succeeded = condition(st, "Failed"), condition(st, "Succeeded")
    assert (failed["status"], failed["reason"]) == ("True", "BackoffLimitExceeded")
    assert failed["message"].startswith(f"job {retry} failed: ")
    (retry_pod,) = [p["metadata"]["name"] for p in kube.pods(ns, backend.pods_of(retry))]
    assert f"pod {retry_pod}: exit code 1" in failed["message"]
    assert (succeeded["status"], succeeded["reason"]) == ("False", "BackoffLimitExceeded")
    record = st["stages"]["prepare"]
    assert (record["phase"], record["job"], record["attempts"]) == ("Failed", retry, 2)
    assert record["message"] == failed["message"]
    assert "pretrain" not in st["stages"]
    reasons = wait_events(kube, ns, run, "StageFailed")
    assert sorted(reasons) == ["StageFailed", "StageRetrying", "StageStarted"]


def test_failure_message_names_the_failed_pod_and_its_exit_code(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str, backend: ChildKind
) -> None:
    ns, run = cluster_namespace, "oom"
    with PodSteerer(kube, ns, lambda pod: fail()) as steerer:
        kube.create_run(
            llavarun(
                run,
                ns,
                ["pretrain"],
                retries=0,
                run_duration="3s",
                pod_annotations={EXIT_CODE_ANNOTATION: "137"},
                backend=backend.kind,
            )
        )
        st = wait_run(kube, ns, run, "failed", timeout=60, phase="Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == "StageFailed"
    (pod,) = steered_to_fail(steerer.steered)
    assert f"pod {pod}: exit code 137" in failed["message"]
    assert f"kubectl logs -n {ns} {pod} -c {backend.container}" in failed["message"]
