"""What the status says about time and memory before and while a run runs (pure).

- `status.plan`: capacity's plan of the training stages from the spec alone (the recipe's model
  sizes by the language model's name, its typical token lengths, the device from the placement or
  the profile). Nothing is read: the operator cannot see the data volume, and `llavarun local`
  records the same plan for the same spec. A spec the planner cannot size records why instead;
  the run is never held up by its plan.
- `status.eta`: when the run should end, from the running stage's measured throughput once the
  trainer reports an ETA, else from the plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from .api import LlavaRun, Stage
from .api.spec import TRAINING_STAGES
from .api.status import RunPlan, StagePlan, parse_time, timestamp
from .capacity.inputs import plan_for_run
from .conditions import STAGE_DOES_NOT_FIT, Event


def _fix(stage: Mapping[str, Any]) -> str | None:
    fix = stage.get("fix")
    if not fix:
        return None
    return f"{fix['change']} ({fix['memoryGiB']['total']:.1f} GiB per device on {fix['devices']} devices)"


def run_plan(run: LlavaRun) -> dict[str, Any]:
    """`status.plan` for the run's spec (Kubernetes JSON)."""
    generation = run.metadata.generation
    try:
        planned = plan_for_run(run)
    except ValueError as err:  # a model without built-in sizes, a profile without a device
        return RunPlan(generation=generation, unavailable=f"as `llavarun plan FILE` says: {err}").to_k8s()
    except Exception as err:  # advisory: a planner bug must not stop the run
        return RunPlan(generation=generation, unavailable=f"the capacity plan failed: {err!r}").to_k8s()
    stages = {
        name: StagePlan(
            seconds=round(st["hours"] * 3600),
            gpu_hours=st["gpuHours"],
            devices=st["devices"],
            fits=st["fits"],
            memory_gib=st["memoryGiB"]["total"],
            device_memory_gib=st["memoryGiB"]["capacity"],
            mfu=st["mfu"],
            fix=_fix(st),
        )
        for name, st in planned["stages"].items()
    }
    return RunPlan.model_validate(
        {
            "generation": generation,
            "model": planned["model"],
            "device": planned["device"]["model"],
            "device_source": planned["device"]["source"],
            "fits": all(s.fits for s in stages.values()),
            "seconds": sum(s.seconds for s in stages.values()),
            "gpu_hours": planned["gpuHours"],
            "stages": stages,
        }
    ).to_k8s()


def plan_events(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[Event]:
    """A Warning per training stage that does not fit, when the plan says so anew (first plan, or
    a spec change that planned the stage differently)."""
    before = (old or {}).get("stages") or {}
    events = []
    for name, stage in (new.get("stages") or {}).items():
        if stage["fits"] or before.get(name) == stage:
            continue
        fix = stage.get("fix")
        events.append(
            Event(
                STAGE_DOES_NOT_FIT,
                f"stage {name} does not fit: {stage['memoryGib']:.1f} GiB per device estimated, "
                f"{new.get('device')} has {stage['deviceMemoryGib']:g} GiB; "
                + (f"it fits with {fix}" if fix else "no single change fits (llavarun plan shows the parts)"),
                "Warning",
            )
        )
    return events


def _measured_end(progress: Mapping[str, Any], stage: Stage, attempt: int) -> datetime | None:
    """The end the trainer's own ETA gives, when its latest progress is this attempt's."""
    if progress.get("stage") != stage.value or progress.get("attempt") not in (None, attempt):
        return None
    reported, seconds = parse_time(progress.get("lastUpdate")), progress.get("etaSeconds")
    if reported is None or seconds is None:
        return None
    return reported + timedelta(seconds=seconds)


def run_eta(
    plan: Mapping[str, Any],
    progress: Mapping[str, Any],
    stage: Stage,
    attempt: int,
    attempt_start: str | None,
    later: Iterable[Stage],
) -> str | None:
    """When the run should end, `stage` (attempt `attempt`, started at `attempt_start`) running
    and `later` to come; None when something on the way has no estimate."""
    planned = plan.get("stages") or {}
    end = _measured_end(progress, stage, attempt)
    if end is None:
        seconds = (planned.get(stage.value) or {}).get("seconds")
        start = parse_time(attempt_start)
        if seconds is None or start is None:
            return None
        end = start + timedelta(seconds=seconds)
    for next_stage in later:
        if next_stage in TRAINING_STAGES:
            if next_stage.value not in planned:
                return None
            end += timedelta(seconds=planned[next_stage.value]["seconds"])
    minute = end.replace(second=0, microsecond=0) + timedelta(minutes=end.second >= 30)
    return timestamp(minute)


def plan_lines(plan: Mapping[str, Any]) -> list[str]:
    """`status.plan` as a person reads it (what `llavarun local` prints before it starts)."""
    if plan.get("unavailable"):
        return [f"plan: unavailable: {plan['unavailable']}"]
    lines = [f"plan: {plan.get('model')} on {plan.get('device')}; device from {plan.get('deviceSource')}"]
    for name, stage in (plan.get("stages") or {}).items():
        verdict = "fits" if stage["fits"] else "DOES NOT FIT"
        lines.append(
            f"  {name}: {stage['seconds'] / 3600:.1f} h, {stage['gpuHours']:g} GPU-hours on "
            f"{stage['devices']} devices at {stage['mfu']:g}% MFU; {verdict} "
            f"({stage['memoryGib']:.1f} of {stage['deviceMemoryGib']:g} GiB per device)"
            + (f"; fits with {stage['fix']}" if stage.get("fix") else "")
        )
    lines.append(
        f"  all training stages: {plan.get('seconds', 0) / 3600:.1f} h, {plan.get('gpuHours', 0):g} GPU-hours"
    )
    return lines
