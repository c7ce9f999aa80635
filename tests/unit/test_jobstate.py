"""The PyTorchJob backend: reading a job as one stage attempt (conditions as the training-operator
writes them), rendering, suspension, RBAC and where a failure's log is."""

from __future__ import annotations

from typing import Any

import pytest
from llava_operator.api import LlavaRun, Stage
from llava_operator.backend import SPEC_HASH_ANNOTATION, SUSPEND_ANNOTATION, applied_suspend
from llava_operator.backends.pytorchjob import MAIN_CONTAINER, PYTORCHJOB, failed_pod_hint, pytorchjob_state
from llava_operator.backends.shared import describe_failed_pod
from llava_operator.jobstate import JobPhase


def job(*conditions: tuple[str, str], suspend: bool = False, **status: Any) -> dict[str, Any]:
    """A PyTorchJob whose conditions are (type, status) in the order the controller appended them."""
    conds = [
        {"type": t, "status": s, "reason": f"PyTorchJob{t}", "message": f"PyTorchJob x is {t.lower()}."}
        for t, s in conditions
    ]
    return {
        "metadata": {"name": "r-pretrain"},
        "spec": {"runPolicy": {"suspend": suspend}},
        "status": {"conditions": conds, **status},
    }


@pytest.mark.parametrize(
    ("conditions", "phase"),
    [
        ((), JobPhase.CREATED),
        ((("Created", "True"),), JobPhase.CREATED),
        ((("Created", "True"), ("Running", "True")), JobPhase.RUNNING),
        ((("Created", "True"), ("Running", "False"), ("Restarting", "True")), JobPhase.RESTARTING),
        ((("Created", "True"), ("Running", "False"), ("Succeeded", "True")), JobPhase.SUCCEEDED),
        ((("Created", "True"), ("Running", "False"), ("Failed", "True")), JobPhase.FAILED),
    ],
)
def test_phase_is_the_true_condition(conditions: tuple[tuple[str, str], ...], phase: JobPhase) -> None:
    assert pytorchjob_state(job(*conditions)).phase is phase


def test_failed_is_sticky_even_if_a_later_condition_is_true() -> None:
    state = pytorchjob_state(job(("Running", "True"), ("Failed", "True")))
    assert state.phase is JobPhase.FAILED
    assert state.reason == "PyTorchJobFailed"


def test_suspension_is_read_from_run_policy_before_the_condition_follows() -> None:
    """Kueue (or we) set runPolicy.suspend; the Suspended condition only appears once pods are gone."""
    state = pytorchjob_state(job(("Created", "True"), ("Running", "True"), suspend=True))
    assert state.phase is JobPhase.SUSPENDED
    assert state.suspended


def test_a_finished_job_is_finished_even_when_suspended() -> None:
    assert pytorchjob_state(job(("Succeeded", "True"), suspend=True)).phase is JobPhase.SUCCEEDED


def test_times_come_from_status() -> None:
    state = pytorchjob_state(
        job(("Succeeded", "True"), startTime="2026-01-01T00:00:00Z", completionTime="2026-01-01T01:00:00Z")
    )
    assert (state.start_time, state.completion_time) == ("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z")


def test_failed_master_gives_a_predictable_pod_name() -> None:
    state = pytorchjob_state(job(("Failed", "True"), replicaStatuses={"Master": {"failed": 1}}))
    assert state.failed_replica == "Master"
    assert failed_pod_hint("r-pretrain", state) == "r-pretrain-master-0"


def test_failed_worker_has_no_hint_without_pods() -> None:
    state = pytorchjob_state(
        job(("Failed", "True"), replicaStatuses={"Master": {"active": 1}, "Worker": {"failed": 1}})
    )
    assert state.failed_replica == "Worker"
    assert failed_pod_hint("r-pretrain", state) is None


def pod(
    name: str, phase: str, exit_code: int | None = None, reason: str = "", finished: str = ""
) -> dict[str, Any]:
    terminated = (
        {"exitCode": exit_code, "reason": reason, "finishedAt": finished} if exit_code is not None else None
    )
    return {
        "metadata": {"name": name},
        "status": {
            "phase": phase,
            "containerStatuses": [
                {"name": "pytorch", "state": {"terminated": terminated} if terminated else {}}
            ],
        },
    }


def test_describe_failed_pod_names_the_first_failure_with_exit_code_and_reason() -> None:
    pods = [
        pod("r-pretrain-master-0", "Failed", 1, "Error", "2026-01-01T00:10:05Z"),
        pod("r-pretrain-worker-0", "Failed", 137, "OOMKilled", "2026-01-01T00:10:00Z"),
        pod("r-pretrain-worker-1", "Running"),
    ]
    assert describe_failed_pod(pods, MAIN_CONTAINER) == ("r-pretrain-worker-0", "exit code 137, OOMKilled")


