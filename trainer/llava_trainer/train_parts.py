"""The pieces a training stage is made of, named by the loop in `train.py`: the text side
(tokenizer with <image> and <pad>, image processor, tokens per image), this rank's data loader, the
model as the stage trains it (assembled or loaded whole, frozen, LoRA), the DeepSpeed engine, the
loss of one micro-batch, and the Hugging Face export at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import lora
from . import model as llava_model
from .config import EXPORT_DIR, PROJECTOR_FILE, TrainConfig
from .deepspeed_config import parameter_groups
from .distributed import World, barrier
from .flops import LlavaShape

if TYPE_CHECKING:
    from .train import Schedule


@dataclass
class TextSide:
    """What the data pipeline and the model share about tokens and images."""

    tokenizer: Any
    image_processor: Any
    image_token_id: int
    num_image_tokens: int


def load_text_side(config: TrainConfig) -> TextSide:
    """Tokenizer extended with <image> and <pad> (as HF's llava-1.5), the CLIP image processor, and
    how many tokens each image becomes (llava_trainer.tokenizer): from the language model and the
    vision tower, or from the LLaVA model a task finetune starts from (checked whole first)."""
    from transformers import CLIPImageProcessor

    from .prepare import llava_model_problems
    from .tokenizer import llava_tokens, load_tokenizer

    if config.start_model is not None and (
        problems := llava_model_problems(config.start_model, "--model-path")
    ):
        raise SystemExit(f"llava-trainer {config.stage}: " + "\n  ".join(problems))

    tokenizer = load_tokenizer(config.tokenizer_dir, max_length=config.max_length)
    tokens = llava_tokens(tokenizer, config.vision_dir)
    image_processor = CLIPImageProcessor.from_pretrained(config.vision_dir)
    return TextSide(tokenizer, image_processor, tokens.image_token_id, tokens.num_image_tokens)


def build_loader(config: TrainConfig, text: TextSide, world: World) -> Any:
    """This rank's micro-batches (llava_trainer.data), built for the run's batch layout, which it
    validates and exposes as `.layout` (BatchSizeError when the global batch does not split)."""
    from .data import build_train_loader

    return build_train_loader(
        config,
        text.tokenizer,
        text.image_processor,
        rank=world.rank,
        world_size=world.world_size,
        num_image_tokens=text.num_image_tokens,
        image_token_id=text.image_token_id,
    )


def build_model(
    config: TrainConfig, text: TextSide, world: World, precision: str, ds_config: dict[str, Any]
) -> tuple[torch.nn.Module, LlavaShape, dict[str, int], str]:
    """The LLaVA model for this stage: assembled (finetune: with pretrain's projector) or, for a
    task finetune, loaded whole; frozen as the stage says, with LoRA adapters when asked; its FLOP
    shape, trainable parameter counts and attention implementation."""
    attention = llava_model.attention_implementation(world.device_type, precision)
    common = {
        "vocab_size": len(text.tokenizer),
        "image_token_id": text.image_token_id,
        "pad_token_id": text.tokenizer.pad_token_id,
        "precision": precision,
        "device": world.device,
        "zero3_config": ds_config if config.zero_stage == 3 else None,
        "attn_implementation": attention,
    }
    if config.start_model is not None:
        model = llava_model.load_llava(config.start_model, **common)
    else:
        model = llava_model.build_llava(
            language_model=config.resolve(config.language_model),
            vision_tower=config.resolve(config.vision_tower),
            **common,
        )
    shape = LlavaShape.from_config(model.config)
    if shape.image_tokens != text.num_image_tokens:
        raise SystemExit(
            f"llava-trainer: the data pipeline expands <image> into {text.num_image_tokens} tokens but the "
            f"vision tower {config.vision_dir} yields {shape.image_tokens} per image"
        )
    if config.stage == "finetune" and config.start_model is None:
        llava_model.load_projector(model, config.projector_path)
    lora_params = config.lora_params
    trainable = llava_model.freeze_for_stage(model, config.stage, lora=lora_params is not None)
    if config.gradient_checkpointing:
        llava_model.enable_gradient_checkpointing(model)
    if lora_params is not None:
        try:
            model, trainable["lora_adapters"] = lora.apply_lora(model, lora_params)
        except ValueError as err:
            raise SystemExit(f"llava-trainer {config.stage}: {err}") from None
        shape = replace(shape, adapter_params=trainable["lora_adapters"])
    return model, shape, trainable, attention


def initialize_engine(
    model: torch.nn.Module, config: TrainConfig, ds_config: dict[str, Any], schedule: Schedule
) -> Any:
    """The DeepSpeed engine: AdamW over the trainable parameters, HF's LR schedule, training mode."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(
            model.named_parameters(),
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            adapter_learning_rate=config.lora_params.learning_rate if config.lora_params else None,
            is_adapter=lora.is_adapter,
        ),
        config=ds_config,
        lr_scheduler=partial(_lr_schedule, config.lr_scheduler, schedule.warmup_steps, schedule.total_steps),
    )
    engine.train()
    return engine


