"""`llava-trainer pretrain` and `llava-trainer finetune`: the training loop on DeepSpeed.

Read `train()` top to bottom: set up (precision, tokenizer, model, data, DeepSpeed), resume from
the newest complete checkpoint, loop over optimizer steps (log, report, checkpoint, honour
SIGTERM), then save the final checkpoint and export a Hugging Face model directory.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from . import model as llava_model
from .checkpoint import TrainState
from .config import EXPORT_DIR, PROJECTOR_FILE, TrainConfig, config_to_args
from .deepspeed_config import BatchSizeError, batch_layout, build_deepspeed_config
from .distributed import (
    World,
    barrier,
    init_distributed,
    relaunch_under_torchrun_if_needed,
)
from .metrics import LlavaShape, ProgressLog, resolve_peak_tflops

log = logging.getLogger("llava_trainer.train")

EXIT_TERMINATED = 143
"""128 + SIGTERM: the stage failed on purpose so the operator retries it (and we resume)."""


def run(config: TrainConfig) -> int:
    """Entry point of the `pretrain` / `finetune` commands."""
    relaunch_under_torchrun_if_needed([config.stage, *config_to_args(config)])
    world = init_distributed()
    _setup_logging(world)
    try:
        return train(config, world)
    finally:
        from .distributed import shutdown

        shutdown()


@dataclass
class TextSide:
    """What the data pipeline and the model share about tokens and images."""

    tokenizer: Any
    image_processor: Any
    image_token_id: int
    num_image_tokens: int


def train(config: TrainConfig, world: World) -> int:
    started = time.monotonic()
    stage = config.stage
    torch.manual_seed(config.seed)  # same on every rank: the new projector must start identical
    if world.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # LLaVA's --tf32 True
        torch.backends.cudnn.allow_tf32 = True

    # --- precision, tokenizer, batch layout, DeepSpeed config -------------------------------
    precision, why = llava_model.choose_precision(config.precision, world.device_type)
    text = load_text_side(config)
    try:
        layout = batch_layout(config.global_batch_size, config.micro_batch_size, world.world_size)
    except BatchSizeError as err:
        raise SystemExit(f"llava-trainer {stage}: {err}") from None
    llm_config = llava_model.language_model_config(config.resolve(config.language_model))
    ds_config = build_deepspeed_config(config, layout, precision, llm_config.hidden_size)

    # --- model: assemble, load pretrain's projector, freeze -----------------------------------
    attn = llava_model.attention_implementation(world.device_type, precision)
    model = llava_model.build_llava(
        language_model=config.resolve(config.language_model),
        vision_tower=config.resolve(config.vision_tower),
        vocab_size=len(text.tokenizer),
        image_token_id=text.image_token_id,
        pad_token_id=text.tokenizer.pad_token_id,
        precision=precision,
        device=world.device,
        zero3_config=ds_config if config.zero_stage == 3 else None,
        attn_implementation=attn,
    )
    shape = LlavaShape.from_config(model.config)
    if shape.image_tokens != text.num_image_tokens:
        raise SystemExit(
            f"llava-trainer: the data pipeline expands <image> into {text.num_image_tokens} tokens but the "
            f"vision tower {config.vision_tower} yields {shape.image_tokens} per image"
        )
    if stage == "finetune":
        llava_model.load_projector(model, config.projector_path)
    trainable = llava_model.freeze_for_stage(model, stage)
    if config.gradient_checkpointing:
        llava_model.enable_gradient_checkpointing(model)

    # --- data and schedule --------------------------------------------------------------------
    loader = build_loader(config, text, world)
    steps_per_epoch = len(loader) // layout.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise SystemExit(
            f"llava-trainer: {len(loader)} micro-batches per process per epoch is less than one optimizer "
            f"step ({layout.gradient_accumulation_steps} micro-batches); lower --global-batch-size"
        )
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)

    # --- DeepSpeed ------------------------------------------------------------------------------
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=_parameter_groups(model, config.weight_decay),
        config=ds_config,
        lr_scheduler=partial(_lr_schedule, config.lr_scheduler, warmup_steps, total_steps),
    )

    # --- observability and resume ------------------------------------------------------------------
    out = config.stage_output
    peak, peak_source = resolve_peak_tflops(config.peak_tflops, world.device_name, config.accelerator)
    progress = ProgressLog(out, stage, world, shape, peak, total_steps, steps_per_epoch)
    progress.event(
        "start",
        world_size=world.world_size,
        device=world.device_name,
        backend=world.backend,
        precision=precision,
        precision_note=why,
        attention=attn,
        trainable_parameters=trainable,
        llm_parameters=shape.llm_params,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        gradient_accumulation_steps=layout.gradient_accumulation_steps,
        peak_tflops=peak,
        peak_source=peak_source,
        deepspeed=ds_config,
    )
    if why:
        log.warning("%s", why)
    ckpt_root = out / "checkpoints"
    state, loader_state, resumed_from = checkpoint.resume(engine, ckpt_root, world)
    if resumed_from is not None:
        progress.event("resume", checkpoint=str(resumed_from), step=state.step, epoch=state.epoch)
    progress.begin(state.step)
    last_ckpt_seconds: float | None = None

    # --- the loop -----------------------------------------------------------------------------------
    engine.train()
    with checkpoint.GracefulStop() as stop:
        for epoch in range(state.epoch, config.epochs):
            if state.step >= total_steps:
                break
            loader.set_epoch(epoch)
            if loader_state is not None and state.step % steps_per_epoch:
                loader.load_state_dict(loader_state)  # mid-epoch resume: continue where it stopped
            loader_state = None
            batches = iter(loader)
            while state.step < min(total_steps, (epoch + 1) * steps_per_epoch):
                for _ in range(layout.gradient_accumulation_steps):
                    batch = next(batches, None)
                    if batch is None:
                        raise RuntimeError(
                            f"the data loader ended before the {len(loader)} micro-batches it announced"
                        )
                    loss = forward_loss(engine, batch, world, text)
                    engine.backward(loss)
                    engine.step()  # DeepSpeed steps optimizer and scheduler at the accumulation boundary
                    progress.micro_batch(batch, loss)
                state.step += 1
                state.epoch = state.step // steps_per_epoch

                terminating = stop.requested_anywhere(world)
                if state.step % config.logging_steps == 0 or state.step == total_steps or terminating:
                    progress.log_step(state, engine)
                if terminating:
                    return terminate(
                        engine, ckpt_root, state, loader, world, config, stop, last_ckpt_seconds, progress
                    )
                if state.step % config.save_steps == 0 and state.step < total_steps:
                    _, last_ckpt_seconds = checkpoint.save_checkpoint(
                        engine, ckpt_root, state, loader.state_dict(), world, config.save_total_limit
                    )

    # --- the end: final checkpoint, export, results ----------------------------------------------
    if checkpoint.latest_checkpoint(ckpt_root) != ckpt_root / f"{checkpoint.PREFIX}{state.step}":
        checkpoint.save_checkpoint(
            engine, ckpt_root, state, loader.state_dict(), world, config.save_total_limit
        )
    export_dir, projector = export(engine, config, text, world)
    stats = getattr(loader, "stats", None)
    progress.finish(
        state,
        data=stats.as_dict() if hasattr(stats, "as_dict") else None,
        checkpoint=str(export_dir),
        projector=str(projector) if projector else None,
        duration_seconds=round(time.monotonic() - started, 1),
    )
    return 0


# --- the pieces the loop names ------------------------------------------------------------------


def load_text_side(config: TrainConfig) -> TextSide:
    """Tokenizer extended with <image> and <pad> (as HF's llava-1.5), the CLIP image processor, and
    how many tokens each image becomes (llava_trainer.tokenizer)."""
    from transformers import CLIPImageProcessor

    from .tokenizer import llava_tokens, load_tokenizer

    tokenizer = load_tokenizer(config.resolve(config.language_model), max_length=config.max_length)
    tokens = llava_tokens(tokenizer, config.resolve(config.vision_tower))
    image_processor = CLIPImageProcessor.from_pretrained(config.resolve(config.vision_tower))
    return TextSide(tokenizer, image_processor, tokens.image_token_id, tokens.num_image_tokens)


def build_loader(config: TrainConfig, text: TextSide, world: World) -> Any:
    """This rank's micro-batches (llava_trainer.data)."""
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
    weights are gathered layer by layer to rank 0 first (a collective)."""
    if config.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict() if world.is_main else None
    out = config.stage_output
    export_dir, projector = out / EXPORT_DIR, None
    if world.is_main:
        processor = llava_model.build_processor(
            text.tokenizer, text.image_processor, engine.module.config, config.image_aspect_ratio
        )
        llava_model.export_model(engine.module, state_dict, processor, export_dir)
        if config.stage == "pretrain":
            projector = out / PROJECTOR_FILE
            llava_model.save_projector(state_dict, projector)
    barrier(world)
    return export_dir, projector if config.stage == "pretrain" else None


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; no weight decay on biases and norm weights (as HF Trainer)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _lr_schedule(kind: str, warmup_steps: int, total_steps: int, optimizer: torch.optim.Optimizer) -> Any:
    """HF's schedules (what LLaVA's Trainer used): linear warmup, then cosine / linear / constant."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if kind == "constant" else kind
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def terminate(
    engine: Any,
    ckpt_root: Path,
    state: TrainState,
    loader: Any,
    world: World,
    config: TrainConfig,
    stop: checkpoint.GracefulStop,
    last_ckpt_seconds: float | None,
    progress: ProgressLog,
) -> int:
    """After SIGTERM: save if the last checkpoint's duration says another fits in what is left of
    the grace period, then exit 143 (the operator retries the stage, which resumes)."""
    left = stop.seconds_left(world)
    saved = checkpoint.latest_checkpoint(ckpt_root) == ckpt_root / f"{checkpoint.PREFIX}{state.step}"
    if not saved and checkpoint.checkpoint_fits(last_ckpt_seconds, left):
        checkpoint.save_checkpoint(
            engine, ckpt_root, state, loader.state_dict(), world, config.save_total_limit
        )
        saved = True
    progress.event("terminated", step=state.step, checkpoint_saved=saved, grace_seconds_left=round(left, 1))
    progress.close()
    return EXIT_TERMINATED


def _setup_logging(world: World) -> None:
    """Rank 0 logs at INFO; the others only warnings (and transformers' progress bars off)."""
    level = logging.INFO if world.is_main else logging.WARNING
    logging.basicConfig(
        level=level, format=f"%(asctime)s [rank{world.rank}] %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("llava_trainer").setLevel(level)
    import transformers

    transformers.logging.set_verbosity_warning() if world.is_main else transformers.logging.set_verbosity_error()
    if not world.is_main:
        transformers.utils.logging.disable_progress_bar()
