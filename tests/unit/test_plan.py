"""plan(): every transition of a LlavaRun, driven through an in-memory apiserver (tests/plan_world.py)
with the PyTorchJob backend. Tests read as: apply a run, move a job, look at what the operator did."""

from __future__ import annotations

from datetime import timedelta

import pytest
from llava_operator.api.spec import MAX_RUN_NAME_LENGTH
from llava_operator.conditions import REASON_BACKOFF_LIMIT, REASON_STAGE_FAILED
from llava_operator.naming import job_name
from llava_operator.plan import Plan

from tests.plan_world import World, run_body

# --- a new run -------------------------------------------------------------------------------------


def test_new_run_creates_rbac_and_first_stage_owned_by_the_run() -> None:
    w = World(run_body())
    p = w.reconcile()
    kinds = [o["kind"] for o in p.create]
    assert kinds == ["ServiceAccount", "PyTorchJob", "Role", "RoleBinding"]
    for obj in p.create:
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "llavarun.io/v1alpha1",
            "kind": "LlavaRun",
            "name": "r1",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    assert job_of(p)["metadata"]["name"] == "r1-prepare"
    assert w.status["phase"] == "Pending"
    assert w.status["stage"] == "prepare"
    assert w.status["currentJob"] == "r1-prepare"
    assert w.status["observedGeneration"] == 1
    assert w.status["stages"] == {
        "prepare": {
            "phase": "Pending",
            "job": "r1-prepare",
            "attempts": 1,
            "startTime": "2026-11-26T12:00:00Z",
        }
    }
    assert {c["type"]: c["status"] for c in w.status["conditions"]} == {
        "Succeeded": "Unknown",
        "Failed": "False",
        "Suspended": "False",
        "Queued": "False",
    }
    assert w.reasons() == ["StageStarted"]


def test_conditions_are_metav1_conditions() -> None:
    w = World(run_body())
    w.reconcile()
    for cond in w.status["conditions"]:
        assert set(cond) == {
            "type",
            "status",
            "reason",
            "message",
            "lastTransitionTime",
            "observedGeneration",
        }
        assert cond["reason"][0].isalpha()


def test_a_converged_run_costs_nothing() -> None:
    w = World(run_body())
    w.reconcile()
    again = w.plan()
    assert (again.create, again.patch, again.delete, again.status, again.events) == ((), (), (), {}, ())


def test_created_child_not_yet_observed_is_created_again_without_new_status_or_events() -> None:
    """The watch lags our own create: re-issuing it is safe (409), and nothing is recorded twice."""
    w = World(run_body())
    w.reconcile()
    p = w.plan(children=[])
    assert [o["metadata"]["name"] for o in p.create if o["kind"] == "PyTorchJob"] == ["r1-prepare"]
    assert p.status == {}
    assert p.events == ()


def test_running_child_makes_the_run_running() -> None:
    w = World(run_body())
    w.reconcile()
    w.running("r1-prepare")
    w.reconcile()
    assert w.status["phase"] == "Running"
    assert w.status["stages"]["prepare"]["phase"] == "Running"


# --- advancing -------------------------------------------------------------------------------------


def test_stages_run_in_order_and_each_is_recorded() -> None:
    w = World(run_body())
    w.reconcile()
    order = []
    for stage in ("prepare", "pretrain", "finetune", "evaluate"):
        name = f"r1-{stage}"
        assert w.status["currentJob"] == name
        order.append(stage)
        w.finish(name)
        w.reconcile()
    assert order == ["prepare", "pretrain", "finetune", "evaluate"]
    assert w.status["phase"] == "Succeeded"
    assert w.condition("Succeeded")["status"] == "True"
    assert w.condition("Failed")["status"] == "False"
    stages = w.status["stages"]
    assert stages["pretrain"] == {
        "phase": "Succeeded",
        "job": "r1-pretrain",
        "attempts": 1,
        "startTime": "2026-11-26T12:10:00Z",
        "completionTime": "2026-11-26T12:20:00Z",
    }
    assert w.reasons().count("StageStarted") == 4
    assert w.reasons().count("StageSucceeded") == 4
    assert w.reasons()[-1] == "RunSucceeded"


def test_a_succeeded_run_stays_quiet() -> None:
    w = World(run_body(stages=["pretrain"]))
    w.reconcile()
    w.finish("r1-pretrain")
    w.reconcile()
    events = len(w.events)
    p = w.reconcile()
    assert (p.create, p.status, len(w.events)) == ((), {}, events)


def test_stage_durations_are_reported_once() -> None:
    w = World(run_body(stages=["pretrain"]))
    w.reconcile()
    w.finish("r1-pretrain", minutes=30)
    p = w.reconcile()
    assert [(r.stage, r.result, r.seconds) for r in p.finished] == [("pretrain", "succeeded", 1800.0)]
    assert w.reconcile().finished == ()


