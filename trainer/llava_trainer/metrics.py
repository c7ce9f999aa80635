"""FLOP accounting, MFU, throughput and the training log (TensorBoard + JSON lines).

Two MFU conventions are reported side by side:

- ours: model FLOPs actually needed per sample, on real (unpadded) tokens. LLM dense matmuls
  4·N·T in pretrain (frozen LLM: forward 2N plus the activation-gradient backward 2N that the
  projector's gradients need) or 6·N·T in finetune; a LoRA finetune is the frozen LLM's 4·N·T
  plus 6·N_a·T for the N_a adapter parameters (forward, activation and weight gradients); attention QKᵀ and AV 12·T²·d·L (forward and
  backward, both stages); the CLIP forward for every image; the trained projector 6·N_proj per
  image token. Gradient-checkpoint recomputation is not counted (that would be HFU).
- FlagPerf's: 2·N (pretrain) or 6·N (finetune, LoRA too) per *padded* token, N the nominal LLM
  size (7e9, 13e9), nothing else; so numbers compare with the published FlagPerf tables.

N here counts the LLM's matmul weights: every linear layer plus the LM head, not the input
embedding (a lookup) or the norms. The peak per device, MFU's denominator, comes from the one
accelerator table (llava_operator.api.profiles). This module is plain Python at import time
(torch, DeepSpeed, tensorboard, the status reporter and the table load lazily) so bench/gpu_step.py
can use it without DeepSpeed or pydantic. `ProgressLog` at the end is what the training loop
reports each logging step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .distributed import World

Stage = Literal["pretrain", "finetune"]


@dataclass(frozen=True)
class LlavaShape:
    """The dimensions FLOP counting needs, from a LlavaConfig (or any config shaped like one)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    channels: int = 3
    feature_layers: int = 1
    adapter_params: int = 0
    """Trained LoRA adapter parameters on the LLM (its own weights then frozen); 0: no adapters."""

    @classmethod
    def from_config(cls, config: Any) -> LlavaShape:
        text, vision = config.text_config, config.vision_config
        heads = text.num_attention_heads
        layer = getattr(config, "vision_feature_layer", -2)
        return cls(
            hidden=text.hidden_size,
            layers=text.num_hidden_layers,
            intermediate=text.intermediate_size,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab=text.vocab_size,
            vision_hidden=vision.hidden_size,
            vision_layers=vision.num_hidden_layers,
            vision_intermediate=vision.intermediate_size,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            channels=getattr(vision, "num_channels", 3),
            feature_layers=1 if isinstance(layer, int) else len(layer),
        )

    @property
    def image_tokens(self) -> int:
        """LLM tokens per image: one per patch (CLS dropped, 'default' select strategy)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def llm_matmul_params(self) -> int:
        """N: attention and MLP (SwiGLU) weights of every layer plus the LM head."""
        per_layer = sum(d_in * d_out for d_in, d_out in self.decoder_linears().values())
        return self.layers * per_layer + self.hidden * self.vocab

    def decoder_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer, by module name (LLaMA's)."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q_out),
            "k_proj": (self.hidden, kv_out),
            "v_proj": (self.hidden, kv_out),
            "o_proj": (q_out, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }

    def lora_params(self, r: int, targets: Sequence[str] = ()) -> int:
        """Parameters of rank-`r` adapters on the `targets` linear layers (empty: all of them) of
        every decoder layer: r x (in + out) each (A is r x in, B is out x r)."""
        linears = self.decoder_linears()
        chosen = targets or list(linears)
        return self.layers * sum(r * sum(linears[name]) for name in chosen)

    @property
    def llm_params(self) -> int:
        """All LLM parameters (adds the input embedding and the RMSNorm weights)."""
        return self.llm_matmul_params + self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    @property
    def projector_params(self) -> int:
        d_in = self.vision_hidden * self.feature_layers
        return d_in * self.hidden + self.hidden + self.hidden * self.hidden + self.hidden

    def clip_forward_flops(self) -> float:
        """One image through CLIP: patch embedding, every encoder layer's matmuls and attention."""
        tokens = self.image_tokens + 1  # + CLS
        d, ffn = self.vision_hidden, self.vision_intermediate
        patch_embed = 2 * self.channels * self.patch_size**2 * d * self.image_tokens
        layer_matmuls = 2 * (4 * d * d + 2 * d * ffn) * tokens
        attention = 4 * tokens**2 * d
        return patch_embed + self.vision_layers * (layer_matmuls + attention)


def flagperf_params(llm_params: int) -> float:
    """FlagPerf's fixed N: the LLM size rounded to whole billions (6.74e9 -> 7e9, 13.0e9 -> 13e9),
    as its case hard-codes 7e9 / 13e9; exact below one billion (tiny test models)."""
    return float(round(llm_params / 1e9) * 1e9) if llm_params >= 1e9 else float(llm_params)


def sample_flops(shape: LlavaShape, stage: Stage, tokens: int, images: int) -> float:
    """Model FLOPs of one training sample of `tokens` real LLM tokens (images included) (ours)."""
    if stage == "pretrain":
        dense = 4 * shape.llm_matmul_params * tokens
    elif shape.adapter_params:  # LoRA: the frozen LLM computes no weight gradients; the adapters do
        dense = (4 * shape.llm_matmul_params + 6 * shape.adapter_params) * tokens
    else:
        dense = 6 * shape.llm_matmul_params * tokens
    attention = 12 * tokens**2 * shape.hidden * shape.layers
    vision = images * (shape.clip_forward_flops() + 6 * shape.projector_params * shape.image_tokens)
    return float(dense + attention + vision)


def batch_flops(shape: LlavaShape, stage: Stage, sample_tokens: list[int], images: int) -> float:
    """Model FLOPs of a micro-batch: per-sample LLM terms (attention is quadratic per sample)."""
    llm = sum(sample_flops(shape, stage, t, 0) for t in sample_tokens)
    return llm + sample_flops(shape, stage, 0, images)


def flagperf_flops(shape: LlavaShape, stage: Stage, padded_tokens: int) -> float:
    """FlagPerf's model FLOPs: 2N (pretrain) or 6N (finetune) per padded token."""
    return (2 if stage == "pretrain" else 6) * flagperf_params(shape.llm_params) * padded_tokens


def resolve_peak_tflops(
    configured: float, device_name: str, profile: str | None = None
) -> tuple[float | None, str]:
    """Per-device peak TFLOP/s for MFU and where it came from: the flag, LLAVARUN_PEAK_TFLOPS, else
    the accelerator table (the device's row, else the profile's default; None when neither)."""
    if configured > 0:
        return configured, "--peak-tflops"
    env = os.environ.get("LLAVARUN_PEAK_TFLOPS", "")
    if env:
        try:
            if float(env) > 0:
                return float(env), "LLAVARUN_PEAK_TFLOPS"
        except ValueError:
            print(f"llava-trainer: ignoring LLAVARUN_PEAK_TFLOPS={env!r} (not a number)", file=sys.stderr)
    # Imported here: bench/gpu_step.py imports this module where the API package's pydantic is absent.
    from llava_operator.api.profiles import device_peak_tflops

    return device_peak_tflops(profile, device_name)


def mfu_percent(flops: float, seconds: float, devices: int, peak_tflops: float | None) -> float | None:
    if not peak_tflops or seconds <= 0 or devices <= 0:
        return None
    return 100.0 * flops / (seconds * devices * peak_tflops * 1e12)


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
