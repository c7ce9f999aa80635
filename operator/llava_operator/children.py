"""The run's children as the plan sees them: owned by the run, labelled with their stage and
attempt, read through the backend, with the records the plan keeps on them (annotations)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .api import Stage
from .backend import (
    FAILURES_ANNOTATION,
    PREVIOUS_FAILURE_ANNOTATION,
    SPEC_HASH_ANNOTATION,
    Backend,
    annotations,
    applied_suspend,
)
from .jobstate import JobState
from .naming import LABEL_ATTEMPT, LABEL_STAGE


@dataclass(frozen=True)
class Child:
    """One observed child of the run, with the records the plan keeps on it."""

    name: str
    stage: Stage
    attempt: int
    state: JobState
    created: str | None
    applied_suspend: bool | None
    failures: int
    """Failed attempts of the stage before this one."""
    previous_failure: str | None
    """Why the attempt before this one failed, as recorded on it (None: not recorded)."""
    spec_hash: str | None


def observe(children: Iterable[Mapping[str, Any]], uid: str | None, backend: Backend) -> list[Child]:
    """Children owned by this run (a same-named predecessor's children are still being collected)."""
    out = []
    for child in children:
        meta = child.get("metadata") or {}
        owners = meta.get("ownerReferences") or []
        if uid and not any(o.get("uid") == uid and o.get("controller") for o in owners):
            continue
        labels = meta.get("labels") or {}
        notes = annotations(child)
        try:
            stage, attempt = Stage(labels[LABEL_STAGE]), int(labels[LABEL_ATTEMPT])
            failures = int(notes.get(FAILURES_ANNOTATION, attempt))  # older children: every retry failed
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
                failures=failures,
                previous_failure=notes.get(PREVIOUS_FAILURE_ANNOTATION),
                spec_hash=notes.get(SPEC_HASH_ANNOTATION),
            )
        )
    return out
