"""The kind of child object a stage attempt runs as, behind one small interface.

The plan only asks a backend to render an attempt, read an attempt's state and say how to
flip its suspension. PyTorchJob (training-operator v1) is the one we ship; a Kubeflow Trainer v2
`TrainJob` backend implements the same four members.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .api import LlavaRun, Stage
from .jobstate import JOB_NAME_LABEL, JobState, pytorchjob_state
from .render import render_stage_job

#: The user's spec.suspend as we last applied it to this child. We only patch the child's
#: suspension when the user's intent differs from this, so a child that Kueue suspended or
#: admitted is never flipped back by a later reconcile.
SUSPEND_ANNOTATION = "llavarun.io/suspend"


class Backend(Protocol):
    group: str
    version: str
    plural: str
    kind: str

    def render(self, run: LlavaRun, stage: Stage, attempt: int) -> dict[str, Any]:
        """The child object for one attempt of one stage, created once and never replaced."""
        ...

    def state(self, child: Mapping[str, Any]) -> JobState:
        """The attempt's state as the plan sees it."""
        ...

    def suspend_patch(self, suspend: bool) -> dict[str, Any]:
        """A merge patch that (un)suspends the child and records the user's intent."""
        ...

    def pod_selector(self, child_name: str) -> str:
        """Label selector of the child's pods (for failure messages)."""
        ...


def _bool(value: bool) -> str:
    return "true" if value else "false"


def applied_suspend(child: Mapping[str, Any]) -> bool | None:
    """The spec.suspend value last applied to a child (None: unknown, never patch)."""
    value = ((child.get("metadata") or {}).get("annotations") or {}).get(SUSPEND_ANNOTATION)
    return None if value is None else value == "true"


class PyTorchJobBackend:
    """Kubeflow training-operator v1 PyTorchJobs."""

    group = "kubeflow.org"
    version = "v1"
    plural = "pytorchjobs"
    kind = "PyTorchJob"

    def render(self, run: LlavaRun, stage: Stage, attempt: int) -> dict[str, Any]:
        job = render_stage_job(run, stage, attempt)
        job["metadata"].setdefault("annotations", {})[SUSPEND_ANNOTATION] = _bool(run.spec.suspend)
        return job

    def state(self, child: Mapping[str, Any]) -> JobState:
        return pytorchjob_state(child)

    def suspend_patch(self, suspend: bool) -> dict[str, Any]:
        return {
            "metadata": {"annotations": {SUSPEND_ANNOTATION: _bool(suspend)}},
            "spec": {"runPolicy": {"suspend": suspend}},
        }

    def pod_selector(self, child_name: str) -> str:
        return f"{JOB_NAME_LABEL}={child_name}"


PYTORCHJOB = PyTorchJobBackend()
