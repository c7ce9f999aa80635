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
  first child and again by every plan until a child records that they exist;
- an attempt none of whose processes has started is replaced by a new attempt when the spec now
  renders it differently; once one started, the attempt is never changed, except its suspension,
  and only when the user's spec.suspend differs from what we last applied to it (recorded on it),
  so suspension set by a queue (Kueue) is never overridden; a child suspended without
  spec.suspend is "Queued";
- stages are rendered when they start, so edits apply to stages (and attempts) not yet started;
  a stage removed from spec.stages is cancelled (its active child deleted); a stage inserted
  before one that has started is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from .api import LlavaRun, Phase, Stage, StagePhase, StageStatus
from .api.status import seconds_between, timestamp
from .backend import FAILURES_ANNOTATION, RUN_OBJECTS_ANNOTATION, SPEC_HASH_ANNOTATION, Backend, annotations
from .children import Child, observe
from .conditions import (
    ATTEMPT_REPLACED,
    FAILED,
    REASON_BACKOFF_LIMIT,
    REASON_INVALID_SPEC,
    REASON_STAGE_FAILED,
    STAGE_CANCELLED,
    STAGE_FAILED,
    STAGE_RETRYING,
    STAGE_STARTED,
    STAGE_SUCCEEDED,
    Event,
    conditions,
    run_events,
    status_patch,
)
from .jobstate import JobPhase
from .naming import job_name

_RUN_PHASE = {
    StagePhase.PENDING: Phase.PENDING,
    StagePhase.RUNNING: Phase.RUNNING,
    StagePhase.RETRYING: Phase.RUNNING,
    StagePhase.QUEUED: Phase.QUEUED,
    StagePhase.SUSPENDED: Phase.SUSPENDED,
    StagePhase.SUCCEEDED: Phase.SUCCEEDED,
    StagePhase.FAILED: Phase.FAILED,
}
MARK_RUN_OBJECTS = {"metadata": {"annotations": {RUN_OBJECTS_ANNOTATION: "true"}}}


@dataclass(frozen=True)
class StageResult:
    """A stage (or its last attempt) that finished in this plan, for the duration metric."""

    stage: str
    result: str
    seconds: float


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
    """Failed children whose pods would make a better failure message: list them and plan again."""
    phase: str = Phase.PENDING.value


@dataclass
class _Step:
    """The outcome of looking at one stage."""

    phase: StagePhase
    record: StageStatus
    create: list[dict[str, Any]] = field(default_factory=list)
    patch: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    finished: list[StageResult] = field(default_factory=list)
    wants_pods: list[str] = field(default_factory=list)
    failure_reason: str | None = None


def _seconds_between(start: str | None, end: str | None) -> float:
    return seconds_between(start, end) or 0.0


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


