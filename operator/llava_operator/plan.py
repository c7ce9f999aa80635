"""Reconciliation as a pure function: (LlavaRun, observed children, now) -> Plan.

No I/O and no memory between calls: everything is derived from the run (spec + the operator's
own status subtree) and the child jobs that exist, so a restarted operator computes the same
plan, and applying a plan twice is harmless (creates hit 409, the status patch is a no-op).

Rules (docs/OPERATOR.md has the user-facing version):
- stages run in spec.stages order, one child job per attempt, named `<run>-<stage>[-r<N>]`;
- a Succeeded child completes its stage and starts the next; a Failed one starts attempt N+1
  while N < spec.retries, else the stage and the run fail (sticky);
- children are created once and never updated, except the current child's
  `runPolicy.suspend`, and only when the user's spec.suspend differs from what we last applied
  to that child (recorded on it), so suspension set by Kueue is never overridden;
- a child suspended without spec.suspend is "Queued";
- stages are rendered when they start, so edits apply to stages (and attempts) not yet started;
  a stage removed from spec.stages is cancelled (its active job deleted); a stage inserted before
  one that has started is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from .api import LlavaRun, Phase, Stage, StagePhase, StageStatus
from .backend import PYTORCHJOB, Backend, applied_suspend
from .jobstate import JobPhase, JobState, describe_failed_pod, failed_pod_hint
from .naming import LABEL_ATTEMPT, LABEL_STAGE, job_name
from .render import render_rbac

# Condition types, summary first.
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
QUEUED = "Queued"
CONDITION_TYPES = (SUCCEEDED, FAILED, SUSPENDED, QUEUED)

# Machine-readable reasons of Failed=True.
REASON_STAGE_FAILED = "StageFailed"
"""The stage failed and spec.retries is 0."""
REASON_BACKOFF_LIMIT = "BackoffLimitExceeded"
"""The stage failed spec.retries + 1 times."""
REASON_INVALID_SPEC = "InvalidSpec"
"""The apiserver accepted the object but the operator cannot read it (e.g. a stricter rule)."""

# Event reasons, one per transition.
STAGE_STARTED = "StageStarted"
STAGE_SUCCEEDED = "StageSucceeded"
STAGE_RETRYING = "StageRetrying"
STAGE_FAILED = "StageFailed"
STAGE_CANCELLED = "StageCancelled"
RUN_SUCCEEDED = "RunSucceeded"
EVENT_SUSPENDED = "Suspended"
EVENT_RESUMED = "Resumed"
EVENT_QUEUED = "Queued"

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
class Event:
    """A Kubernetes Event on the LlavaRun."""

    reason: str
    message: str
    type: str = "Normal"


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
    """Merge patch of the operator's status subtree; empty when nothing changed."""
    events: tuple[Event, ...] = ()
    finished: tuple[StageResult, ...] = ()
    wants_pods: tuple[str, ...] = ()
    """Failed children whose pods would make a better failure message: list them and plan again."""
    phase: str = Phase.PENDING.value


@dataclass(frozen=True)
class Child:
    """One observed child job of the run."""

    name: str
    stage: Stage
    attempt: int
    state: JobState
    created: str | None
    applied_suspend: bool | None


@dataclass
class _Step:
    """The outcome of looking at one stage."""

    phase: StagePhase
    record: StageStatus
    create: list[dict[str, Any]] = field(default_factory=list)
    patch: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    finished: list[StageResult] = field(default_factory=list)
    wants_pods: list[str] = field(default_factory=list)
    failure_reason: str | None = None


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC with seconds, as Kubernetes writes times."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds_between(start: str | None, end: str | None) -> float:
    if not start or not end:
        return 0.0
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return max(0.0, (parse(end) - parse(start)).total_seconds())


def observe(children: Iterable[Mapping[str, Any]], uid: str | None, backend: Backend) -> list[Child]:
    """Children owned by this run (a same-named predecessor's children are still being collected)."""
    out = []
    for child in children:
        meta = child.get("metadata") or {}
        owners = meta.get("ownerReferences") or []
        if uid and not any(o.get("uid") == uid and o.get("controller") for o in owners):
            continue
        labels = meta.get("labels") or {}
        try:
            stage, attempt = Stage(labels[LABEL_STAGE]), int(labels[LABEL_ATTEMPT])
        except (KeyError, ValueError):
            continue
        out.append(
            Child(
                name=meta["name"],
                stage=stage,
                attempt=attempt,
                state=backend.state(child),
                created=meta.get("creationTimestamp"),
                applied_suspend=applied_suspend(child),
            )
        )
    return out


