"""The kinds of child a stage attempt runs as; `..backend` is the interface they share."""

from __future__ import annotations

from typing import Any

from ..api import LlavaRun, Stage
from ..api.spec import BackendKind
from ..backend import ClusterBackend
from ..kinds import CLUSTER_KINDS


def cluster_backends(training_runtime: str) -> dict[str, ClusterBackend]:
    """Every cluster backend by kind; TrainJobs default to the ClusterTrainingRuntime `training_runtime`."""
    from .pytorchjob import PYTORCHJOB
    from .trainjob import TrainJobBackend

    backends: dict[str, ClusterBackend] = {
        BackendKind.PYTORCHJOB.value: PYTORCHJOB,
        BackendKind.TRAINJOB.value: TrainJobBackend(training_runtime),
    }
    assert set(backends) == set(CLUSTER_KINDS)
    return backends


def render_run(
    backend: ClusterBackend, run: LlavaRun, stages: list[Stage] | None = None
) -> list[dict[str, Any]]:
    """What the operator creates for `run` on `backend` (what `llavarun render` prints): the
    backend's per-run objects, then each stage's first attempt with the plan's annotations.
    ValueError naming the run when the backend cannot run it as written."""
    if refused := backend.refusals(run):
        raise ValueError(f"LlavaRun {run.name} cannot run as {backend.kind}s: {'; '.join(refused)}")
    objects = backend.run_objects(run)
    chosen = stages or list(run.spec.stages)
    return [*objects.before, *objects.after, *(backend.render(run, s, 0) for s in chosen)]
