"""LlavaRun status. Two writers own disjoint subtrees, each writing JSON merge patches on its own:

- the operator: phase, stage, currentJob, stages, conditions, observedGeneration;
- the trainer (rank 0): progress and results.

Every field is declared so the apiserver's structural pruning never drops a write silently.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field

from .base import ApiModel

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
"""Times in the status (conditions, stage start/completion, progress.lastUpdate): RFC 3339 in UTC
to the second, the way Kubernetes writes `metav1.Time`."""


def timestamp(when: datetime | None = None) -> str:
    """`when` (default: now) as a status time; every status writer formats times through this."""
    return (when or datetime.now(UTC)).astimezone(UTC).strftime(TIME_FORMAT)


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from one status time to another; None when either is missing or unreadable."""
    try:
        parsed = [datetime.fromisoformat(t.replace("Z", "+00:00")) for t in (start, end)]  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return None
    return max(0.0, (parsed[1] - parsed[0]).total_seconds())


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
    message: str | None = None
    """Why the newest attempt ended, naming the failed job and pod."""


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


class LlavaRunStatus(ApiModel):
    observed_generation: int | None = None
    phase: Phase | None = None
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
    progress: Progress | None = None
    results: Results | None = None