def forward_loss(engine: Any, batch: dict[str, Any], world: World, text: TextSide) -> torch.Tensor:
    """The LM loss of one micro-batch, always through the vision tower and the projector.

    A text-only micro-batch gets one extra row: a blank image's tokens, all labels ignored, so it
    adds nothing to the loss and exactly zero to the gradients (LLaVA feeds a blank image the same
    way). Every rank thus runs the same modules in the same order: under ZeRO-3 parameters are
    gathered by collectives, and ranks running different modules deadlock. It also avoids stale
    gradients that DeepSpeed ZeRO-3 (0.19) leaves in a parameter a micro-batch does not use.
    """
    dtype = next(p for p in engine.module.parameters()).dtype
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    pixel_values = batch.get("pixel_values")
    if pixel_values is None:
        vision = engine.module.config.vision_config
        inputs = llava_model.with_blank_image_row(
            inputs, text.image_token_id, text.tokenizer.pad_token_id, text.num_image_tokens
        )
        pixel_values = torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size)
    inputs = {k: v.to(world.device, non_blocking=True) for k, v in inputs.items()}
    inputs["pixel_values"] = pixel_values.to(world.device, dtype=dtype, non_blocking=True)
    return engine(**inputs).loss


def export(engine: Any, config: TrainConfig, text: TextSide, world: World) -> tuple[Path, Path | None]:
    """The HF model directory (and, for pretrain, mm_projector.bin). Under ZeRO-3 the 16-bit
    weights are gathered layer by layer to rank 0 first (a collective). A LoRA finetune exports
    the model with its adapters merged, and also the adapters alone (peft's format, `adapter/`)
    and the trained projector (mm_projector.bin), as LLaVA's LoRA script keeps them."""
    if config.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict() if world.is_main else None
    out = config.stage_output
    export_dir, projector = out / EXPORT_DIR, None
    if world.is_main:
        model = engine.module
        if config.lora_params is not None:  # the last use of the weights: merge into them
            model = lora.merged_for_export(model, state_dict, out / lora.ADAPTER_DIR)
            state_dict = model.state_dict()
        processor = llava_model.build_processor(
            text.tokenizer, text.image_processor, model.config, config.image_aspect_ratio
        )
        llava_model.export_model(model, state_dict, processor, export_dir)
        if config.stage == "pretrain" or config.lora_params is not None:
            projector = out / PROJECTOR_FILE
            llava_model.save_projector(state_dict, projector)
    barrier(world)
    return export_dir, projector


def _lr_schedule(kind: str, warmup_steps: int, total_steps: int, optimizer: torch.optim.Optimizer) -> Any:
    """HF's schedules (what LLaVA's Trainer used): linear warmup, then cosine / linear / constant."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if kind == "constant" else kind
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