def test_a_subset_of_stages_starts_with_its_first() -> None:
    w = World(run_body(stages=["pretrain", "evaluate"]))
    p = w.reconcile()
    assert job_of(p)["metadata"]["name"] == "r1-pretrain"
    w.finish("r1-pretrain")
    p = w.reconcile()
    assert job_of(p)["metadata"]["name"] == "r1-evaluate"


def test_child_deleted_after_success_is_not_recreated() -> None:
    """ttlSecondsAfterFinished or a user may delete a finished job: the record is what counts."""
    w = World(run_body(stages=["prepare", "pretrain"]))
    w.reconcile()
    w.finish("r1-prepare")
    w.reconcile()
    del w.jobs["r1-prepare"]
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create if o["kind"] == "PyTorchJob"] == []
    assert w.status["stages"]["prepare"]["phase"] == "Succeeded"


# --- failures and retries --------------------------------------------------------------------------


def test_failed_attempt_is_retried_with_the_attempt_number_in_the_name() -> None:
    w = World(run_body(stages=["pretrain"], retries=2))
    w.reconcile()
    w.finish("r1-pretrain", "Failed", replicaStatuses={"Master": {"failed": 1}})
    p = w.reconcile()
    (job,) = [o for o in p.create if o["kind"] == "PyTorchJob"]
    assert job["metadata"]["name"] == "r1-pretrain-r1"
    assert job["metadata"]["labels"]["llavarun.io/attempt"] == "1"
    rec = w.status["stages"]["pretrain"]
    assert (rec["phase"], rec["job"], rec["attempts"]) == ("Retrying", "r1-pretrain-r1", 2)
    assert "job r1-pretrain failed" in rec["message"]
    assert "pod r1-pretrain-master-0" in rec["message"]
    assert w.status["phase"] == "Running"
    kind, reason, message = w.events[-1]
    assert (kind, reason) == ("Warning", "StageRetrying")
    assert "attempt 2 as job r1-pretrain-r1" in message


def test_a_retry_that_runs_keeps_the_previous_failure_message() -> None:
    w = World(run_body(stages=["pretrain"]))
    w.reconcile()
    w.finish("r1-pretrain", "Failed")
    w.reconcile()
    w.running("r1-pretrain-r1")
    w.reconcile()
    rec = w.status["stages"]["pretrain"]
    assert rec["phase"] == "Running"
    assert rec["message"].startswith("job r1-pretrain failed")


