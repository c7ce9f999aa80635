"""How long a stopped stage needs to save its work: the grace period its pods get.

Suspending a run (the user or Kueue), preempting or draining a node ends a stage's pods with
SIGTERM; the trainer then finishes the step in flight, writes a checkpoint if one fits in the
grace period, and exits, so the resumed attempt loses nothing. Kubernetes' default grace period
(30 s) is far too short for a 13B ZeRO-3 checkpoint, so every stage's pods get one sized from what
the stage saves: the trained parameters' 16-bit weights and fp32 Adam states (frozen weights are
not saved), written by the busiest node at a stated bandwidth. The same number reaches the pod
spec (`terminationGracePeriodSeconds`) and the trainer (`LLAVARUN_GRACE_SECONDS`).
"""

from __future__ import annotations

import math

from ..api import LlavaRunSpec, Stage, StageResources
from .geometry import Geometry, for_stage, recipe_geometry
from .memory import element_bytes, trained_and_frozen

STOP_SECONDS = 30
"""Finishing the step in flight and tearing the processes down (Kubernetes' default grace period)."""
WRITE_BYTES_PER_SECOND_PER_NODE = 2**30
"""Checkpoint write bandwidth assumed per node: 1 GiB/s, what a shared network filesystem gives
one client; local NVMe or a parallel filesystem is faster, so the default errs long."""
SAFETY = 1.5
LARGEST_RECIPE_MODEL = "vicuna-13b-v1.5"
"""Sizes assumed for a language model the built-in table does not name (the larger recipe model)."""


def checkpoint_bytes_per_node(geometry: Geometry, stage: Stage, spec: LlavaRunSpec) -> float:
    """Bytes the busiest node writes for one checkpoint of a training stage.

    Every rank writes its partition of the fp32 optimizer states (master weights and two Adam
    moments; the moments only in fp32 training); the trained 16-bit weights are partitioned
    under ZeRO-3 and written by the first rank otherwise."""
    hp = spec.pretrain if stage is Stage.PRETRAIN else spec.finetune
    nodes = hp.resources.nodes
    trained, _ = trained_and_frozen(for_stage(geometry, spec, stage.value), stage.value)
    weights = trained * element_bytes(hp.precision)
    optimizer = trained * (8 if hp.precision == "fp32" else 12)
    if hp.zero_stage >= 3:
        return (weights + optimizer) / nodes
    return weights + optimizer / nodes


def grace_period_seconds(spec: LlavaRunSpec, stage: Stage) -> int:
    """The stage's grace period: the user's value, else sized from its checkpoint (rounded up to
    whole 10 s); stages that save nothing (prepare, evaluate) get Kubernetes' default."""
    resources = spec.stage_config(stage).resources
    if isinstance(resources, StageResources) and resources.termination_grace_period_seconds:
        return resources.termination_grace_period_seconds
    if stage not in (Stage.PRETRAIN, Stage.FINETUNE):
        return STOP_SECONDS
    geometry = recipe_geometry(spec.paths.language_model) or recipe_geometry(LARGEST_RECIPE_MODEL)
    assert geometry is not None
    write = SAFETY * checkpoint_bytes_per_node(geometry, stage, spec) / WRITE_BYTES_PER_SECOND_PER_NODE
    return 10 * math.ceil((STOP_SECONDS + write) / 10)
