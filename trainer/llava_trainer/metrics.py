"""Throughput and the training log: what the training loop counts and reports each logging step.

Rates and both MFU conventions come from the counters of a window of steps summed over all ranks
(`Throughput`, FLOPs from `flops`); rank 0 writes JSON lines and TensorBoard scalars
(`TrainingLog`) and the LlavaRun status (`ProgressLog`). Plain Python at import time: torch,
tensorboard and the status reporter load lazily.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .flops import LlavaShape, batch_flops, flagperf_flops, mfu_percent

if TYPE_CHECKING:
    from .distributed import World


@dataclass
class Throughput:
    """Counters summed over all ranks for a window of steps; turned into rates and MFU."""

    samples: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    images: int = 0
    flops: float = 0.0
    flagperf_flops: float = 0.0

    def add(self, other: Throughput) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_list(self) -> list[float]:
        return [float(getattr(self, n)) for n in self.__dataclass_fields__]

    @classmethod
    def from_list(cls, values: list[float]) -> Throughput:
        names = list(cls.__dataclass_fields__)
        return cls(
            **{n: (v if n.endswith("flops") else round(v)) for n, v in zip(names, values, strict=True)}
        )

    def rates(self, seconds: float, devices: int, peak_tflops: float | None) -> dict[str, float | None]:
        seconds = max(seconds, 1e-9)
        return {
            "samples_per_second": self.samples / seconds,
            "tokens_per_second": self.real_tokens / seconds,
            "padded_tokens_per_second": self.padded_tokens / seconds,
            "tokens_per_second_per_device": self.real_tokens / seconds / devices,
            "padded_tokens_per_second_per_device": self.padded_tokens / seconds / devices,
            "tflops_per_device": self.flops / seconds / devices / 1e12,
            "mfu": mfu_percent(self.flops, seconds, devices, peak_tflops),
            "mfu_flagperf": mfu_percent(self.flagperf_flops, seconds, devices, peak_tflops),
        }


class TrainingLog:
    """Rank 0's log: one JSON object per line on stdout, and TensorBoard scalars."""

    def __init__(self, tensorboard_dir: Path | None, *, stage: str, enabled: bool = True) -> None:
        self.stage, self.enabled = stage, enabled
        self._writer = None
        if enabled and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(tensorboard_dir))

    def event(self, event: str, **fields: Any) -> None:
        """A JSON line: {"event": ..., "stage": ..., "time": ..., **fields}."""
        if not self.enabled:
            return
        record = {"event": event, "stage": self.stage, "time": round(time.time(), 3), **fields}
        print(json.dumps(_finite(record), default=str, allow_nan=False), flush=True)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(f"{self.stage}/{name}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


def _finite(value: Any) -> Any:
    """NaN/inf as null: JSON has no NaN, and a diverged loss must still be logged."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# --- what the training loop reports (rank 0), built on the above ------------------------------------

_PROGRESS_FIELDS = {
    "step",
    "total_steps",
    "epoch",
    "loss",
    "learning_rate",
    "grad_norm",
    "samples_per_second",
    "tokens_per_second",
    "padded_tokens_per_second",
    "mfu",
    "mfu_flagperf",
    "gpu_memory_gib",
    "eta_seconds",
}


def count_batch(batch: dict[str, Any], shape: LlavaShape, stage: str) -> Throughput:
    """Samples, real and padded tokens, images and model FLOPs of one micro-batch (this rank)."""
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1).tolist()
    images = int(batch.get("num_images", batch["pixel_values"].shape[0] if "pixel_values" in batch else 0))
    padded = int(batch["input_ids"].numel())
    return Throughput(
        samples=int(batch.get("num_samples", len(lengths))),
        real_tokens=int(sum(lengths)),
        padded_tokens=padded,
        images=images,
        flops=batch_flops(shape, stage, lengths, images),  # type: ignore[arg-type]
        flagperf_flops=flagperf_flops(shape, stage, padded),  # type: ignore[arg-type]
    )


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if hasattr(norm, "item") else norm)


def _device_memory_gib(world: World) -> float | None:
    """Peak accelerator memory since start; None on CPU (host RSS is not device memory)."""
    if world.device_type == "cpu":
        return None
    from deepspeed.accelerator import get_accelerator

    return round(get_accelerator().max_memory_allocated(world.local_rank) / 2**30, 2)


def _now(world: World) -> float:
    """Wall time after the device has finished its queued work (so windows time real work)."""
    if world.device_type != "cpu":
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize()
    return time.monotonic()


class ProgressLog:
    """Everything rank 0 reports: JSON log lines, TensorBoard, the LlavaRun status. Counters are
    per rank and summed over ranks only at logging steps (one collective per log)."""

    def __init__(
        self,
        out: Path,
        stage: str,
        world: World,
        shape: LlavaShape,
        peak: float | None,
        *,
        total_steps: int,
        steps_per_epoch: int,
        logging_steps: int,
    ) -> None:
        self.stage, self.world, self.shape, self.peak = stage, world, shape, peak
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.logging_steps = logging_steps
        from .status import StatusReporter  # pydantic: imported here so the bench need not have it

        self.log = TrainingLog(out / "tensorboard", stage=stage, enabled=world.is_main)
        self.status = StatusReporter.from_env() if world.is_main else StatusReporter()
        self.status.stage = self.status.stage or stage
        self.window, self.stage_totals = Throughput(), Throughput()
        self.loss_sum: Any = None
        self.loss_count = 0
        self.last_loss = float("nan")
        self.start_step, self.loop_seconds, self.window_started = 0, 0.0, 0.0

    def event(self, name: str, **fields: Any) -> None:
        self.log.event(name, **fields)

    def begin(self, step: int) -> None:
        """The loop starts (at `step` after a resume): report it before the first step completes."""
        self.start_step, self.window_started = step, _now(self.world)
        percent = int(100 * step / self.total_steps)
        self.status.progress(step=step, total_steps=self.total_steps, percent=percent)

    def micro_batch(self, batch: dict[str, Any], loss: Any) -> None:
        self.window.add(count_batch(batch, self.shape, self.stage))
        value = loss.detach().float()
        self.loss_sum = value if self.loss_sum is None else self.loss_sum + value
        self.loss_count += 1

    def step_done(self, state: Any, engine: Any, *, stopping: bool) -> None:
        """After an optimizer step: log every `logging_steps`-th step, the last one, and the one a
        stop follows (so no step's loss goes unreported)."""
        if state.step % self.logging_steps == 0 or state.step == self.total_steps or stopping:
            self.log_step(state, engine)

    def log_step(self, state: Any, engine: Any) -> None:
        """One `step` line (and TensorBoard, status) for the steps since the last one; adds the
        window's samples and seconds to the train state (checkpointed)."""
        now = _now(self.world)
        seconds = now - self.window_started
        local_loss = float(self.loss_sum.item()) if self.loss_sum is not None else 0.0
        from .distributed import all_reduce_floats

        summed = all_reduce_floats([local_loss, float(self.loss_count), *self.window.as_list()], self.world)
        self.last_loss = summed[0] / summed[1] if summed[1] else float("nan")
        window = Throughput.from_list(summed[2:])
        self.stage_totals.add(window)
        self.loop_seconds += seconds
        state.samples += window.samples
        state.train_seconds += seconds
        done = state.step - self.start_step
        record = {
            "step": state.step,
            "total_steps": self.total_steps,
            "epoch": round(state.step / self.steps_per_epoch, 4),
            "loss": self.last_loss,
            "learning_rate": engine.get_lr()[0],  # after the step, as HF Trainer logs it
            "grad_norm": _grad_norm(engine),
            **window.rates(seconds, self.world.world_size, self.peak),
            "gpu_memory_gib": _device_memory_gib(self.world),
            "eta_seconds": int(self.loop_seconds / done * (self.total_steps - state.step)) if done else None,
        }
        self.log.event("step", **record)
        self.log.scalars(state.step, {k: v for k, v in record.items() if isinstance(v, int | float)})
        progress = {k: v for k, v in record.items() if k in _PROGRESS_FIELDS}
        self.status.progress(**progress, percent=int(100 * state.step / self.total_steps))
        self.window, self.loss_sum, self.loss_count, self.window_started = Throughput(), None, 0, now

    def finish(self, state: Any, data: dict[str, Any] | None, **results: Any) -> None:
        """The stage's results (this attempt's throughput and MFU) to the log and the status; what
        the data loader skipped or truncated to the log only (prepare reports data health)."""
        rates = self.stage_totals.rates(self.loop_seconds, self.world.world_size, self.peak)
        results = {
            "steps": state.step,
            "samples": state.samples,
            "final_loss": self.last_loss,
            **{k: rates[k] for k in ("samples_per_second", "tokens_per_second", "mfu", "mfu_flagperf")},
            **results,
        }
        self.log.event("end", **results, data=data)
        self.status.progress(step=state.step, total_steps=self.total_steps, percent=100, eta_seconds=0)
        self.status.results(self.stage, {k: v for k, v in results.items() if v is not None and _is_finite(v)})
        self.close()

    def close(self) -> None:
        self.status.flush()
        self.log.close()


def _is_finite(value: Any) -> bool:
    return not (isinstance(value, float) and not math.isfinite(value))
