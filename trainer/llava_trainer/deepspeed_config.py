"""The batch layout and the DeepSpeed config of a training stage, generated from its TrainConfig.

Mirrors LLaVA's scripts/zero2.json and zero3.json (which FlagPerf reuses) with HF Trainer's
"auto" values resolved: ZeRO-2 for pretrain, ZeRO-3 for finetune (from `--zero-stage`), bucket
sizes from the LLM's hidden size, gradient clipping 1.0. The optimizer is torch's AdamW
(`torch_adam`), so no DeepSpeed op has to be compiled and every accelerator works the same; its
parameter groups (`parameter_groups`) carry their own learning rates (LoRA's adapters and the
projector differ, as in LLaVA's finetune_lora.sh) and DeepSpeed keeps them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from .config import TrainConfig

Precision = Literal["bf16", "fp16", "fp32"]
GRADIENT_CLIPPING = 1.0
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class BatchSizeError(ValueError):
    pass


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch splits: global = micro x gradient accumulation x world size. Made by
    `batch_layout` once per run; the data loader and the DeepSpeed config both take this one."""

    global_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int

    def __post_init__(self) -> None:
        parts = self.micro_batch_size * self.gradient_accumulation_steps * self.world_size
        if min(self.micro_batch_size, self.gradient_accumulation_steps, self.world_size) < 1 or (
            parts != self.global_batch_size
        ):
            raise BatchSizeError(f"inconsistent batch layout {self}")


def batch_layout(global_batch_size: int, micro_batch_size: int, world_size: int) -> BatchLayout:
    """Gradient accumulation from the global batch; an error that says what would fit otherwise."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        fits = [m for m in range(1, global_batch_size + 1) if global_batch_size % (m * world_size) == 0]
        raise BatchSizeError(
            f"--global-batch-size {global_batch_size} is not a multiple of --micro-batch-size "
            f"{micro_batch_size} x {world_size} processes = {per_step}. With {world_size} processes "
            f"micro batch sizes that fit are {fits[:12]}; or change the global batch size "
            f"(e.g. {max(1, global_batch_size // per_step) * per_step})."
        )
    return BatchLayout(global_batch_size, micro_batch_size, global_batch_size // per_step, world_size)


def build_deepspeed_config(
    config: TrainConfig, layout: BatchLayout, precision: Precision, hidden_size: int
) -> dict[str, Any]:
    """The DeepSpeed JSON config for this stage (logged at start so a run can be reproduced)."""
    stage = config.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero |= {
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": hidden_size * hidden_size,
            "allgather_bucket_size": max(hidden_size * hidden_size, int(5e8)),
        }
    if stage == 2:
        zero |= {"sub_group_size": int(1e9)}
    if stage == 3:
        zero |= {
            "sub_group_size": int(1e9),
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_max_live_parameters": int(1e9),
            "stage3_max_reuse_distance": int(1e9),
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    return {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.gradient_accumulation_steps,
        "gradient_clipping": GRADIENT_CLIPPING,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": config.learning_rate,
                "betas": list(ADAM_BETAS),
                "eps": ADAM_EPS,
                "weight_decay": config.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,  # our own log reports every step; keep DeepSpeed's quiet
        "wall_clock_breakdown": False,
    }


def parameter_groups(
    named_parameters: Iterable[tuple[str, Any]],
    *,
    learning_rate: float,
    weight_decay: float,
    adapter_learning_rate: float | None = None,
    is_adapter: Callable[[str], bool] = lambda name: False,
) -> list[dict[str, Any]]:
    """AdamW's groups of trainable parameters: LoRA adapters first at `adapter_learning_rate` (when
    given), the rest (projector; the LLM in a full finetune) at `learning_rate`; within each, no
    weight decay on biases and norm weights (as HF Trainer). The LR schedule scales every group's
    rate alike, and the log's learning_rate is the first group's."""
    groups: dict[tuple[bool, bool], list[Any]] = {}
    for name, param in named_parameters:
        if param.requires_grad:
            adapter = adapter_learning_rate is not None and is_adapter(name)
            decays = param.ndim >= 2 and not name.endswith(".bias")
            groups.setdefault((adapter, decays), []).append(param)
    return [
        {
            "params": groups[adapter, decays],
            "lr": adapter_learning_rate if adapter else learning_rate,
            "weight_decay": weight_decay if decays else 0.0,
        }
        for adapter in (True, False)
        for decays in (True, False)
        if (adapter, decays) in groups
    ]