def test_retries_exhausted_fail_the_run_with_a_reason_and_the_pod() -> None:
    w = World(run_body(stages=["prepare", "pretrain"], retries=1))
    w.reconcile()
    w.finish("r1-prepare")
    w.reconcile()
    w.finish("r1-pretrain", "Failed")
    w.reconcile()
    w.finish("r1-pretrain-r1", "Failed")
    pods = {
        "r1-pretrain-r1": [
            {
                "metadata": {"name": "r1-pretrain-r1-worker-0"},
                "status": {
                    "phase": "Failed",
                    "containerStatuses": [
                        {"name": "pytorch", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
                    ],
                },
            }
        ]
    }
    first = w.plan()
    assert first.wants_pods == ("r1-pretrain-r1",)
    w.apply(w.plan(pods=pods))
    assert w.status["phase"] == "Failed"
    failed = w.condition("Failed")
    assert (failed["status"], failed["reason"]) == ("True", REASON_BACKOFF_LIMIT)
    assert "job r1-pretrain-r1 failed" in failed["message"]
    assert "pod r1-pretrain-r1-worker-0: exit code 137, OOMKilled" in failed["message"]
    assert "kubectl logs -n ns r1-pretrain-r1-worker-0 -c pytorch" in failed["message"]
    assert w.condition("Succeeded")["status"] == "False"
    rec = w.status["stages"]["pretrain"]
    assert (rec["phase"], rec["attempts"], rec["job"]) == ("Failed", 2, "r1-pretrain-r1")
    assert w.events[-1][:2] == ("Warning", "StageFailed")
    assert [r.result for r in w.reconcile().finished] == []


def test_no_retries_fails_with_stage_failed() -> None:
    w = World(run_body(stages=["pretrain"], retries=0))
    w.reconcile()
    w.finish("r1-pretrain", "Failed")
    w.reconcile()
    assert w.condition("Failed")["reason"] == REASON_STAGE_FAILED
    assert "r1-pretrain-r1" not in w.jobs


def test_failure_is_terminal_even_if_retries_are_raised_later() -> None:
    w = World(run_body(stages=["pretrain"], retries=0))
    w.reconcile()
    w.finish("r1-pretrain", "Failed")
    w.reconcile()
    w.run["spec"]["retries"] = 5
    w.run["metadata"]["generation"] = 2
    p = w.reconcile()
    assert p.create == ()
    assert w.status["phase"] == "Failed"
    assert w.status["observedGeneration"] == 2


def test_retry_created_but_not_yet_observed_is_not_retried_twice() -> None:
    w = World(run_body(stages=["pretrain"]))
    w.reconcile()
    w.finish("r1-pretrain", "Failed")
    w.reconcile()
    stale = [w.jobs["r1-pretrain"]]  # the watch has not delivered r1-pretrain-r1 yet
    p = w.plan(children=stale)
    assert [o["metadata"]["name"] for o in p.create if o["kind"] == "PyTorchJob"] == ["r1-pretrain-r1"]
    assert p.status == {}
    assert p.events == ()


# --- ownership and status subtrees -----------------------------------------------------------------


def test_children_of_a_previous_run_with_the_same_name_are_ignored() -> None:
    w = World(run_body())
    w.reconcile()
    w.finish("r1-prepare")
    w.run = run_body(uid="uid-2")  # deleted and re-created; the old job still awaits GC
    p = w.reconcile()
    assert job_of(p)["metadata"]["name"] == "r1-prepare"
    assert job_of(p)["metadata"]["ownerReferences"][0]["uid"] == "uid-2"
    assert w.status["stages"]["prepare"]["phase"] == "Pending"


def test_trainer_subtree_is_never_written() -> None:
    w = World(run_body(stages=["pretrain"]))
    w.run["status"] = {"progress": {"step": 5, "loss": 1.5}, "results": {"pretrain": {"steps": 5}}}
    p = w.reconcile()
    assert not {"progress", "results"} & set(p.status)
    w.finish("r1-pretrain")
    p = w.reconcile()
    assert not {"progress", "results"} & set(p.status)
    assert w.status["progress"] == {"step": 5, "loss": 1.5}


def test_transition_times_only_move_when_status_flips() -> None:
    w = World(run_body(stages=["pretrain"]))
    w.reconcile()
    before = w.condition("Failed")["lastTransitionTime"]
    w.now += timedelta(hours=1)
    w.running("r1-pretrain")
    w.reconcile()
    assert w.condition("Failed")["lastTransitionTime"] == before
    assert w.condition("Succeeded")["reason"] == "Running"
    w.finish("r1-pretrain")
    w.reconcile()
    assert w.condition("Succeeded")["lastTransitionTime"] == "2026-11-26T13:10:00Z"


def test_stale_fields_of_a_stage_record_are_removed() -> None:
    w = World(run_body(stages=["pretrain"]))
    w.reconcile()
    w.finish("r1-pretrain", "Failed")
    w.reconcile()
    assert "message" in w.status["stages"]["pretrain"]
    w.finish("r1-pretrain-r1")
    p = w.reconcile()
    assert p.status["stages"]["pretrain"]["message"] is None
    assert "message" not in w.status["stages"]["pretrain"]


def test_longest_name_fits_every_child() -> None:
    name = "r" * MAX_RUN_NAME_LENGTH
    assert len(job_name(name, "finetune", 10) + "-worker-511") <= 63


# --- restart safety --------------------------------------------------------------------------------


@pytest.mark.parametrize("crash_after", range(6))
def test_a_crash_anywhere_in_applying_a_plan_loses_and_duplicates_nothing(crash_after: int) -> None:
    """Apply only the first `crash_after` steps of each plan (creates, patches, status, events),
    then start from scratch: the run ends in the same state as without crashes, and no job exists
    that the crash-free run would not have created."""

    def drive(crash: int | None) -> World:
        w = World(run_body(stages=["prepare", "pretrain"], retries=1))
        script = [
            lambda: None,
            lambda: w.finish("r1-prepare"),
            lambda: w.finish("r1-pretrain", "Failed"),
            lambda: w.finish("r1-pretrain-r1"),
        ]
        for step in script:
            step()
            p = w.plan()
            if p.wants_pods:
                p = w.plan(pods={})
            if crash is not None:
                parts = [*p.create, *p.patch, p.status, *p.events][:crash]
                partial = Plan(
                    create=tuple(x for x in parts if isinstance(x, dict) and "kind" in x),
                    patch=tuple(x for x in parts if isinstance(x, tuple)),
                    status=p.status if any(x is p.status for x in parts) and p.status else {},
                )
                w.apply(partial)
            w.settle()
        return w

    clean, crashed = drive(None), drive(crash_after)
    assert sorted(crashed.jobs) == sorted(clean.jobs) == ["r1-prepare", "r1-pretrain", "r1-pretrain-r1"]
    strip = lambda s: {k: v for k, v in s.items() if k != "conditions"}  # noqa: E731
    assert strip(crashed.status) == strip(clean.status)
    assert crashed.status["phase"] == "Succeeded"


def job_of(p):
    """The one PyTorchJob a plan creates."""
    (job,) = [o for o in p.create if o["kind"] == "PyTorchJob"]
    return job


def test_once_the_status_records_a_job_later_stages_and_retries_create_only_their_job() -> None:
    """RBAC creates are the apiserver's costliest requests: once per run, with its first job."""
    w = World(run_body(stages=["prepare", "pretrain"], retries=1))
    p = w.reconcile()
    assert [o["kind"] for o in p.create] == ["ServiceAccount", "PyTorchJob", "Role", "RoleBinding"]
    assert p.patch == ()
    assert [o["kind"] for o in w.reconcile().create] == []  # the job's own events: nothing twice
    w.finish("r1-prepare")
    assert [o["kind"] for o in w.reconcile().create] == ["PyTorchJob"]
    w.finish("r1-pretrain", outcome="Failed")
    assert [o["kind"] for o in w.reconcile().create] == ["PyTorchJob"]


def test_deleting_finished_jobs_does_not_recreate_the_rbac() -> None:
    """Finished jobs deleted (ttl, a user) leave the status's record: no RBAC creates again."""
    w = World(run_body(stages=["prepare", "pretrain"]))
    w.reconcile()
    w.finish("r1-prepare")
    w.reconcile()
    del w.jobs["r1-prepare"]
    assert [o["kind"] for o in w.reconcile().create] == []


START_STEPS = 5
"""The first plan of a run: ServiceAccount, job, Role, RoleBinding, the status."""


@pytest.mark.parametrize("crash_after", range(START_STEPS))
def test_an_operator_killed_at_any_step_of_a_run_start_leaves_nothing_missing(crash_after: int) -> None:
    """Only the first `crash_after` steps of the first plan happen; a new operator takes over: the
    run ends with its ServiceAccount, Role and RoleBinding (else the trainer's status writes get
    403 for the whole run), one job, and the status a crash-free start gives."""
    clean = World(run_body(stages=["prepare"]))
    clean.settle()
    w = World(run_body(stages=["prepare"]))
    first = w.plan()
    steps = [*first.create, *first.patch, first.status]
    assert len(steps) == START_STEPS
    done = steps[:crash_after]
    w.apply(
        Plan(
            create=tuple(x for x in done if isinstance(x, dict) and "kind" in x),
            patch=tuple(x for x in done if isinstance(x, tuple)),
            status=first.status if any(x is first.status for x in done) else {},
        )
    )
    w.settle()
    assert (
        sorted(w.rbac)
        == sorted(clean.rbac)
        == [
            ("Role", "r1-status-writer"),
            ("RoleBinding", "r1-status-writer"),
            ("ServiceAccount", "r1-trainer"),
        ]
    )
    assert list(w.jobs) == ["r1-prepare"]
    assert w.status == clean.status


# --- a job the apiserver refuses --------------------------------------------------------------------


def test_a_refused_job_is_said_once_tried_again_and_started_once_accepted() -> None:
    w = World(run_body(stages=["prepare", "pretrain"]))
    w.rejecting["r1-prepare"] = 'admission webhook "v.example" denied the request: no such runtime'
    p = w.reconcile()
    assert [o["kind"] for o in p.create] == ["ServiceAccount", "Role", "RoleBinding"]
    st = w.run["status"]
    assert (st["phase"], st["reason"], st["stage"]) == ("Pending", "JobRejected", "prepare")
    record = st["stages"]["prepare"]
    assert record["message"] == (
        'the apiserver refused to create PyTorchJob r1-prepare: admission webhook "v.example" denied '
        "the request: no such runtime"
    )
    assert [(t, r) for t, r, _ in w.events] == [("Warning", "StageWaiting")]
    for _ in range(3):  # every reconcile tries again; said once
        assert [o["metadata"]["name"] for o in w.plan().create if o["kind"] == "PyTorchJob"] == ["r1-prepare"]
        w.reconcile()
    assert len(w.events) == 1 and w.jobs == {}

    del w.rejecting["r1-prepare"]  # e.g. the runtime now exists
    w.reconcile()
    assert list(w.jobs) == ["r1-prepare"]
    assert [r for _, r, _ in w.events[1:]] == ["StageStarted"]
    st = w.run["status"]
    assert (st["phase"], st.get("reason"), st["stages"]["prepare"].get("reason")) == ("Pending", None, None)
