"""The status document's vocabulary, the same wherever a LlavaRun runs: condition types and
reasons, event reasons, how conditions follow the run's phase, and the merge patch that turns the
current status into the desired one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .api import Phase, StageStatus

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
"""The run's spec cannot be read (e.g. a rule only the operator checks)."""
REASON_QUEUED = "JobSuspendedByQueue"
"""Queued=True, and the queued stage's reason: its child is suspended without spec.suspend."""
REASON_JOB_REJECTED = "JobRejected"
"""A stage's reason while the apiserver refuses to create its job (an admission webhook or the
kind's schema said no, e.g. a TrainJob naming a ClusterTrainingRuntime that does not exist); the
create is tried again at every reconcile, so fixing the cause (or the spec) lets it start."""

# Event reasons, one per transition.
STAGE_STARTED = "StageStarted"
STAGE_SUCCEEDED = "StageSucceeded"
STAGE_RETRYING = "StageRetrying"
STAGE_FAILED = "StageFailed"
STAGE_CANCELLED = "StageCancelled"
ATTEMPT_REPLACED = "AttemptReplaced"
RUN_SUCCEEDED = "RunSucceeded"
EVENT_SUSPENDED = "Suspended"
EVENT_RESUMED = "Resumed"
EVENT_QUEUED = "Queued"
STAGE_WAITING = "StageWaiting"
"""Warning, once per cause: the current attempt's pods cannot be scheduled or started."""
STAGE_DOES_NOT_FIT = "StageDoesNotFit"
"""Warning: the capacity plan says a training stage does not fit its devices' memory."""


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event on the LlavaRun (a printed line locally)."""

    reason: str
    message: str
    type: str = "Normal"


def condition(
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


def queued_message(job: str | None) -> str:
    return f"job {job} is suspended until its queue (e.g. Kueue) admits it"


def conditions(
    current: list[Mapping[str, Any]],
    phase: Phase,
    failure: tuple[str, str] | None,
    job: str | None,
    now: str,
    generation: int | None,
    waiting: tuple[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Succeeded/Failed/Suspended/Queued for this phase, keeping transition times that did not move.
    `waiting` (reason, message): why the current stage waits, said by Succeeded=Unknown."""
    prev = {c.get("type", ""): c for c in current}

    def was(ctype: str, reason: str) -> bool:
        """True before, or already flipped back for `reason`: the reason of a False stays put."""
        old = prev.get(ctype) or {}
        return old.get("status") == "True" or old.get("reason") == reason

    if phase is Phase.SUCCEEDED:
        succeeded = ("True", "AllStagesSucceeded", "every stage succeeded")
    elif failure:
        succeeded = ("False", failure[0], failure[1])
    elif waiting:
        succeeded = ("Unknown", *waiting)
    else:
        succeeded = ("Unknown", phase.value, f"the run is {phase.value.lower()}")
    failed = ("True", *failure) if failure else ("False", "NotFailed", "")
    if phase is Phase.SUSPENDED:
        suspended = (
            "True",
            "Suspended",
            f"spec.suspend is true; job {job} is suspended (its processes are stopped)",
        )
    else:
        suspended = ("False", "Resumed" if was(SUSPENDED, "Resumed") else "NotSuspended", "")
    if phase is Phase.QUEUED:
        queued = ("True", REASON_QUEUED, queued_message(job))
    else:
        queued = ("False", "Admitted" if was(QUEUED, "Admitted") else "NotQueued", "")
    out = [
        condition(prev, ctype, *values, now, generation)
        for ctype, values in zip(CONDITION_TYPES, (succeeded, failed, suspended, queued), strict=True)
    ]
    out += [dict(c) for t, c in prev.items() if t not in CONDITION_TYPES]  # someone else's: keep
    return out


def run_events(
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
        events.append(
            Event(
                EVENT_SUSPENDED, f"suspended at stage {stage}; resuming continues from its newest checkpoint"
            )
        )
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


def status_patch(status: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
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
        elif isinstance(value, Mapping) and isinstance(status.get(key), Mapping):
            if changed := merge_diff(status[key], value):
                patch[key] = changed
        elif status.get(key) != value:
            patch[key] = value
    return patch


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch turning `old` into `new` (None deletes); {} when they are equal."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            if changed := merge_diff(before, value):
                patch[key] = changed
        elif before != value:
            patch[key] = value
    return patch
