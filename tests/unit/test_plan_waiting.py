"""plan(): why a stage waits. The current attempt's pods (found through the backend's selector)
that cannot be scheduled or started, and a child a queue holds, are said in the stage's reason
and message, the Succeeded condition, status.reason (the REASON column) and once per cause in a
Warning event; driven through the in-memory apiserver (tests/plan_world.py)."""

from __future__ import annotations

from datetime import timedelta

from llava_operator.attempts import LOOK_AFTER_SECONDS
from llava_operator.waiting import SLOW_START_SECONDS, pod_wait

from tests.plan_world import World, run_body

TAINTED = (
    "0/2 nodes are available: 2 node(s) had untolerated taint {dedicated.example.com/team: present}. "
    "preemption: 0/2 nodes are available: 2 Preemption is not helpful for scheduling."
)


def started() -> World:
    """A run whose first attempt exists and is old enough for its pods to be read."""
    w = World(run_body())
    w.reconcile()
    w.now += timedelta(seconds=LOOK_AFTER_SECONDS)
    return w


def waits(w: World) -> list[str]:
    return [message for _, reason, message in w.events if reason == "StageWaiting"]


def test_an_unschedulable_pod_is_said_quoting_the_scheduler() -> None:
    w = started()
    w.unschedulable("r1-prepare", TAINTED)
    w.reconcile()
    record = w.status["stages"]["prepare"]
    assert record["phase"] == "Pending" and record["reason"] == "Unschedulable"
    assert record["message"] == f"pod r1-prepare-master-0 cannot be scheduled: {TAINTED}"
    assert (w.status["phase"], w.status["reason"]) == ("Pending", "Unschedulable")
    succeeded = w.condition("Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("Unknown", "Unschedulable")
    assert succeeded["message"] == f"stage prepare waits: {record['message']}"
    assert [(t, r) for t, r, _ in w.events][-1] == ("Warning", "StageWaiting")
    assert waits(w) == [f"stage prepare waits (Unschedulable): {record['message']}"]


def test_the_wait_is_said_once_and_cleared_when_the_pods_run() -> None:
    w = started()
    w.unschedulable("r1-prepare", TAINTED)
    w.reconcile()
    w.unschedulable("r1-prepare", TAINTED.replace("0/2", "0/3"))  # a node joined, still no fit
    w.reconcile()
    assert "0/3 nodes" in w.status["stages"]["prepare"]["message"]
    again = w.reconcile()
    assert (again.status, again.events) == ({}, ())
    assert len(waits(w)) == 1

    w.running("r1-prepare")
    w.reconcile()
    record = w.status["stages"]["prepare"]
    assert record["phase"] == "Running" and "reason" not in record and "message" not in record
    assert "reason" not in w.status
    assert w.condition("Succeeded")["reason"] == "Running"


def test_one_warning_per_cause_the_kubelet_alternating_image_pull_reasons_is_one() -> None:
    w = started()
    w.unschedulable("r1-prepare", TAINTED)
    w.reconcile()
    for reason in ("ErrImagePull", "ImagePullBackOff", "ErrImagePull"):
        w.container_waits("r1-prepare", reason, 'failed to pull and unpack image "img:1": not found')
        w.reconcile()
    record = w.status["stages"]["prepare"]
    assert record["reason"] == w.status["reason"] == "ImagePullBackOff"
    assert record["message"] == (
        'pod r1-prepare-master-0 container pytorch cannot pull img:1: failed to pull and unpack image "img:1": '
        "not found"
    )
    assert [m.split(":")[0] for m in waits(w)] == [
        "stage prepare waits (Unschedulable)",
        "stage prepare waits (ImagePullBackOff)",
    ]


def test_a_container_the_kubelet_cannot_create_is_said() -> None:
    w = started()
    w.container_waits("r1-prepare", "CreateContainerConfigError", 'secret "hf-token" not found')
    w.reconcile()
    record = w.status["stages"]["prepare"]
    assert record["reason"] == "CreateContainerConfigError"
    assert record["message"] == (
        'pod r1-prepare-master-0 container pytorch: CreateContainerConfigError: secret "hf-token" not found'
    )


def test_containers_still_being_created_minutes_after_placement_point_at_volumes() -> None:
    """A volume that does not mount shows only as ContainerCreating (the kubelet says why in events):
    normal for a while, a wait after SLOW_START_SECONDS."""
    w = started()
    w.container_waits("r1-prepare", "ContainerCreating")
    w.reconcile()
    assert "reason" not in w.status["stages"]["prepare"] and waits(w) == []
    w.now += timedelta(seconds=SLOW_START_SECONDS)
    w.reconcile()
    record = w.status["stages"]["prepare"]
    assert record["reason"] == "ContainerCreating"
    assert "since 2026-11-26T12:00:10Z (mounting volumes or pulling the image" in record["message"]
    assert "kubectl describe pod -n ns r1-prepare-master-0" in record["message"]
    assert len(waits(w)) == 1


def test_several_pods_the_most_telling_cause_first_and_the_others_counted() -> None:
    w = World(
        run_body(
            stages=["pretrain"],
            pretrain={"globalBatchSize": 768, "resources": {"nodes": 3, "gpusPerNode": 8}},
        )
    )
    w.reconcile()
    w.now += timedelta(seconds=LOOK_AFTER_SECONDS)
    w.container_waits("r1-pretrain", "ImagePullBackOff", "Back-off pulling image")
    w.unschedulable(
        "r1-pretrain", "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.", replica="worker"
    )
    w.unschedulable(
        "r1-pretrain", "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.", replica="worker", index=1
    )
    w.reconcile()
    record = w.status["stages"]["pretrain"]
    assert record["reason"] == "Unschedulable"
    assert record["message"] == (
        "pod r1-pretrain-worker-0 cannot be scheduled: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu. "
        "(and 1 more pod)"
    )


def test_a_running_master_whose_worker_cannot_be_placed_waits_until_the_trainer_reports() -> None:
    """The training-operator calls a job Running once its master runs; torchrun waits for the
    workers. Pods are read until the trainer reports this attempt's progress, not after."""
    w = World(
        run_body(
            stages=["pretrain"],
            pretrain={"globalBatchSize": 512, "resources": {"nodes": 2, "gpusPerNode": 8}},
        )
    )
    w.reconcile()
    w.now += timedelta(seconds=LOOK_AFTER_SECONDS)
    w.running("r1-pretrain")
    w.unschedulable(
        "r1-pretrain", "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.", replica="worker"
    )
    w.reconcile()
    assert w.status["phase"] == "Running" and w.status["reason"] == "Unschedulable"
    assert "eta" not in w.status

    w.pods.clear()
    w.progress("pretrain", attempt=0, step=1, etaSeconds=3600)
    assert w.plan().wants_pods == ()
    w.reconcile()
    assert "reason" not in w.status and "reason" not in w.status["stages"]["pretrain"]


def test_a_young_attempts_pods_are_not_read() -> None:
    """Scheduling usually settles in seconds: reading every new attempt's pods on each of its
    events would cost the apiserver a LIST per event at scale."""
    w = World(run_body())
    w.reconcile()
    assert w.plan().wants_pods == ()
    w.now += timedelta(seconds=LOOK_AFTER_SECONDS)
    assert w.plan().wants_pods == ("r1-prepare",)


def test_the_pods_of_a_running_single_node_attempt_are_not_read() -> None:
    """One pod, running: nothing of it waits, whatever the trainer reported (prepare reports no
    progress and may run for hours)."""
    w = started()
    assert w.plan().wants_pods == ("r1-prepare",)
    w.running("r1-prepare")
    w.reconcile()
    assert w.plan().wants_pods == ()


def test_a_retry_that_waits_says_so_and_keeps_the_previous_failure() -> None:
    w = World(run_body(retries=2))
    w.reconcile()
    w.finish("r1-prepare", "Failed")
    w.reconcile()
    failure = w.status["stages"]["prepare"]["message"]
    assert failure.startswith("job r1-prepare failed: ")
    assert w.jobs["r1-prepare-r1"]["metadata"]["annotations"]["llavarun.io/previous-failure"] == failure

    w.now += timedelta(seconds=LOOK_AFTER_SECONDS)
    w.unschedulable("r1-prepare-r1", TAINTED)
    w.reconcile()
    record = w.status["stages"]["prepare"]
    assert (record["phase"], record["reason"]) == ("Retrying", "Unschedulable")
    assert record["message"] == (
        f"pod r1-prepare-r1-master-0 cannot be scheduled: {TAINTED}; previous attempt: {failure}"
    )

    w.running("r1-prepare-r1")
    w.reconcile()
    record = w.status["stages"]["prepare"]
    assert record["message"] == failure and "reason" not in record


def test_a_queued_child_is_said_without_a_warning() -> None:
    """Kueue suspends the job it has not admitted: phase Queued, REASON JobSuspendedByQueue, the
    Normal Queued event (queueing is the queue at work, not a problem)."""
    w = started()
    w.kueue_suspends("r1-prepare")
    w.reconcile()
    record = w.status["stages"]["prepare"]
    assert (record["phase"], record["reason"]) == ("Queued", "JobSuspendedByQueue")
    assert record["message"] == "job r1-prepare is suspended until its queue (e.g. Kueue) admits it"
    assert (w.status["phase"], w.status["reason"]) == ("Queued", "JobSuspendedByQueue")
    assert w.condition("Queued")["reason"] == "JobSuspendedByQueue"
    assert "Queued" in w.reasons() and waits(w) == []

    w.kueue_suspends("r1-prepare", False)
    w.reconcile()
    assert "reason" not in w.status and "reason" not in w.status["stages"]["prepare"]


def test_pods_not_listed_leave_what_was_said_and_are_asked_for() -> None:
    w = started()
    w.unschedulable("r1-prepare", TAINTED)
    w.reconcile()
    p = w.plan()  # pods=None: the operator's first plan of a reconcile
    assert p.wants_pods == ("r1-prepare",)
    assert (p.status, p.events) == ({}, ())


def test_a_caller_that_never_lists_pods_is_never_asked() -> None:
    """`llavarun local` passes pods={}: its children have no pods, nothing waits."""
    w = started()
    p = w.plan(pods={})
    assert p.wants_pods == ()


def test_a_failed_run_says_its_reason() -> None:
    w = World(run_body(retries=0))
    w.reconcile()
    w.finish("r1-prepare", "Failed")
    w.reconcile()
    assert (w.status["phase"], w.status["reason"]) == ("Failed", "StageFailed")


def test_pods_that_do_not_wait() -> None:
    now = World(run_body()).now
    running = {"metadata": {"name": "p"}, "status": {"phase": "Running"}}
    going = {
        "metadata": {"name": "p", "deletionTimestamp": "2026-11-26T12:00:00Z"},
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
        },
    }
    gated = {"metadata": {"name": "p"}, "spec": {"schedulingGates": [{"name": "kueue.x-k8s.io/topology"}]}}
    assert pod_wait(running, now) is None and pod_wait(going, now) is None
    wait = pod_wait(gated, now)
    assert wait is not None and wait.reason == "SchedulingGated" and "kueue.x-k8s.io/topology" in wait.message