def test_describe_failed_pod_without_failures() -> None:
    assert describe_failed_pod([pod("r-pretrain-master-0", "Running")], MAIN_CONTAINER) is None
    assert describe_failed_pod([], MAIN_CONTAINER) is None


def llavarun(**spec: Any) -> LlavaRun:
    return LlavaRun.from_k8s(
        {
            "apiVersion": "llavarun.io/v1alpha1",
            "kind": "LlavaRun",
            "metadata": {"name": "r", "namespace": "ns", "uid": "u"},
            "spec": {"image": "img", "storage": {"data": {"source": {"emptyDir": {}}}}, **spec},
        }
    )


def test_backend_records_the_applied_suspend_on_the_child() -> None:
    run = llavarun(suspend=True)
    child = PYTORCHJOB.render(run, Stage.PRETRAIN, 0)
    assert child["metadata"]["annotations"][SUSPEND_ANNOTATION] == "true"
    assert child["spec"]["runPolicy"]["suspend"] is True
    assert applied_suspend(child) is True
    assert applied_suspend({"metadata": {}}) is None


def test_backend_suspend_patch_touches_only_suspension() -> None:
    assert PYTORCHJOB.suspend_patch(False) == {
        "metadata": {"annotations": {SUSPEND_ANNOTATION: "false"}},
        "spec": {"runPolicy": {"suspend": False}},
    }
    assert PYTORCHJOB.pod_selector("r-pretrain-r1") == "training.kubeflow.org/job-name=r-pretrain-r1"


@pytest.mark.parametrize(
    ("conditions", "replicas", "started"),
    [
        ((), {}, False),
        ((("Created", "True"),), {"Master": {}}, False),
        ((("Created", "True"), ("Suspended", "True")), {"Master": {"active": 0}}, False),
        ((("Created", "True"),), {"Master": {}, "Worker": {"active": 1}}, True),
        ((("Created", "True"), ("Running", "True")), {"Master": {"active": 1}}, True),
        ((("Created", "True"), ("Running", "False"), ("Suspended", "True")), {"Master": {}}, True),
        ((("Created", "True"), ("Failed", "True")), {"Master": {"failed": 1}}, True),
    ],
    ids=["new", "pods pending", "created suspended", "a worker runs", "running", "preempted", "failed"],
)
def test_a_job_has_started_once_any_of_its_pods_ran(
    conditions: tuple[tuple[str, str], ...], replicas: dict, started: bool
) -> None:
    assert pytorchjob_state(job(*conditions, replicaStatuses=replicas)).started is started


def test_the_spec_hash_ignores_suspension_and_follows_what_the_job_runs() -> None:
    def hashed(run: LlavaRun) -> str:
        return PYTORCHJOB.render(run, Stage.PRETRAIN, 0)["metadata"]["annotations"][SPEC_HASH_ANNOTATION]

    base = hashed(llavarun())
    assert hashed(llavarun(suspend=True)) == base
    assert hashed(llavarun(evaluate={"maxNewTokens": 7})) == base
    assert hashed(llavarun(image="img:2")) != base
    assert hashed(llavarun(placement={"queueName": "q"})) != base


def test_run_objects_are_the_service_account_before_and_the_status_rbac_after() -> None:
    objects = PYTORCHJOB.run_objects(llavarun())
    assert [o["kind"] for o in objects.before] == ["ServiceAccount"]
    assert [o["kind"] for o in objects.after] == ["Role", "RoleBinding"]
    named = PYTORCHJOB.run_objects(llavarun(serviceAccountName="mine"))
    assert (named.before, [o["kind"] for o in named.after]) == ((), ["Role", "RoleBinding"])


def test_where_to_look_names_the_pod_and_its_log_command() -> None:
    failed = pytorchjob_state(job(("Failed", "True"), replicaStatuses={"Master": {"failed": 1}}))
    assert PYTORCHJOB.where_to_look("r-pretrain", failed, "ns", []) == (
        "pod r-pretrain-master-0 (kubectl logs -n ns r-pretrain-master-0 -c pytorch)"
    )
    pods = [pod("r-pretrain-worker-0", "Failed", 137, "OOMKilled", "2026-01-01T00:10:00Z")]
    assert PYTORCHJOB.where_to_look("r-pretrain", failed, "ns", pods) == (
        "pod r-pretrain-worker-0: exit code 137, OOMKilled (kubectl logs -n ns r-pretrain-worker-0 -c pytorch)"
    )
    worker = pytorchjob_state(job(("Failed", "True"), replicaStatuses={"Worker": {"failed": 1}}))
    assert PYTORCHJOB.where_to_look("r-pretrain", worker, "ns", []) == ""