class _Planner:
    """Walks the stages of one run; a class only to share the run, the clock and the backend."""

    def __init__(self, run: LlavaRun, now: datetime, backend: Backend, pods: Any, marked: bool) -> None:
        self.run = run
        self.now = timestamp(now)
        self.backend = backend
        self.pods = pods
        self.marked = marked
        """A child already records that the run's objects exist: new children inherit the record."""

    def render(self, stage: Stage, attempt: int, failures: int) -> dict[str, Any]:
        child = self.backend.render(self.run, stage, attempt)
        notes = child["metadata"].setdefault("annotations", {})
        notes[FAILURES_ANNOTATION] = str(failures)
        if self.marked:
            notes[RUN_OBJECTS_ANNOTATION] = "true"
        return child

    def start(self, stage: Stage, attempt: int, rec: StageStatus | None, failures: int) -> _Step:
        """Create attempt `attempt` of a stage that has failed `failures` times."""
        if self.run.spec.suspend:
            phase = StagePhase.SUSPENDED
        else:
            phase = StagePhase.PENDING if failures == 0 else StagePhase.RETRYING
        record = StageStatus(
            phase=phase,
            job=job_name(self.run.name, stage, attempt),
            attempts=attempt + 1,
            start_time=(rec.start_time if rec else None) or self.now,
            message=rec.message if rec else None,
        )
        return _Step(phase=phase, record=record, create=[self.render(stage, attempt, failures)])

    def stage(self, stage: Stage, rec: StageStatus | None, kids: dict[int, Child]) -> _Step:
        """Advance one stage by one transition at most."""
        done = [k for k in kids.values() if k.state.phase is JobPhase.SUCCEEDED]
        if done or (rec and rec.phase is StagePhase.SUCCEEDED):
            return self.succeeded(stage, rec, max(done, key=lambda k: k.attempt) if done else None)
        if rec and rec.phase is StagePhase.FAILED:
            return _Step(phase=StagePhase.FAILED, record=rec, failure_reason=self.exhausted_reason())
        attempt = max((rec.attempts - 1) if rec else -1, max(kids, default=-1))
        if attempt < 0:
            step = self.start(stage, 0, None, 0)
            step.events.append(Event(STAGE_STARTED, f"stage {stage.value} started as job {step.record.job}"))
            return step
        kid = kids.get(attempt)
        if kid is None:
            # Created but not observed yet (or deleted behind our back): create again; 409 is fine.
            earlier = [
                k.failures + (k.state.phase is JobPhase.FAILED) for k in kids.values() if k.attempt < attempt
            ]
            step = self.start(stage, attempt, rec, max(earlier, default=0))
            if rec:
                step.record, step.phase = rec, rec.phase
            return step
        if kid.state.phase is JobPhase.FAILED:
            return self.failed(stage, rec, kid)
        if not kid.state.started and kid.spec_hash is not None:
            fresh = annotations(self.backend.render(self.run, stage, kid.attempt)).get(SPEC_HASH_ANNOTATION)
            if fresh != kid.spec_hash:
                return self.replace(stage, rec, kid)
        return self.active(rec, kid)

    def succeeded(self, stage: Stage, rec: StageStatus | None, kid: Child | None) -> _Step:
        if rec and rec.phase is StagePhase.SUCCEEDED:
            return _Step(phase=StagePhase.SUCCEEDED, record=rec)
        assert kid is not None
        start = (rec.start_time if rec else None) or kid.created or self.now
        end = kid.state.completion_time or self.now
        record = StageStatus(
            phase=StagePhase.SUCCEEDED,
            job=kid.name,
            attempts=max(rec.attempts if rec else 0, kid.attempt + 1),
            start_time=start,
            completion_time=end,
        )
        step = _Step(phase=StagePhase.SUCCEEDED, record=record)
        took = _seconds_between(start, end)
        step.events.append(
            Event(STAGE_SUCCEEDED, f"stage {stage.value} succeeded (job {kid.name}, {took:.0f}s)")
        )
        step.finished.append(StageResult(stage.value, "succeeded", took))
        return step

    def exhausted_reason(self) -> str:
        return REASON_BACKOFF_LIMIT if self.run.spec.retries else REASON_STAGE_FAILED

    def failure(self, kid: Child) -> str:
        """Why an attempt failed, naming the job, and what to read (the backend knows where)."""
        state = kid.state
        detail = (state.message or state.reason or "failed").strip().rstrip(".")
        look = self.backend.where_to_look(
            kid.name, state, self.run.namespace, (self.pods or {}).get(kid.name, [])
        )
        return (f"job {kid.name} failed: {detail}" + (f"; {look}" if look else ""))[:4096]

    def failed(self, stage: Stage, rec: StageStatus | None, kid: Child) -> _Step:
        why = self.failure(kid)
        wants = [kid.name] if self.pods is None else []
        retries = self.run.spec.retries
        tries = kid.failures + 1
        attempt_start = kid.created or self.now
        attempt_end = kid.state.completion_time or self.now
        if kid.failures < retries:
            step = self.start(stage, kid.attempt + 1, rec, tries)
            step.record = step.record.model_copy(update={"message": why})
            step.events.append(
                Event(
                    STAGE_RETRYING,
                    f"stage {stage.value} attempt {tries}/{retries + 1} failed, starting attempt "
                    f"{tries + 1} as job {step.record.job} (resumes from the newest checkpoint): {why}",
                    "Warning",
                )
            )
            step.wants_pods = wants
            step.finished.append(
                StageResult(stage.value, "retried", _seconds_between(attempt_start, attempt_end))
            )
            return step
        record = StageStatus(
            phase=StagePhase.FAILED,
            job=kid.name,
            attempts=kid.attempt + 1,
            start_time=(rec.start_time if rec else None) or attempt_start,
            completion_time=attempt_end,
            message=why,
        )
        step = _Step(phase=StagePhase.FAILED, record=record, failure_reason=self.exhausted_reason())
        step.events.append(
            Event(STAGE_FAILED, f"stage {stage.value} failed after {tries} attempt(s): {why}", "Warning")
        )
        step.wants_pods = wants
        step.finished.append(
            StageResult(stage.value, "failed", _seconds_between(record.start_time, attempt_end))
        )
        return step

    def replace(self, stage: Stage, rec: StageStatus | None, kid: Child) -> _Step:
        """The spec changed under an attempt that has not started: a new attempt takes its place."""
        step = self.start(stage, kid.attempt + 1, rec, kid.failures)
        step.delete.append(kid.name)
        step.events.append(
            Event(
                ATTEMPT_REPLACED,
                f"stage {stage.value}: job {kid.name} had not started and the spec changed "
                f"(generation {self.run.metadata.generation}); replaced by job {step.record.job}",
            )
        )
        return step

    def active(self, rec: StageStatus | None, kid: Child) -> _Step:
        """A running, pending or suspended attempt; flip its suspension if the user changed theirs."""
        want = self.run.spec.suspend
        patch = []
        suspended = kid.state.suspended
        if kid.applied_suspend is not None and kid.applied_suspend != want:
            patch.append((kid.name, self.backend.suspend_patch(want)))
            suspended = want
        if suspended:
            phase = StagePhase.SUSPENDED if want else StagePhase.QUEUED
        elif kid.state.phase in (JobPhase.RUNNING, JobPhase.RESTARTING):
            phase = StagePhase.RUNNING
        else:
            phase = StagePhase.PENDING if kid.failures == 0 else StagePhase.RETRYING
        record = StageStatus(
            phase=phase,
            job=kid.name,
            attempts=kid.attempt + 1,
            start_time=(rec.start_time if rec else None) or kid.created or self.now,
            message=rec.message if rec else None,
        )
        return _Step(phase=phase, record=record, patch=patch)


