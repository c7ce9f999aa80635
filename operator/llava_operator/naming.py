"""Deterministic names and labels of everything a LlavaRun owns.

Names are pure functions of (run, stage, attempt), so re-creating a child after a crash hits
409 AlreadyExists instead of making a duplicate.
"""

from __future__ import annotations

from .api import Stage

LABEL_RUN = "llavarun.io/run"
LABEL_STAGE = "llavarun.io/stage"
LABEL_ATTEMPT = "llavarun.io/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "llavarun-operator"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def job_name(run: str, stage: Stage | str, attempt: int) -> str:
    """`<run>-<stage>` for the first attempt, `<run>-<stage>-r<attempt>` for retries."""
    base = f"{run}-{Stage(stage).value}"
    return base if attempt == 0 else f"{base}-r{attempt}"


def trainer_service_account(run: str) -> str:
    return f"{run}-trainer"


def status_role(run: str) -> str:
    return f"{run}-status-writer"


def common_labels(run: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "llavarun",
        "app.kubernetes.io/instance": run,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_RUN: run,
    }


def stage_labels(run: str, stage: Stage | str, attempt: int) -> dict[str, str]:
    return {**common_labels(run), LABEL_STAGE: Stage(stage).value, LABEL_ATTEMPT: str(attempt)}
