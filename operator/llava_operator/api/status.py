"""LlavaRun status. Two writers own disjoint subtrees, each writing JSON merge patches on its own:

- the operator: phase, reason, stage, currentJob, stages, conditions, observedGeneration, plan, eta;
- the trainer (rank 0): progress and results.

Every field is declared so the apiserver's structural pruning never drops a write silently.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field

from .base import ApiModel

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
"""Times in the status (conditions, stage start/completion, progress.lastUpdate): RFC 3339 in UTC
to the second, the way Kubernetes writes `metav1.Time`."""


def timestamp(when: datetime | None = None) -> str:
    """`when` (default: now) as a status time; every status writer formats times through this."""
    return (when or datetime.now(UTC)).astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(value: str | None) -> datetime | None:
    """A status time (or any RFC 3339 time Kubernetes writes) as an aware datetime; None when
    missing or unreadable."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the apiserver applies `llavaruns/status` patches: maps merge,
    null deletes, anything else replaces. Returns a new document; `target` is left as it was."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from one status time to another; None when either is missing or unreadable."""
    begin, finish = parse_time(start), parse_time(end)
    if begin is None or finish is None:
        return None
    return max(0.0, (finish - begin).total_seconds())


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class StagePhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    RETRYING = "Retrying"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Condition(ApiModel):
    """metav1.Condition."""

    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field("", max_length=32768)
    last_transition_time: str
    observed_generation: int | None = Field(None, ge=0)


class StageStatus(ApiModel):
    """What the operator observed of one stage."""

    phase: StagePhase = StagePhase.PENDING
    job: str | None = None
    """The PyTorchJob of the newest attempt."""
    attempts: int = Field(0, ge=0)
    start_time: str | None = None
    completion_time: str | None = None
    reason: str | None = None
    """Why the newest attempt waits, CamelCase: Unschedulable, SchedulingGated, ImagePullBackOff,
    CreateContainerConfigError, ContainerCreating (for minutes: volumes or image), JobSuspendedByQueue;
    absent when it does not wait."""
    message: str | None = None
    """Why the newest attempt waits (quoting the scheduler or the kubelet), then why the previous
    attempt failed (naming the failed job and pod), or why the stage failed."""


class StagesStatus(ApiModel):
    prepare: StageStatus | None = None
    pretrain: StageStatus | None = None
    finetune: StageStatus | None = None
    evaluate: StageStatus | None = None


class Progress(ApiModel):
    """Live training progress of the running stage, written by the trainer's rank 0 (throttled)."""

    stage: str | None = None
    attempt: int | None = None
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    percent: int | None = Field(None, ge=0, le=100)
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    samples_per_second: float | None = None
    tokens_per_second: float | None = None
    """Real tokens (576 per image, no padding)."""
    padded_tokens_per_second: float | None = None
    mfu: float | None = None
    """Model FLOPs utilisation in percent: 4N (pretrain) or 6N (finetune) FLOPs per real token, plus attention and the CLIP forward, over the device peak."""
    mfu_flagperf: float | None = None
    """FlagPerf's convention (2N or 6N per padded token), in percent."""
    gpu_memory_gib: float | None = None
    eta_seconds: int | None = None
    last_update: str | None = None


class PrepareResults(ApiModel):
    samples: dict[str, int] = Field(default_factory=dict)
    """Samples per source (pretrain, coco, gqa, ocr_vqa, textvqa, vg, text_only, mmmu)."""
    missing_images: int = 0
    corrupt_images: int = 0
    ocr_vqa_not_jpg: int = 0
    tokenization_mismatches: int = 0
    index: str | None = None
    """The index/stats file training reuses."""
    duration_seconds: float | None = None


class TrainResults(ApiModel):
    checkpoint: str | None = None
    """The exported Hugging Face model directory."""
    projector: str | None = None
    """mm_projector.bin (pretrain)."""
    steps: int | None = None
    samples: int | None = None
    final_loss: float | None = None
    samples_per_second: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    mfu_flagperf: float | None = None
    duration_seconds: float | None = None


class EvaluateResults(ApiModel):
    split: str | None = None
    questions: int | None = None
    overall: float | None = None
    """MMMU accuracy in percent."""
    disciplines: dict[str, float] = Field(default_factory=dict)
    results_file: str | None = None
    duration_seconds: float | None = None


class Results(ApiModel):
    prepare: PrepareResults | None = None
    pretrain: TrainResults | None = None
    finetune: TrainResults | None = None
    evaluate: EvaluateResults | None = None


class StagePlan(ApiModel):
    """One training stage's capacity plan: `llavarun plan`'s numbers for it."""

    seconds: int = Field(ge=0)
    """Estimated wall time at `mfu`."""
    gpu_hours: float = Field(ge=0)
    devices: int = Field(ge=1)
    fits: bool
    """The estimated peak memory per device fits the device's memory."""
    memory_gib: float
    """Estimated peak memory per device (weights, gradients, optimizer, activations, overhead)."""
    device_memory_gib: float
    mfu: float
    """Model FLOPs utilisation assumed, in percent."""
    fix: str | None = None
    """When it does not fit: the cheapest single change that does (e.g. spec.finetune.microBatchSize: 8)."""


class PlanStages(ApiModel):
    pretrain: StagePlan | None = None
    finetune: StagePlan | None = None


class RunPlan(ApiModel):
    """The capacity plan of the run's training stages, made by the operator from the spec when the
    run starts and again after each spec change: the recipe's model sizes (by the language model's
    name) and typical token lengths, the device from the placement's node labels or the profile;
    `llavarun plan --data-dir` reads the checkpoints and prepare's index instead."""

    generation: int | None = None
    """The metadata.generation planned."""
    model: str | None = None
    device: str | None = None
    device_source: str | None = None
    """Why this device: a node label of the placement, or the profile's default."""
    fits: bool | None = None
    """Every training stage fits its devices' memory."""
    seconds: int | None = Field(None, ge=0)
    """Estimated wall time of all training stages, one after the other."""
    gpu_hours: float | None = Field(None, ge=0)
    stages: PlanStages | None = None
    unavailable: str | None = None
    """Why there is no plan (e.g. a language model without built-in sizes); the run is not held up."""


class LlavaRunStatus(ApiModel):
    observed_generation: int | None = None
    phase: Phase | None = None
    reason: str | None = None
    """Why the run is in its phase, CamelCase, when that needs saying: why its current stage waits
    (its `stages.<stage>.reason`) or why the run failed (the Failed condition's reason)."""
    eta: str | None = None
    """While a stage runs: when the run is expected to end (RFC 3339, to the minute). The running
    stage ends as its measured throughput says once the trainer reports an ETA
    (`progress.etaSeconds`), else as `plan` says counted from its attempt's start; later training
    stages take `plan`'s time. Absent while the run waits, when a later training stage has no plan,
    and while prepare runs (not planned, no ETA reported); evaluate counts once it runs and reports."""
    stage: str | None = None
    """The stage running now, or the last one when the run has ended."""
    current_job: str | None = None
    backend: Literal["PyTorchJob", "TrainJob"] | None = None
    """What runs the stages, recorded by the operator when the run starts (never switches)."""
    stages: StagesStatus | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    plan: RunPlan | None = None
    progress: Progress | None = None
    results: Results | None = None
