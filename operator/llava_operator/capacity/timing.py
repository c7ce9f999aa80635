"""Time of a training stage: model FLOPs from the trainer's own accounting, over peak x devices x MFU.

FLOPs per sample are `llava_trainer.flops.sample_flops`, the function the trainer's MFU is
computed with, so a run that reaches the MFU assumed here takes the time predicted here. Plain
Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_trainer.flops import LlavaShape, Stage, sample_flops

from .lengths import TokenLengths

DEFAULT_MFU = 35.0
"""Percent, ours (model FLOPs on real tokens). About what LLaVA-1.5's published 13B pretrain on
8 A100s reached in this convention (its finetune: about 26%); a measured value replaces it."""


@dataclass(frozen=True)
class StageTime:
    samples: int
    """Samples trained (all epochs, or max_steps x global batch)."""
    flops: float
    seconds: float

    @property
    def hours(self) -> float:
        return self.seconds / 3600


def epoch_flops(shape: LlavaShape, stage: Stage, lengths: TokenLengths) -> float:
    """Model FLOPs of one pass over the stage's samples (one call per distinct length)."""
    return sum(
        n * sample_flops(shape, stage, tokens, images) for (tokens, images), n in lengths.counts.items()
    )


def stage_time(
    shape: LlavaShape,
    stage: Stage,
    lengths: TokenLengths,
    *,
    epochs: int,
    max_steps: int,
    global_batch: int,
    devices: int,
    peak_tflops: float,
    mfu_percent: float,
) -> StageTime:
    """Epochs over the data, or max_steps optimizer steps of `global_batch` average samples."""
    per_epoch = epoch_flops(shape, stage, lengths)
    samples = epochs * lengths.samples
    flops = epochs * per_epoch
    if max_steps and max_steps * global_batch < samples:
        samples = max_steps * global_batch
        flops = per_epoch / max(lengths.samples, 1) * samples
    seconds = flops / (peak_tflops * 1e12 * devices * mfu_percent / 100)
    return StageTime(samples, flops, seconds)
