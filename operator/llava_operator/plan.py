"""Reconciliation as a pure function: (LlavaRun, observed children, now) -> Plan.

The one state machine of a LlavaRun, wherever it runs: the operator applies plans to
PyTorchJobs on a cluster, `llavarun local` to process groups on one machine. What differs
between the two is a `Backend` (backend.py); nothing here depends on the kind of child.

No I/O and no memory between calls: everything is derived from the run (spec + its own status
subtree) and the children that exist, so a restarted operator computes the same plan, and
applying a plan twice is harmless (creates hit 409, the status patch is a no-op).

Rules (docs/OPERATOR.md has the user-facing version):
- stages run in spec.stages order, one child per attempt, named `<run>-<stage>[-r<N>]`;
- a Succeeded child completes its stage and starts the next; a Failed one starts another attempt
  while the stage has failed at most spec.retries times, else the stage and the run fail (sticky);
- the run's objects (the backend's `run_objects`, e.g. the trainer's RBAC) are created with the
  first child, and again by every plan until the status records a child: children are created
  before the status is written, so an operator killed in between repeats them (409s), while the
  next reconcile of a healthy start, which reads the run afresh, creates nothing twice;
- an attempt none of whose processes has started is replaced by a new attempt when the spec now
  renders it differently; once one started, the attempt is never changed, except its suspension,
  and only when the user's spec.suspend differs from what we last applied to it (recorded on it),
  so suspension set by a queue (Kueue) is never overridden; a child suspended without
  spec.suspend is "Queued";
- stages are rendered when they start, so edits apply to stages (and attempts) not yet started;
  a stage removed from spec.stages is cancelled (its active child deleted); a stage inserted
  before one that has started is skipped;
- an attempt whose pods cannot be scheduled or started says why (its pods, read through the
  backend's selector: `waiting.py`), once per cause as an event; the capacity plan of each spec
  generation and the run's ETA are recorded (`estimate.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from .api import LlavaRun, Phase, Stage, StagePhase, StageStatus
from .api.status import timestamp
from .attempts import StageResult, StageWalker, Step
from .backend import Backend
from .children import Child, observe
from .conditions import (
    FAILED,
    REASON_INVALID_SPEC,
    STAGE_CANCELLED,
    Event,
    conditions,
    run_events,
    status_patch,
)
from .estimate import plan_events, run_eta, run_plan

_RUN_PHASE = {
    StagePhase.PENDING: Phase.PENDING,
    StagePhase.RUNNING: Phase.RUNNING,
    StagePhase.RETRYING: Phase.RUNNING,
    StagePhase.QUEUED: Phase.QUEUED,
    StagePhase.SUSPENDED: Phase.SUSPENDED,
    StagePhase.SUCCEEDED: Phase.SUCCEEDED,
    StagePhase.FAILED: Phase.FAILED,
}


@dataclass(frozen=True)
class Plan:
    """What to do, in order: create, patch, delete children; patch status; emit events."""

    create: tuple[dict[str, Any], ...] = ()
    patch: tuple[tuple[str, dict[str, Any]], ...] = ()
    """(child name, merge patch)."""
    delete: tuple[str, ...] = ()
    status: dict[str, Any] = field(default_factory=dict)
    """Merge patch of the plan's status subtree; empty when nothing changed."""
    events: tuple[Event, ...] = ()
    finished: tuple[StageResult, ...] = ()
    wants_pods: tuple[str, ...] = ()
    """Children whose pods would say why they failed or wait: list them and plan again."""
    phase: str = Phase.PENDING.value


def _records(status: Mapping[str, Any]) -> dict[str, StageStatus]:
    """The plan's per-stage records; an unreadable one counts as absent (we rewrite it)."""
    out = {}
    for name, raw in ((status.get("stages") or {}) or {}).items():
        if raw:
            try:
                out[name] = StageStatus.model_validate(raw)
            except ValidationError:
                continue
    return out


def refused(body: Mapping[str, Any], problems: Iterable[str], now: datetime) -> Plan:
    """A run that cannot be run as written: report why (condition Failed, reason InvalidSpec, one
    Warning event), touch nothing. Fixed by editing the spec, or the operator's configuration."""
    status = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    failure = (REASON_INVALID_SPEC, f"spec is invalid: {'; '.join(problems)}"[:2048])
    conds = conditions(
        status.get("conditions") or [], Phase.FAILED, failure, None, timestamp(now), generation
    )
    desired = {
        "observedGeneration": generation,
        "phase": Phase.FAILED.value,
        "reason": REASON_INVALID_SPEC,
        "eta": None,
        "conditions": conds,
    }
    events = []
    old_failed = {c.get("type"): c for c in status.get("conditions") or []}.get(FAILED) or {}
    if (old_failed.get("reason"), old_failed.get("message")) != failure:
        events.append(Event(REASON_INVALID_SPEC, failure[1], "Warning"))
    return Plan(status=status_patch(status, desired), events=tuple(events), phase=Phase.FAILED.value)