def _invalid(body: Mapping[str, Any], error: ValidationError, now: datetime) -> Plan:
    """A run that cannot be read: report it, touch nothing; fixed by editing the spec."""
    status = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors(include_url=False)
    )[:2048]
    failure = (REASON_INVALID_SPEC, f"spec is invalid: {problems}")
    conds = conditions(
        status.get("conditions") or [], Phase.FAILED, failure, None, timestamp(now), generation
    )
    desired = {"observedGeneration": generation, "phase": Phase.FAILED.value, "conditions": conds}
    events = []
    old_failed = {c.get("type"): c for c in status.get("conditions") or []}.get(FAILED) or {}
    if old_failed.get("reason") != REASON_INVALID_SPEC:
        events.append(Event(REASON_INVALID_SPEC, failure[1], "Warning"))
    return Plan(status=status_patch(status, desired), events=tuple(events), phase=Phase.FAILED.value)


def plan(
    body: Mapping[str, Any],
    children: Iterable[Mapping[str, Any]],
    now: datetime,
    *,
    backend: Backend,
    pods: Mapping[str, list[Mapping[str, Any]]] | None = None,
) -> Plan:
    """The next step for one LlavaRun (body as read from the apiserver) given its children.

    `pods` maps a failed child's name to its pods, when the caller listed them because the
    previous plan asked (`wants_pods`); it only improves failure messages. A caller that never
    lists pods passes {}.
    """
    try:
        run = LlavaRun.from_k8s({k: v for k, v in body.items() if k != "status"})
    except ValidationError as err:
        return _invalid(body, err, now)
    status = body.get("status") or {}
    records = _records(status)
    observed = observe(children, run.metadata.uid, backend)
    kids: dict[Stage, dict[int, Child]] = {}
    for child in observed:
        kids.setdefault(child.stage, {})[child.attempt] = child
    marked = any(k.has_run_objects for k in observed)
    planner = _Planner(run, now, backend, pods, marked)

    stages = list(run.spec.stages)
    started = [i for i, s in enumerate(stages) if s.value in records or kids.get(s)]
    # A stage inserted before one that already started is skipped: stages never run out of order.
    effective = [s for i, s in enumerate(stages) if not started or i >= started[-1] or i in started]
    steps: dict[Stage, _Step] = {}
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
    if run_objects and not marked and phase not in (Phase.SUCCEEDED, Phase.FAILED) and step.record.job:
        # Until a child records them, (re)create the run's objects around the current child and
        # record them on it: an operator killed between any two of these steps repeats them.
        create = [*run_objects.before, *create, *run_objects.after]
        patch.append((step.record.job, MARK_RUN_OBJECTS))
    failure = (step.failure_reason, step.record.message or "") if step.phase is StagePhase.FAILED else None
    generation = run.metadata.generation
    conds = conditions(
        status.get("conditions") or [], phase, failure, step.record.job, planner.now, generation
    )
    stage_records: dict[str, StageStatus | None] = {s.value: st.record for s, st in steps.items()}
    stage_records.update({s.value: None for s in removed if s.value in (status.get("stages") or {})})
    desired = {
        "observedGeneration": generation,
        "phase": phase.value,
        "stage": last.value,
        "currentJob": step.record.job,
        "stages": stage_records,
        "conditions": conds,
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
