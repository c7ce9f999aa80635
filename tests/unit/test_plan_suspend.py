"""plan() and suspension: the user's spec.suspend, and a queue (Kueue) suspending jobs itself
(tests/plan_world.py drives the plan with the PyTorchJob backend)."""

from __future__ import annotations

from llava_operator.backend import SUSPEND_ANNOTATION

from tests.plan_world import World, run_body

# --- suspend, resume and Kueue ---------------------------------------------------------------------


def test_suspend_patches_only_the_current_child_and_only_once() -> None:
    w = World(run_body(stages=["prepare", "pretrain"]))
    w.reconcile()
    w.finish("r1-prepare")
    w.reconcile()
    w.running("r1-pretrain")
    w.run["spec"]["suspend"] = True
    p = w.reconcile()
    assert p.patch == (
        (
            "r1-pretrain",
            {
                "metadata": {"annotations": {SUSPEND_ANNOTATION: "true"}},
                "spec": {"runPolicy": {"suspend": True}},
            },
        ),
    )
    assert w.status["phase"] == "Suspended"
    assert w.condition("Suspended")["status"] == "True"
    assert w.reasons()[-1] == "Suspended"
    assert w.reconcile().patch == ()


def test_resume_unsuspends_and_emits_resumed() -> None:
    w = World(run_body(stages=["pretrain"], suspend=True))
    w.reconcile()
    assert w.jobs["r1-pretrain"]["spec"]["runPolicy"]["suspend"] is True
    assert w.status["phase"] == "Suspended"
    w.run["spec"]["suspend"] = False
    p = w.reconcile()
    assert p.patch[0][1]["spec"]["runPolicy"]["suspend"] is False
    assert w.status["phase"] == "Pending"
    assert w.condition("Suspended")["reason"] == "Resumed"
    assert w.reasons()[-1] == "Resumed"
    w.running("r1-pretrain")
    w.reconcile()
    assert w.condition("Suspended")["reason"] == "Resumed"
    assert w.reasons().count("Resumed") == 1


def test_kueue_suspension_is_queued_and_never_overridden() -> None:
    w = World(run_body(stages=["pretrain"]))
    w.reconcile()
    w.kueue_suspends("r1-pretrain")
    p = w.reconcile()
    assert p.patch == ()
    assert w.status["phase"] == "Queued"
    assert w.condition("Queued")["status"] == "True"
    assert w.condition("Suspended")["status"] == "False"
    assert w.reasons()[-1] == "Queued"
    w.kueue_suspends("r1-pretrain", False)  # admitted
    w.running("r1-pretrain")
    p = w.reconcile()
    assert p.patch == ()
    assert w.status["phase"] == "Running"
    assert w.condition("Queued")["reason"] == "Admitted"


def test_kueue_preemption_after_a_user_resume_is_not_fought() -> None:
    w = World(run_body(stages=["pretrain"], suspend=True))
    w.reconcile()
    w.run["spec"]["suspend"] = False
    w.reconcile()
    w.kueue_suspends("r1-pretrain")  # preempted later
    p = w.reconcile()
    assert p.patch == ()
    assert w.status["phase"] == "Queued"


def test_next_stage_of_a_suspended_run_is_created_suspended() -> None:
    w = World(run_body(stages=["prepare", "pretrain"]))
    w.reconcile()
    w.run["spec"]["suspend"] = True
    w.reconcile()
    w.finish("r1-prepare")  # finished while being suspended
    w.reconcile()
    job = w.jobs["r1-pretrain"]
    assert job["spec"]["runPolicy"]["suspend"] is True
    assert job["metadata"]["annotations"][SUSPEND_ANNOTATION] == "true"
    assert w.status["phase"] == "Suspended"