def _records(status: Mapping[str, Any]) -> dict[str, StageStatus]:
    """The operator's per-stage records; an unreadable one counts as absent (we rewrite it)."""
    out = {}
    for name, raw in ((status.get("stages") or {}) or {}).items():
        if raw:
            try:
                out[name] = StageStatus.model_validate(raw)
            except ValidationError:
                continue
    return out


def _failure(child: Child, namespace: str, pods: Mapping[str, list[Mapping[str, Any]]] | None) -> str:
    """Why an attempt failed, naming the job and the pod whose logs tell the story."""
    state = child.state
    detail = (state.message or state.reason or "failed").strip().rstrip(".")
    text = f"job {child.name} failed: {detail}"
    described = describe_failed_pod((pods or {}).get(child.name, []))
    pod, what = described if described else (failed_pod_hint(child.name, state), "")
    if pod:
        text += f"; pod {pod}" + (f": {what}" if what else "")
        text += f" (kubectl logs -n {namespace} {pod} -c pytorch)"
    return text[:4096]


class _Planner:
    """Walks the stages of one run; a class only to share the run, the clock and the backend."""

    def __init__(self, run: LlavaRun, now: datetime, backend: Backend, pods: Any) -> None:
        self.run = run
        self.now = timestamp(now)
        self.backend = backend
        self.pods = pods

    def start(self, stage: Stage, attempt: int, rec: StageStatus | None) -> _Step:
        """Create attempt `attempt`, with the per-run RBAC when the run's first job starts.

        RBAC creates are the apiserver's most expensive requests (escalation checks run before
        the 409), so later stages skip them; a retry re-issues them in case a crash lost one.
        Order: ServiceAccount (a pod needs it at admission), job, then Role and RoleBinding
        (the trainer needs them only at its first status write, and its reporter retries).
        """
        spec = self.run.spec
        name = job_name(self.run.name, stage, attempt)
        job = self.backend.render(self.run, stage, attempt)
        if stage == spec.stages[0] or attempt > 0:
            account, *grants = render_rbac(self.run)
            if account["kind"] != "ServiceAccount":  # spec.serviceAccountName: nothing to create
                account, grants = None, [account, *grants]
            create = [*([account] if account else []), job, *grants]
        else:
            create = [job]
        phase = (
            StagePhase.SUSPENDED
            if spec.suspend
            else (StagePhase.PENDING if attempt == 0 else StagePhase.RETRYING)
        )
        record = StageStatus(
            phase=phase,
            job=name,
            attempts=attempt + 1,
            start_time=(rec.start_time if rec else None) or self.now,
            message=rec.message if rec else None,
        )
        return _Step(phase=phase, record=record, create=create)

    def stage(self, stage: Stage, rec: StageStatus | None, kids: dict[int, Child]) -> _Step:
        """Advance one stage by one transition at most."""
        done = [k for k in kids.values() if k.state.phase is JobPhase.SUCCEEDED]
        if done or (rec and rec.phase is StagePhase.SUCCEEDED):
            return self.succeeded(stage, rec, max(done, key=lambda k: k.attempt) if done else None)
        if rec and rec.phase is StagePhase.FAILED:
            return _Step(phase=StagePhase.FAILED, record=rec, failure_reason=self.exhausted_reason())
        attempt = max((rec.attempts - 1) if rec else -1, max(kids, default=-1))
        if attempt < 0:
            step = self.start(stage, 0, None)
            step.events.append(Event(STAGE_STARTED, f"stage {stage.value} started as job {step.record.job}"))
            return step
        kid = kids.get(attempt)
        if kid is None:
            # Created but not observed yet (or deleted behind our back): create again; 409 is fine.
            step = self.start(stage, attempt, rec)
            if rec:
                step.record, step.phase = rec, rec.phase
            return step
        if kid.state.phase is JobPhase.FAILED:
            return self.failed(stage, rec, kid)
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

    def failed(self, stage: Stage, rec: StageStatus | None, kid: Child) -> _Step:
        why = _failure(kid, self.run.namespace, self.pods)
        wants = [kid.name] if self.pods is None else []
        retries = self.run.spec.retries
        attempt_start = kid.created or self.now
        attempt_end = kid.state.completion_time or self.now
        if kid.attempt < retries:
            step = self.start(stage, kid.attempt + 1, rec)
            step.record = step.record.model_copy(update={"message": why})
            step.events.append(
                Event(
                    STAGE_RETRYING,
                    f"stage {stage.value} attempt {kid.attempt + 1}/{retries + 1} failed, starting "
                    f"attempt {kid.attempt + 2} as job {step.record.job} (resumes from the newest "
                    f"checkpoint): {why}",
                    "Warning",
                )
            )
            step.wants_pods = wants
            took = _seconds_between(attempt_start, attempt_end)
            step.finished.append(StageResult(stage.value, "retried", took))
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
            Event(
                STAGE_FAILED,
                f"stage {stage.value} failed after {kid.attempt + 1} attempt(s): {why}",
                "Warning",
            )
        )
        step.wants_pods = wants
        step.finished.append(
            StageResult(stage.value, "failed", _seconds_between(record.start_time, attempt_end))
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
            phase = StagePhase.PENDING if kid.attempt == 0 else StagePhase.RETRYING
        record = StageStatus(
            phase=phase,
            job=kid.name,
            attempts=kid.attempt + 1,
            start_time=(rec.start_time if rec else None) or kid.created or self.now,
            message=rec.message if rec else None,
        )
        return _Step(phase=phase, record=record, patch=patch)


def _condition(
    previous: Mapping[str, Mapping[str, Any]],
    ctype: str,
    status: str,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> dict[str, Any]:
    old = previous.get(ctype) or {}
    same = old.get("status") == status
    cond = {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": old.get("lastTransitionTime", now) if same else now,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def _conditions(
    current: list[Mapping[str, Any]],
    phase: Phase,
    failure: tuple[str, str] | None,
    job: str | None,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Succeeded/Failed/Suspended/Queued for this phase, keeping transition times that did not move."""
    prev = {c.get("type", ""): c for c in current}

    def was(ctype: str, reason: str) -> bool:
        """True before, or already flipped back for `reason`: the reason of a False stays put."""
        old = prev.get(ctype) or {}
        return old.get("status") == "True" or old.get("reason") == reason

    if phase is Phase.SUCCEEDED:
        succeeded = ("True", "AllStagesSucceeded", "every stage succeeded")
    elif failure:
        succeeded = ("False", failure[0], failure[1])
    else:
        succeeded = ("Unknown", phase.value, f"the run is {phase.value.lower()}")
    failed = ("True", *failure) if failure else ("False", "NotFailed", "")
    if phase is Phase.SUSPENDED:
        suspended = (
            "True",
            "Suspended",
            f"spec.suspend is true; job {job} is suspended (its pods are deleted)",
        )
    else:
        suspended = ("False", "Resumed" if was(SUSPENDED, "Resumed") else "NotSuspended", "")
    if phase is Phase.QUEUED:
        queued = (
            "True",
            "JobSuspendedByQueue",
            f"job {job} is suspended until its queue (e.g. Kueue) admits it",
        )
    else:
        queued = ("False", "Admitted" if was(QUEUED, "Admitted") else "NotQueued", "")
    out = [
        _condition(prev, ctype, *values, now, generation)
        for ctype, values in zip(CONDITION_TYPES, (succeeded, failed, suspended, queued), strict=True)
    ]
    out += [dict(c) for t, c in prev.items() if t not in CONDITION_TYPES]  # someone else's: keep
    return out


def _run_events(
    current: list[Mapping[str, Any]],
    new: list[dict[str, Any]],
    old_phase: str | None,
    phase: Phase,
    stage: str | None,
) -> list[Event]:
    """Events for run-level transitions: Suspended, Resumed, Queued, RunSucceeded."""
    before = {c.get("type"): c.get("status") for c in current}
    after = {c["type"]: c["status"] for c in new}
    events = []
    if after[SUSPENDED] == "True" and before.get(SUSPENDED) != "True":
        events.append(Event(EVENT_SUSPENDED, f"suspended at stage {stage}; set spec.suspend=false to resume"))
    if after[SUSPENDED] != "True" and before.get(SUSPENDED) == "True":
        events.append(Event(EVENT_RESUMED, f"resumed at stage {stage} from its newest checkpoint"))
    if after[QUEUED] == "True" and before.get(QUEUED) != "True":
        events.append(Event(EVENT_QUEUED, f"stage {stage} is queued: its job waits for admission"))
    if phase is Phase.SUCCEEDED and old_phase != Phase.SUCCEEDED.value:
        events.append(Event(RUN_SUCCEEDED, "every stage succeeded"))
    return events


def _stage_patch(old: Mapping[str, Any] | None, new: StageStatus | None) -> dict[str, Any] | None:
    """Merge patch turning one stage record into another (None keys delete stale fields)."""
    if new is None:
        return None
    desired = new.to_k8s()
    return {**{k: None for k in (old or {}) if k not in desired}, **desired}


def _status_patch(status: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """Only what differs from the current status, so a converged run costs no write."""
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        if key == "stages":
            old_stages = status.get("stages") or {}
            changed = {}
            for name, record in value.items():
                old = old_stages.get(name)
                wanted = _stage_patch(old, record)
                if wanted is None:
                    if old is not None:
                        changed[name] = None
                elif {k: v for k, v in wanted.items() if v is not None} != (old or {}):
                    changed[name] = wanted
            if changed:
                patch["stages"] = changed
        elif status.get(key) != value:
            patch[key] = value
    return patch


def _invalid(body: Mapping[str, Any], error: ValidationError, now: datetime) -> Plan:
    """A run the operator cannot read: report it, touch nothing; fixed by editing the spec."""
    status = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors(include_url=False)
    )[:2048]
    failure = (REASON_INVALID_SPEC, f"spec is invalid: {problems}")
    conditions = _conditions(
        status.get("conditions") or [], Phase.FAILED, failure, None, timestamp(now), generation
    )
    desired = {"observedGeneration": generation, "phase": Phase.FAILED.value, "conditions": conditions}
    events = []
    old_failed = {c.get("type"): c for c in status.get("conditions") or []}.get(FAILED) or {}
    if old_failed.get("reason") != REASON_INVALID_SPEC:
        events.append(Event(REASON_INVALID_SPEC, failure[1], "Warning"))
    return Plan(status=_status_patch(status, desired), events=tuple(events), phase=Phase.FAILED.value)


def plan(
    body: Mapping[str, Any],
    children: Iterable[Mapping[str, Any]],
    now: datetime,
    pods: Mapping[str, list[Mapping[str, Any]]] | None = None,
    backend: Backend = PYTORCHJOB,
) -> Plan:
    """The next step for one LlavaRun (body as read from the apiserver) given its child jobs.

    `pods` maps a failed child's name to its pods, when the caller listed them because the
    previous plan asked (`wants_pods`); it only improves failure messages.
    """
    try:
        run = LlavaRun.from_k8s({k: v for k, v in body.items() if k != "status"})
    except ValidationError as err:
        return _invalid(body, err, now)
    status = body.get("status") or {}
    records = _records(status)
    kids: dict[Stage, dict[int, Child]] = {}
    for child in observe(children, run.metadata.uid, backend):
        kids.setdefault(child.stage, {})[child.attempt] = child
    planner = _Planner(run, now, backend, pods)

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

    # Stages removed from spec.stages are cancelled: their active jobs go, their records too.
    delete: list[str] = []
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
    failure = (step.failure_reason, step.record.message or "") if step.phase is StagePhase.FAILED else None
    generation = run.metadata.generation
    conditions = _conditions(
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
        "conditions": conditions,
    }
    for st in steps.values():
        events += st.events
    events += _run_events(status.get("conditions") or [], conditions, status.get("phase"), phase, last.value)
    return Plan(
        create=tuple(obj for st in steps.values() for obj in st.create),
        patch=tuple(p for st in steps.values() for p in st.patch),
        delete=tuple(delete),
        status=_status_patch(status, desired),
        events=tuple(events),
        finished=tuple(r for st in steps.values() for r in st.finished),
        wants_pods=tuple(n for st in steps.values() for n in st.wants_pods),
        phase=phase.value,
    )
