"""The capacity plan of a LlavaRun: per training stage, memory per device and time. Pure: the
spec, the model's geometry, the token lengths, the device and the MFU in; a JSON-ready dict out.
`llavarun plan` prints it; `llavarun local` and the operator can show or record the same dict.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from llava_trainer.deepspeed_config import batch_layout, build_deepspeed_config

from ..api import LlavaRunSpec, Stage
from ..api.profiles import Device
from ..api.status import timestamp
from ..trainer_command import stage_config
from .geometry import Geometry, for_stage
from .lengths import TokenLengths
from .memory import GIB, StepMemory, step_memory
from .timing import stage_time

MAX_GROWTH = 8
"""More GPUs are suggested up to this many times the stage's nodes."""


@dataclass(frozen=True)
class Setup:
    """What decides a stage's memory: the knobs a fix may turn."""

    micro_batch: int
    checkpointing: bool
    zero_stage: int
    nodes: int
    gpus_per_node: int

    @property
    def devices(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Mfu:
    percent: float
    source: str


def _memory(spec: LlavaRunSpec, stage: Stage, geometry: Geometry, setup: Setup, seq_len: int) -> StepMemory:
    hp = spec.pretrain if stage is Stage.PRETRAIN else spec.finetune
    config = stage_config(spec, stage).model_copy(
        update={"zero_stage": setup.zero_stage, "micro_batch_size": setup.micro_batch}
    )
    layout = batch_layout(hp.global_batch_size, setup.micro_batch, setup.devices)
    zero = build_deepspeed_config(config, layout, hp.precision, geometry.shape.hidden)["zero_optimization"]
    return step_memory(
        geometry,
        stage.value,  # type: ignore[arg-type]
        precision=hp.precision,
        zero_stage=setup.zero_stage,
        devices=setup.devices,
        micro_batch=setup.micro_batch,
        seq_len=seq_len,
        images_per_sample=1,
        checkpointing=setup.checkpointing,
        zero_optimization=zero,
    )


def _fix(
    spec: LlavaRunSpec, stage: Stage, geometry: Geometry, setup: Setup, seq_len: int, capacity: float
) -> dict[str, Any] | None:
    """The first single change that fits, cheapest first: gradient checkpointing, a smaller micro
    batch (more accumulation, same global batch), ZeRO-3, more nodes. None when none does."""
    global_batch = (spec.pretrain if stage is Stage.PRETRAIN else spec.finetune).global_batch_size
    candidates: list[tuple[str, Setup]] = []
    if not setup.checkpointing:
        candidates.append(("gradientCheckpointing: true", replace(setup, checkpointing=True)))
    micro = setup.micro_batch // 2
    while micro >= 1:
        if global_batch % (micro * setup.devices) == 0:
            candidates.append((f"microBatchSize: {micro}", replace(setup, micro_batch=micro)))
        micro //= 2
    if setup.zero_stage < 3:
        candidates.append(("zeroStage: 3", replace(setup, zero_stage=3)))
    nodes = setup.nodes * 2
    while nodes <= setup.nodes * MAX_GROWTH:
        if global_batch % (setup.micro_batch * nodes * setup.gpus_per_node) == 0:
            candidates.append((f"resources.nodes: {nodes}", replace(setup, nodes=nodes)))
        nodes *= 2
    for change, candidate in candidates:
        memory = _memory(spec, stage, geometry, candidate, seq_len)
        if memory.total <= capacity:
            return {
                "change": f"spec.{stage.value}.{change}",
                "devices": candidate.devices,
                "memoryGiB": memory.as_gib(),
            }
    return None


def plan_stage(
    spec: LlavaRunSpec,
    stage: Stage,
    geometry: Geometry,
    lengths: TokenLengths,
    device: Device,
    mfu: Mfu,
) -> dict[str, Any]:
    """One training stage's plan (memory per device, time at the given MFU)."""
    hp = spec.pretrain if stage is Stage.PRETRAIN else spec.finetune
    geometry = for_stage(geometry, spec, stage.value)
    setup = Setup(
        hp.micro_batch_size,
        hp.gradient_checkpointing,
        hp.zero_stage,
        hp.resources.nodes,
        hp.resources.gpus_per_node,
    )
    seq_len = min(hp.max_length, lengths.longest)
    memory = _memory(spec, stage, geometry, setup, seq_len)
    worst = _memory(spec, stage, geometry, setup, hp.max_length)
    capacity = device.memory_gib * GIB
    timing = stage_time(
        geometry.shape,
        stage.value,  # type: ignore[arg-type]
        lengths,
        epochs=hp.epochs,
        max_steps=hp.max_steps,
        global_batch=hp.global_batch_size,
        devices=setup.devices,
        peak_tflops=device.peak_tflops,
        mfu_percent=mfu.percent,
    )
    trained = "projector" if stage is Stage.PRETRAIN else "LLM + projector"
    if geometry.shape.adapter_params:
        trained = (
            f"LoRA adapters ({geometry.shape.adapter_params / 1e6:.0f}M) + projector, the LLM frozen; "
            "the adapters' dropout activations not counted"
        )
    assumptions = [
        *lengths.assumptions,
        f"activations for {hp.micro_batch_size} samples x {seq_len} tokens (the longest sample; at maxLength "
        f"{hp.max_length}: {worst.as_gib()['total']} GiB in all)",
        f"trains the {trained}; the rest frozen in {hp.precision}; ZeRO-{hp.zero_stage} over {setup.devices} devices",
        f"overhead: ZeRO buckets {memory.buffers / GIB:.2f} GiB + {memory.context / GIB:.1f} GiB CUDA context, "
        "NCCL and allocator fragmentation",
        f"MFU {mfu.percent:g}% ({mfu.source}) of {device.peak_tflops:g} TFLOP/s per {device.model}",
    ]
    if hp.max_steps and timing.samples < hp.epochs * lengths.samples:
        assumptions.append(f"maxSteps {hp.max_steps}: {timing.samples:,} of {lengths.samples:,} samples")
    gib = {**memory.as_gib(), "capacity": device.memory_gib}
    fits = memory.total <= capacity
    return {
        "devices": setup.devices,
        "microBatchSize": setup.micro_batch,
        "zeroStage": setup.zero_stage,
        "precision": hp.precision,
        "gradientCheckpointing": setup.checkpointing,
        "sequenceLength": seq_len,
        "memoryGiB": gib,
        "activationParts": memory.parts(),
        "fits": fits,
        "fix": None if fits else _fix(spec, stage, geometry, setup, seq_len, capacity),
        "samples": timing.samples,
        "meanTokens": round(lengths.mean_tokens, 1),
        "teraflops": round(timing.flops / 1e12),
        "mfu": mfu.percent,
        "mfuSource": mfu.source,
        "hours": round(timing.hours, 2),
        "gpuHours": round(timing.hours * setup.devices, 1),
        "lengthsFrom": lengths.source,
        "assumptions": assumptions,
    }


def capacity_plan(
    name: str,
    spec: LlavaRunSpec,
    geometry: Geometry,
    lengths: dict[Stage, TokenLengths],
    device: Device,
    mfu: dict[Stage, Mfu],
    *,
    now: datetime | None = None,
    device_source: str = "",
) -> dict[str, Any]:
    """The plan of every training stage in spec.stages, run one after the other from `now`."""
    start = now or datetime.now(UTC)
    stages: dict[str, Any] = {}
    elapsed = 0.0
    for stage in spec.stages:
        if stage not in (Stage.PRETRAIN, Stage.FINETUNE):
            continue
        planned = plan_stage(spec, stage, geometry, lengths[stage], device, mfu[stage])
        elapsed += planned["hours"]
        planned["end"] = timestamp(start + timedelta(hours=elapsed))
        stages[stage.value] = planned
    return {
        "run": name,
        "model": geometry.name,
        "device": {
            "model": device.model,
            "peakTflops": device.peak_tflops,
            "memoryGiB": device.memory_gib,
            "source": device_source,
        },
        "start": timestamp(start),
        "stages": stages,
        "hours": round(sum(s["hours"] for s in stages.values()), 2),
        "gpuHours": round(sum(s["gpuHours"] for s in stages.values()), 1),
    }
