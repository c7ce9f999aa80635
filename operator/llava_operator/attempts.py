"""One stage of a LlavaRun, one transition at a time: its attempts started, succeeded, retried or
failed, replaced after an edit, (un)suspended, and why the current one waits. Pure; `plan.py`
walks the stages with it and assembles the run's status (the rules are listed there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .api import LlavaRun, Stage, StagePhase, StageStatus
from .api.status import seconds_between, timestamp
from .backend import (
    FAILURES_ANNOTATION,
    PREVIOUS_FAILURE_ANNOTATION,
    SPEC_HASH_ANNOTATION,
    Backend,
    annotations,
)
from .children import Child
from .conditions import (
    ATTEMPT_REPLACED,
    REASON_BACKOFF_LIMIT,
    REASON_JOB_REJECTED,
    REASON_QUEUED,
    REASON_STAGE_FAILED,
    STAGE_FAILED,
    STAGE_RETRYING,
    STAGE_STARTED,
    STAGE_SUCCEEDED,
    STAGE_WAITING,
    Event,
    queued_message,
)
from .jobstate import JobPhase
from .naming import job_name
from .waiting import CAUSES, Wait, why_waiting


@dataclass(frozen=True)
class StageResult:
    """A stage (or its last attempt) that finished in this plan, for the duration metric."""

    stage: str
    result: str
    seconds: float


@dataclass
class Step:
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
    started_at: str | None = None
    """When the current attempt started (for the ETA)."""


def _seconds_between(start: str | None, end: str | None) -> float:
    return seconds_between(start, end) or 0.0


LOOK_AFTER_SECONDS = 10.0
"""A new attempt's pods are not read this long: scheduling and image pulls usually settle in
seconds, and reading the pods of every young attempt costs a LIST per child event at scale."""


class StageWalker:
    """Walks the stages of one run; a class only to share the run, the clock, the backend and
    what was observed beside the children (pods, progress)."""

    def __init__(
        self,
        run: LlavaRun,
        now: datetime,
        backend: Backend,
        pods: Any,
        progress: Any,
        rejected: Mapping[str, str] | None = None,
    ) -> None:
        self.run = run
        self.clock = now
        self.now = timestamp(now)
        self.backend = backend
        self.pods = pods
        self.progress: Mapping[str, Any] = progress or {}
        """The trainer's latest progress report (status.progress)."""
        self.rejected: Mapping[str, str] = rejected or {}
        """Children the apiserver refused to create just now, by name: why (its message)."""

    def render(self, stage: Stage, attempt: int, failures: int, previous: str | None) -> dict[str, Any]:
        child = self.backend.render(self.run, stage, attempt)
        notes = child["metadata"].setdefault("annotations", {})
        notes[FAILURES_ANNOTATION] = str(failures)
        if previous:
            notes[PREVIOUS_FAILURE_ANNOTATION] = previous
        return child

    def start(
        self, stage: Stage, attempt: int, rec: StageStatus | None, failures: int, previous: str | None
    ) -> Step:
        """Create attempt `attempt` of a stage that has failed `failures` times, the last time
        because of `previous`."""
        if self.run.spec.suspend:
            phase = StagePhase.SUSPENDED
        else:
            phase = StagePhase.PENDING if failures == 0 else StagePhase.RETRYING
        name = job_name(self.run.name, stage, attempt)
        reason, message, events = None, previous, []
        if (refusal := self.rejected.get(name)) is not None:
            reason = REASON_JOB_REJECTED
            message = f"the apiserver refused to create {self.backend.kind} {name}: {refusal}"[:4096]
            if rec is None or rec.reason != reason:
                events.append(
                    Event(STAGE_WAITING, f"stage {stage.value} waits ({reason}): {message}", "Warning")
                )
        record = StageStatus(
            phase=phase,
            job=name,
            attempts=attempt + 1,
            start_time=(rec.start_time if rec else None) or self.now,
            reason=reason,
            message=message,
        )
        create = [self.render(stage, attempt, failures, previous)]
        return Step(phase=phase, record=record, create=create, events=events)

    @staticmethod
    def previous_failure(rec: StageStatus | None, kid: Child | None) -> str | None:
        """Why the attempt before `kid` failed: as recorded on it, else (children made before it
        was recorded) the stage's message when that does not say why it waits."""
        if kid is not None and (kid.previous_failure is not None or kid.failures == 0):
            return kid.previous_failure
        return rec.message if rec and not rec.reason else None

    def stage(self, stage: Stage, rec: StageStatus | None, kids: dict[int, Child]) -> Step:
        """Advance one stage by one transition at most."""
        done = [k for k in kids.values() if k.state.phase is JobPhase.SUCCEEDED]
        if done or (rec and rec.phase is StagePhase.SUCCEEDED):
            return self.succeeded(stage, rec, max(done, key=lambda k: k.attempt) if done else None)
        if rec and rec.phase is StagePhase.FAILED:
            return Step(phase=StagePhase.FAILED, record=rec, failure_reason=self.exhausted_reason())
        attempt = max((rec.attempts - 1) if rec else -1, max(kids, default=-1))
        if attempt < 0:
            step = self.start(stage, 0, None, 0, None)
            if not step.record.reason:
                step.events.append(
                    Event(STAGE_STARTED, f"stage {stage.value} started as job {step.record.job}")
                )
            return step
        kid = kids.get(attempt)
        if kid is None:
            # Created but not observed yet (or deleted behind our back, or refused so far): create
            # again; 409 is fine.
            earlier = [
                k.failures + (k.state.phase is JobPhase.FAILED) for k in kids.values() if k.attempt < attempt
            ]
            step = self.start(stage, attempt, rec, max(earlier, default=0), self.previous_failure(rec, None))
            was_rejected = rec is not None and rec.reason == REASON_JOB_REJECTED
            if rec and not was_rejected:
                step.record, step.phase = rec, rec.phase
            elif was_rejected and not step.record.reason and attempt == 0:  # accepted at last
                step.events.append(
                    Event(STAGE_STARTED, f"stage {stage.value} started as job {step.record.job}")
                )
            return step
        if kid.state.phase is JobPhase.FAILED:
            return self.failed(stage, rec, kid)
        if not kid.state.started and kid.spec_hash is not None:
            fresh = annotations(self.backend.render(self.run, stage, kid.attempt)).get(SPEC_HASH_ANNOTATION)
            if fresh != kid.spec_hash:
                return self.replace(stage, rec, kid)
        return self.active(stage, rec, kid)

    def succeeded(self, stage: Stage, rec: StageStatus | None, kid: Child | None) -> Step:
        if rec and rec.phase is StagePhase.SUCCEEDED:
            return Step(phase=StagePhase.SUCCEEDED, record=rec)
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
        step = Step(phase=StagePhase.SUCCEEDED, record=record)
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

    def failed(self, stage: Stage, rec: StageStatus | None, kid: Child) -> Step:
        why = self.failure(kid)
        wants = [kid.name] if self.pods is None else []
        retries = self.run.spec.retries
        tries = kid.failures + 1
        attempt_start = kid.created or self.now
        attempt_end = kid.state.completion_time or self.now
        if kid.failures < retries:
            step = self.start(stage, kid.attempt + 1, rec, tries, why)
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
        step = Step(phase=StagePhase.FAILED, record=record, failure_reason=self.exhausted_reason())
        step.events.append(
            Event(STAGE_FAILED, f"stage {stage.value} failed after {tries} attempt(s): {why}", "Warning")
        )
        step.wants_pods = wants
        step.finished.append(
            StageResult(stage.value, "failed", _seconds_between(record.start_time, attempt_end))
        )
        return step

    def replace(self, stage: Stage, rec: StageStatus | None, kid: Child) -> Step:
        """The spec changed under an attempt that has not started: a new attempt takes its place."""
        step = self.start(stage, kid.attempt + 1, rec, kid.failures, self.previous_failure(rec, kid))
        step.delete.append(kid.name)
        step.events.append(
            Event(
                ATTEMPT_REPLACED,
                f"stage {stage.value}: job {kid.name} had not started and the spec changed "
                f"(generation {self.run.metadata.generation}); replaced by job {step.record.job}",
            )
        )
        return step

    def active(self, stage: Stage, rec: StageStatus | None, kid: Child) -> Step:
        """A running, pending or suspended attempt; flip its suspension if the user changed theirs;
        say why it waits."""
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
        step = Step(phase=phase, record=StageStatus(), patch=patch)
        previous = self.previous_failure(rec, kid)
        reason, message = None, previous
        if phase is StagePhase.QUEUED:
            wait: Wait | None = Wait(REASON_QUEUED, queued_message(kid.name))
        elif phase is StagePhase.SUSPENDED or not self.may_wait(kid):
            wait = None
        elif self.pods is None:  # not listed yet: say what we said, and ask for them
            step.wants_pods.append(kid.name)
            wait = None
            if rec and rec.reason in CAUSES:
                reason, message = rec.reason, rec.message
        else:
            wait = why_waiting(self.pods.get(kid.name, []), self.clock)
        if wait:
            reason = wait.reason
            message = (wait.message + (f"; previous attempt: {previous}" if previous else ""))[:4096]
            if wait.reason != REASON_QUEUED and (rec is None or rec.reason != wait.reason):
                step.events.append(
                    Event(
                        STAGE_WAITING, f"stage {stage.value} waits ({wait.reason}): {wait.message}", "Warning"
                    )
                )
        step.record = StageStatus(
            phase=phase,
            job=kid.name,
            attempts=kid.attempt + 1,
            start_time=(rec.start_time if rec else None) or kid.created or self.now,
            reason=reason,
            message=message,
        )
        step.started_at = kid.state.start_time or kid.created
        return step

    def may_wait(self, kid: Child) -> bool:
        """Whether an unsuspended attempt's pods may be waiting (read once it is LOOK_AFTER_SECONDS
        old): not all of them have run yet,
        or some were recreated (Restarting), or it runs on several nodes (one pod each) and its
        trainer has not reported yet (a worker may wait for a node while the master runs)."""
        if (seconds_between(kid.created, self.now) or 0.0) < LOOK_AFTER_SECONDS:
            return False
        if kid.state.phase is not JobPhase.RUNNING:
            return True
        if getattr(self.run.spec.stage_config(kid.stage).resources, "nodes", 1) == 1:
            return False
        progress = self.progress
        return progress.get("stage") != kid.stage.value or progress.get("attempt") not in (None, kid.attempt)
