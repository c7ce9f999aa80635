"""What the plan needs from whatever runs a stage attempt: one small interface, several kinds.

Children are objects with Kubernetes metadata (name, labels, annotations, ownerReferences,
creationTimestamp) whatever their kind, so the plan keeps its own records on them the same way
everywhere: the annotations below. Everything else about a kind (its manifest, how its state is
read, how it is suspended, where its logs are) belongs to its backend:

- `backends.pytorchjob`: Kubeflow training-operator v1 PyTorchJobs (the operator's default);
- `backends.trainjob`: Kubeflow Trainer v2 TrainJobs (over JobSet);
- `backends.local`: local process groups, torchrun per attempt (`llavarun local`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .api import LlavaRun, Stage
from .jobstate import JobState

SUSPEND_ANNOTATION = "llavarun.io/suspend"
"""The user's spec.suspend as we last applied it to this child. We only flip the child's
suspension when the user's intent differs from this, so a child that a queue (Kueue) suspended or
admitted is never flipped back by a later reconcile."""
SPEC_HASH_ANNOTATION = "llavarun.io/spec-hash"
"""Digest of what the attempt runs (suspension aside), set at render: an attempt that has not
started is replaced when the spec now renders differently."""
FAILURES_ANNOTATION = "llavarun.io/failures"
"""How many attempts of this stage had failed when this one was created: spec.retries counts
failures, not attempts replaced because the spec was edited before they started."""
PREVIOUS_FAILURE_ANNOTATION = "llavarun.io/previous-failure"
"""On a retry: why the attempt before it failed. The stage's message says it again once this
attempt no longer waits (while it waits, the message says why first)."""


@dataclass(frozen=True)
class RunObjects:
    """Objects every child of a run needs, besides the child: `before` are created ahead of the
    first child (it cannot start without them), `after` behind it (needed only once it runs)."""

    before: tuple[dict[str, Any], ...] = ()
    after: tuple[dict[str, Any], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.before or self.after)


class Backend(Protocol):
    """A kind of child. Render and state are pure; the edges (the kopf operator's REST calls,
    `llavarun local`'s process supervisor) create, patch and delete what the plan says."""

    kind: str

    def refusals(self, run: LlavaRun) -> list[str]:
        """Why this backend cannot run `run` as written, each naming the field; [] when it can.
        The plan reports them as InvalidSpec and creates nothing."""
        ...

    def render(self, run: LlavaRun, stage: Stage, attempt: int) -> dict[str, Any]:
        """The child of one attempt of one stage, with the stage/attempt labels and the suspend and
        spec-hash annotations."""
        ...

    def run_objects(self, run: LlavaRun) -> RunObjects:
        """Per-run objects its children need (e.g. the trainer's identity); none is fine."""
        ...

    def state(self, child: Mapping[str, Any]) -> JobState:
        """The attempt's state as the plan sees it."""
        ...

    def suspend_patch(self, suspend: bool) -> dict[str, Any]:
        """A merge patch that (un)suspends the child and records the user's intent."""
        ...

    def where_to_look(
        self, child_name: str, state: JobState, namespace: str, pods: list[Mapping[str, Any]]
    ) -> str:
        """For a failed attempt, what to read beyond its state's message (e.g. a pod and the
        command showing its log); "" when the message already says it. `pods`: the child's pods
        when the caller listed them."""
        ...


class ClusterBackend(Backend, Protocol):
    """A backend whose children are Kubernetes objects (what `kube.Kube` needs on top)."""

    group: str
    version: str
    plural: str

    def pod_selector(self, child_name: str) -> str:
        """Label selector of the child's pods: the plan reads them to say why an attempt failed
        and why it waits (unschedulable, image, volumes; `waiting.py`)."""
        ...


def annotations(child: Mapping[str, Any]) -> Mapping[str, str]:
    return (child.get("metadata") or {}).get("annotations") or {}


def applied_suspend(child: Mapping[str, Any]) -> bool | None:
    """The spec.suspend value last applied to a child (None: unknown, never patch)."""
    value = annotations(child).get(SUSPEND_ANNOTATION)
    return None if value is None else value == "true"


def flag(value: bool) -> str:
    return "true" if value else "false"


def suspend_patch_at(spec: Mapping[str, Any], suspend: bool) -> dict[str, Any]:
    """(Un)suspend a child whose `spec` patch is given, recording the user's intent on it."""
    return {"metadata": {"annotations": {SUSPEND_ANNOTATION: flag(suspend)}}, "spec": dict(spec)}


def digest(value: Any) -> str:
    """A short stable digest of a JSON value (for SPEC_HASH_ANNOTATION)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stamp(child: dict[str, Any], *, suspend: bool, runs: Any) -> dict[str, Any]:
    """Record the plan's annotations on a freshly rendered child: the suspension it is created
    with, and the digest of `runs` (what the attempt runs, suspension aside)."""
    notes = child["metadata"].setdefault("annotations", {})
    notes[SUSPEND_ANNOTATION] = flag(suspend)
    notes[SPEC_HASH_ANNOTATION] = digest(runs)
    return child
