"""plan(): the capacity plan recorded in status.plan (per spec generation; a Warning when a stage
does not fit; why when there is none) and the run's ETA in status.eta (the plan, then the
trainer's measured ETA), driven through the in-memory apiserver (tests/plan_world.py)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from llava_operator.api import LlavaRun
from llava_operator.api.status import parse_time
from llava_operator.capacity.inputs import plan_for_run
from llava_operator.estimate import plan_lines

from tests.plan_world import T0, World, run_body, stamp

TRAINING = ["pretrain", "finetune"]


def minute(when: datetime) -> str:
    """A time as status.eta writes it: to the nearest minute."""
    return stamp((when + timedelta(seconds=30)).replace(second=0))


def seconds(w: World, stage: str) -> int:
    return w.status["plan"]["stages"][stage]["seconds"]


def does_not_fit(w: World) -> list[str]:
    return [m for _, reason, m in w.events if reason == "StageDoesNotFit"]


def test_the_plan_is_recorded_when_the_run_starts_with_capacitys_numbers() -> None:
    body = run_body()
    w = World(body)
    w.reconcile()
    recorded = w.status["plan"]
    expected = plan_for_run(LlavaRun.from_k8s(body))
    assert recorded["generation"] == 1
    assert (recorded["model"], recorded["device"]) == (expected["model"], expected["device"]["model"])
    assert recorded["deviceSource"] == expected["device"]["source"]
    assert list(recorded["stages"]) == TRAINING and recorded["fits"] is True
    for name, stage in recorded["stages"].items():
        planned = expected["stages"][name]
        assert stage["seconds"] == round(planned["hours"] * 3600) > 0
        assert (stage["gpuHours"], stage["devices"], stage["fits"]) == (
            planned["gpuHours"],
            planned["devices"],
            True,
        )
        assert (stage["memoryGib"], stage["deviceMemoryGib"]) == (
            planned["memoryGiB"]["total"],
            planned["memoryGiB"]["capacity"],
        )
    assert recorded["seconds"] == sum(s["seconds"] for s in recorded["stages"].values())
    assert recorded["gpuHours"] == expected["gpuHours"]
    assert does_not_fit(w) == []


def test_the_plan_is_made_again_only_when_the_spec_changes() -> None:
    w = World(run_body())
    w.reconcile()
    w.running("r1-prepare")
    assert "plan" not in w.reconcile().status
    before = seconds(w, "finetune")
    w.edit(finetune={"epochs": 2})
    w.reconcile()
    assert w.status["plan"]["generation"] == 2
    assert seconds(w, "finetune") > before


def test_a_stage_that_does_not_fit_is_warned_once_with_the_cheapest_fix() -> None:
    w = World(run_body(finetune={"gradientCheckpointing": False}))
    w.reconcile()
    plan = w.status["plan"]
    finetune = plan["stages"]["finetune"]
    assert plan["fits"] is False and finetune["fits"] is False
    assert finetune["memoryGib"] > finetune["deviceMemoryGib"]
    assert finetune["fix"].startswith("spec.finetune.gradientCheckpointing: true (")
    assert does_not_fit(w) == [
        f"stage finetune does not fit: {finetune['memoryGib']:.1f} GiB per device estimated, "
        f"H100 SXM 80GB has 79.1 GiB; it fits with {finetune['fix']}"
    ]
    assert [t for t, r, _ in w.events if r == "StageDoesNotFit"] == ["Warning"]
    assert w.jobs, "a plan never holds the run up"

    w.edit(pretrain={"learningRate": 2e-3})  # a new generation, the same verdict: no new Warning
    w.reconcile()
    assert w.status["plan"]["generation"] == 2 and len(does_not_fit(w)) == 1
    w.edit(finetune={"microBatchSize": 8})  # planned differently, still too big: said again
    w.reconcile()
    assert len(does_not_fit(w)) == 2
    w.edit(finetune={"gradientCheckpointing": True})
    w.reconcile()
    assert w.status["plan"]["fits"] is True and "fix" not in w.status["plan"]["stages"]["finetune"]
    assert len(does_not_fit(w)) == 2


def test_a_model_without_built_in_sizes_records_why_and_the_run_goes_on() -> None:
    w = World(run_body(paths={"languageModel": "models/tiny-llm"}))
    w.reconcile()
    assert w.status["plan"] == {
        "generation": 1,
        "unavailable": "as `llavarun plan FILE` says: no built-in sizes for models/tiny-llm (known: "
        "vicuna-7b-v1.5, vicuna-13b-v1.5): give --data-dir to read its config.json",
    }
    assert "r1-prepare" in w.jobs and w.status["phase"] == "Pending"
    w.edit(paths={"languageModel": "checkpoints/vicuna-7b-v1.5"})
    w.reconcile()
    assert "unavailable" not in w.status["plan"] and w.status["plan"]["stages"]["pretrain"]["seconds"] > 0


def test_the_eta_counts_the_plan_from_the_attempts_start_then_the_trainers_measure() -> None:
    w = World(run_body(stages=TRAINING))
    w.reconcile()
    assert "eta" not in w.status, "no ETA while the stage waits to start"
    w.now += timedelta(minutes=3)
    w.running("r1-pretrain")
    w.reconcile()
    planned = T0 + timedelta(minutes=3, seconds=seconds(w, "pretrain") + seconds(w, "finetune"))
    assert w.status["eta"] == minute(planned)

    w.now += timedelta(minutes=10)
    w.progress("pretrain", attempt=1, etaSeconds=60)  # another attempt's report: not this one's
    w.reconcile()
    assert w.status["eta"] == minute(planned)
    w.progress("pretrain", attempt=0, step=100, etaSeconds=1234)
    w.reconcile()
    measured = w.now + timedelta(seconds=1234 + seconds(w, "finetune"))
    assert w.status["eta"] == minute(measured)
    assert w.reconcile().status == {}, "the same report, the same ETA: no write"

    w.finish("r1-pretrain")
    w.reconcile()
    assert "eta" not in w.status
    w.running("r1-finetune")
    w.progress("finetune", attempt=0, etaSeconds=600)
    w.reconcile()
    assert w.status["eta"] == minute(w.now + timedelta(seconds=600))
    w.finish("r1-finetune")
    w.reconcile()
    assert w.status["phase"] == "Succeeded" and "eta" not in w.status


def test_no_eta_where_something_on_the_way_has_no_estimate() -> None:
    w = World(run_body())
    w.reconcile()
    w.running("r1-prepare")
    w.reconcile()
    assert w.status["phase"] == "Running" and "eta" not in w.status, "prepare is not planned"

    unknown = World(run_body(stages=TRAINING, paths={"languageModel": "models/tiny-llm"}))
    unknown.reconcile()
    unknown.running("r1-pretrain")
    unknown.progress("pretrain", attempt=0, etaSeconds=600)
    unknown.reconcile()
    assert "eta" not in unknown.status, "finetune comes next and has no plan"

    evaluate = World(run_body(stages=["evaluate"]))
    evaluate.reconcile()
    evaluate.running("r1-evaluate")
    evaluate.reconcile()
    assert "eta" not in evaluate.status
    evaluate.progress("evaluate", attempt=0, etaSeconds=90)
    evaluate.reconcile()
    assert evaluate.status["eta"] == minute(evaluate.now + timedelta(seconds=90))


def test_a_finished_run_is_not_planned_afterwards() -> None:
    w = World(run_body(stages=["prepare"]))
    w.reconcile()
    w.finish("r1-prepare")
    w.reconcile()
    del w.run["status"]["plan"]
    w.reconcile()
    assert w.status["phase"] == "Succeeded" and "plan" not in w.status


def test_the_plan_as_llavarun_local_prints_it() -> None:
    w = World(run_body(finetune={"gradientCheckpointing": False}))
    w.reconcile()
    plan: dict[str, Any] = w.status["plan"]
    lines = plan_lines(plan)
    assert lines[0] == (
        "plan: vicuna-13b-v1.5 + clip-vit-large-patch14-336 on H100 SXM 80GB; device from "
        f"{plan['deviceSource']}"
    )
    pretrain = plan["stages"]["pretrain"]
    assert lines[1] == (
        f"  pretrain: {pretrain['seconds'] / 3600:.1f} h, {pretrain['gpuHours']:g} GPU-hours on 8 devices "
        f"at 35% MFU; fits ({pretrain['memoryGib']:.1f} of 79.1 GiB per device)"
    )
    assert "DOES NOT FIT" in lines[2] and lines[2].endswith(
        f"; fits with {plan['stages']['finetune']['fix']}"
    )
    assert lines[3].startswith("  all training stages: ")
    assert plan_lines({"unavailable": "no sizes"}) == ["plan: unavailable: no sizes"]
    assert parse_time(minute(T0)) == T0