def _problems(error: ValidationError) -> list[str]:
    return [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors(include_url=False)]


def plan(
    body: Mapping[str, Any],
    children: Iterable[Mapping[str, Any]],
    now: datetime,
    *,
    backend: Backend,
    pods: Mapping[str, list[Mapping[str, Any]]] | None = None,
    rejected: Mapping[str, str] | None = None,
) -> Plan:
    """The next step for one LlavaRun (body as read from the apiserver) given its children.

    `pods` maps a failed child's name to its pods, when the caller listed them because the
    previous plan asked (`wants_pods`); it only improves failure messages. A caller that never
    lists pods passes {}. `rejected` maps a child the apiserver just refused to create to why: the
    stage says so (reason JobRejected, one Warning) and the next plan creates it again.
    """
    try:
        run = LlavaRun.from_k8s({k: v for k, v in body.items() if k != "status"})
    except ValidationError as err:
        return refused(body, _problems(err), now)
    if problems := backend.refusals(run):
        return refused(body, problems, now)
    status = body.get("status") or {}
    records = _records(status)
    observed = observe(children, run.metadata.uid, backend)
    kids: dict[Stage, dict[int, Child]] = {}
    for child in observed:
        kids.setdefault(child.stage, {})[child.attempt] = child
    planner = StageWalker(run, now, backend, pods, status.get("progress"), rejected)

    stages = list(run.spec.stages)
    started = [i for i, s in enumerate(stages) if s.value in records or kids.get(s)]
    # A stage inserted before one that already started is skipped: stages never run out of order.
    effective = [s for i, s in enumerate(stages) if not started or i >= started[-1] or i in started]
    steps: dict[Stage, Step] = {}
    current: Stage | None = None
    for stage in effective:
        step = planner.stage(stage, records.get(stage.value), kids.get(stage, {}))
        steps[stage] = step
        if step.phase is not StagePhase.SUCCEEDED:
            current = stage
            break

    # Stages removed from spec.stages are cancelled: their active children go, their records too.
    delete = [name for st in steps.values() for name in st.delete]
    events: list[Event] = []
    removed = {s for s in Stage if s not in stages}
    for stage in sorted(removed, key=list(Stage).index):
        active = [k.name for k in kids.get(stage, {}).values() if not k.state.phase.finished]
        delete += active
        if active:
            events.append(
                Event(
                    STAGE_CANCELLED,
                    f"stage {stage.value} removed from spec.stages: deleted {', '.join(active)}",
                    "Warning",
                )
            )

    last = current or effective[-1]
    step = steps[last]
    phase = _RUN_PHASE[step.phase]
    create = [obj for st in steps.values() for obj in st.create]
    patch = [p for st in steps.values() for p in st.patch]
    run_objects = backend.run_objects(run)
    recorded = any(r.job for r in records.values())
    if run_objects and not recorded and phase not in (Phase.SUCCEEDED, Phase.FAILED) and step.record.job:
        create = [*run_objects.before, *create, *run_objects.after]
    failure = (step.failure_reason, step.record.message or "") if step.phase is StagePhase.FAILED else None
    waiting = None
    if step.record.reason and step.phase is not StagePhase.QUEUED:
        waiting = (step.record.reason, f"stage {last.value} waits: {step.record.message}")
    generation = run.metadata.generation
    conds = conditions(
        status.get("conditions") or [], phase, failure, step.record.job, planner.now, generation, waiting
    )
    stage_records: dict[str, StageStatus | None] = {s.value: st.record for s, st in steps.items()}
    stage_records.update({s.value: None for s in removed if s.value in (status.get("stages") or {})})
    capacity = status.get("plan")
    if phase not in (Phase.SUCCEEDED, Phase.FAILED) and (capacity or {}).get("generation", -1) != generation:
        old, capacity = capacity, run_plan(run)
        events += plan_events(old, capacity)
    eta = None
    if step.phase is StagePhase.RUNNING and not step.record.reason:
        later = effective[effective.index(last) + 1 :]
        progress = status.get("progress") or {}
        attempt = step.record.attempts - 1
        eta = run_eta(capacity or {}, progress, last, attempt, step.started_at, later)
    desired = {
        "observedGeneration": generation,
        "phase": phase.value,
        "reason": failure[0] if failure else step.record.reason,
        "stage": last.value,
        "currentJob": step.record.job,
        "stages": stage_records,
        "conditions": conds,
        "plan": capacity,
        "eta": eta,
    }
    for st in steps.values():
        events += st.events
    events += run_events(status.get("conditions") or [], conds, status.get("phase"), phase, last.value)
    return Plan(
        create=tuple(create),
        patch=tuple(patch),
        delete=tuple(delete),
        status=status_patch(status, desired),
        events=tuple(events),
        finished=tuple(r for st in steps.values() for r in st.finished),
        wants_pods=tuple(n for st in steps.values() for n in st.wants_pods),
        phase=phase.value,
    )
