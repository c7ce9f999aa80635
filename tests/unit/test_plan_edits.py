"""plan() and spec edits: what an edit changes, and when (tests/plan_world.py drives the plan with
the PyTorchJob backend, as tests/unit/test_plan.py does)."""

from __future__ import annotations

import pytest
from llava_operator.backend import FAILURES_ANNOTATION
from llava_operator.conditions import REASON_BACKOFF_LIMIT, REASON_INVALID_SPEC

from tests.plan_world import World, run_body

# --- spec edits ------------------------------------------------------------------------------------


def image_of(job: dict) -> str:
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"]


def test_spec_edits_apply_to_stages_not_yet_started() -> None:
    w = World(run_body(stages=["prepare", "pretrain"]))
    w.reconcile()
    w.running("r1-prepare")
    w.edit(image="img:2")
    p = w.reconcile()
    assert (p.create, p.patch, p.delete) == ((), (), ())
    assert image_of(w.jobs["r1-prepare"]) == "img:1", "a started attempt is locked"
    w.finish("r1-prepare")
    w.reconcile()
    pretrain = w.jobs["r1-pretrain"]
    assert image_of(pretrain) == "img:2"
    assert pretrain["metadata"]["annotations"]["llavarun.io/generation"] == "2"


def test_a_pending_attempt_picks_up_a_placement_edit_as_a_new_attempt() -> None:
    """The prepare pod cannot schedule (a taint it does not tolerate); the user adds the toleration:
    the attempt that never started is replaced by one with the new spec, the old one deleted."""
    w = World(run_body(stages=["prepare", "pretrain"], retries=1))
    w.reconcile()
    w.pending("r1-prepare")
    w.reconcile()
    toleration = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    w.edit(placement={"tolerations": [toleration]})
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["r1-prepare-r1"]
    assert p.delete == ("r1-prepare",)
    assert sorted(w.jobs) == ["r1-prepare-r1"]
    pod = w.jobs["r1-prepare-r1"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert toleration in pod["tolerations"]
    rec = w.status["stages"]["prepare"]
    assert (rec["phase"], rec["job"], rec["attempts"]) == ("Pending", "r1-prepare-r1", 2)
    assert w.status["currentJob"] == "r1-prepare-r1"
    kind, reason, message = w.events[-1]
    assert (kind, reason) == ("Normal", "AttemptReplaced")
    assert "job r1-prepare had not started" in message and "replaced by job r1-prepare-r1" in message
    assert "generation 2" in message
    assert w.reconcile().create == ()
    # A replaced attempt is not a failure: spec.retries (1) still allows one retry.
    w.finish("r1-prepare-r1", "Failed")
    w.reconcile()
    assert w.status["stages"]["prepare"]["phase"] == "Retrying"
    assert w.jobs["r1-prepare-r2"]["metadata"]["annotations"][FAILURES_ANNOTATION] == "1"
    w.finish("r1-prepare-r2", "Failed")
    w.reconcile()
    assert w.status["phase"] == "Failed"
    assert w.condition("Failed")["reason"] == REASON_BACKOFF_LIMIT


@pytest.mark.parametrize(
    ("what", "edit"),
    [
        ("suspension", {"suspend": True}),
        ("another stage's section", {"evaluate": {"maxNewTokens": 7}}),
        ("retries", {"retries": 5}),
    ],
)
def test_an_edit_that_does_not_change_what_the_attempt_runs_keeps_it(what: str, edit: dict) -> None:
    w = World(run_body(stages=["pretrain", "evaluate"]))
    w.reconcile()
    w.pending("r1-pretrain")
    w.edit(**edit)
    p = w.reconcile()
    assert p.create == () and p.delete == (), what
    assert list(w.jobs) == ["r1-pretrain"]


def test_a_queue_editing_the_pending_job_is_not_fought() -> None:
    """Kueue writes node selectors into an admitted job's pod template: the run did not change, so
    the job stays."""
    w = World(run_body(stages=["pretrain"], placement={"queueName": "q"}))
    w.reconcile()
    w.pending("r1-pretrain")
    master = w.jobs["r1-pretrain"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    master["nodeSelector"] = {"cloud.example.com/flavor": "h100"}
    assert (w.reconcile().create, w.reconcile().delete) == ((), ())


def test_an_attempt_whose_pod_started_is_locked_even_if_it_is_no_longer_running() -> None:
    w = World(run_body(stages=["pretrain"]))
    w.reconcile()
    w.running("r1-pretrain")
    w.reconcile()
    w.kueue_suspends("r1-pretrain")  # preempted: its pods are gone, but it ran
    w.jobs["r1-pretrain"]["status"]["conditions"][-1]["status"] = "False"
    w.edit(image="img:2")
    p = w.reconcile()
    assert (p.create, p.delete) == ((), ())


def test_removing_the_running_stage_cancels_it() -> None:
    w = World(run_body(stages=["prepare", "pretrain", "evaluate"]))
    w.reconcile()
    w.finish("r1-prepare")
    w.reconcile()
    w.running("r1-pretrain")
    w.run["spec"]["stages"] = ["prepare", "evaluate"]
    p = w.reconcile()
    assert p.delete == ("r1-pretrain",)
    assert "pretrain" not in w.status["stages"]
    assert w.status["currentJob"] == "r1-evaluate"
    assert "StageCancelled" in w.reasons()


def test_a_stage_inserted_before_a_started_one_is_skipped() -> None:
    w = World(run_body(stages=["pretrain", "evaluate"]))
    w.reconcile()
    w.run["spec"]["stages"] = ["prepare", "pretrain", "evaluate"]
    p = w.reconcile()
    assert p.create == ()
    w.finish("r1-pretrain")
    w.reconcile()
    w.finish("r1-evaluate")
    w.reconcile()
    assert "r1-prepare" not in w.jobs
    assert w.status["phase"] == "Succeeded"


def test_invalid_spec_is_reported_and_recovers_when_fixed() -> None:
    w = World(run_body(stages=["pretrain"]))
    w.run["spec"]["pretrain"] = {"globalBatchSize": 100}  # not divisible by 32 x 8
    p = w.reconcile()
    assert p.create == ()
    assert w.condition("Failed")["reason"] == REASON_INVALID_SPEC
    assert "globalBatchSize" in w.condition("Failed")["message"]
    assert w.reasons() == ["InvalidSpec"]
    assert w.reconcile().events == ()
    w.run["spec"]["pretrain"] = {"globalBatchSize": 256}
    w.reconcile()
    assert w.status["phase"] == "Pending"
    assert w.condition("Failed")["status"] == "False"
    assert "r1-pretrain" in w.jobs
