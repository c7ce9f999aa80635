"""`llava-trainer pretrain` and `llava-trainer finetune`: the training loop on DeepSpeed.

Read `train()` top to bottom: build the `Trainer` (precision, tokenizer, data and its batch layout,
model, DeepSpeed, progress log, checkpointer), resume from the newest complete checkpoint, loop
over optimizer steps (log, honour SIGTERM, checkpoint when due), then save the final checkpoint,
export a Hugging Face model directory and report. The components decide their own cadence: the
progress log when to log, the checkpointer when to save.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, lora
from . import model as llava_model
from .checkpoint import TrainState
from .config import EXPORT_DIR, PROJECTOR_FILE, TrainConfig, config_to_args
from .deepspeed_config import BatchLayout, BatchSizeError, build_deepspeed_config, parameter_groups
from .distributed import (
    World,
    barrier,
    init_distributed,
    relaunch_under_torchrun_if_needed,
)
from .flops import LlavaShape, resolve_peak_tflops
from .metrics import ProgressLog

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
    """One stage: build, resume, optimizer steps until done or SIGTERM, then save, export, report."""
    started = time.monotonic()
    trainer = Trainer.build(config, world)
    trainer.resume()
    with trainer.stop:
        for epoch, batches in trainer.epochs():
            while trainer.state.step < trainer.schedule.last_step_of(epoch):
                trainer.step(batches)
                stopping = trainer.stop.requested_anywhere(world)  # all ranks stop at the same step
                trainer.progress.step_done(trainer.state, trainer.engine, stopping=stopping)
                if stopping:
                    return trainer.terminate()
                trainer.checkpointer.save_if_due(trainer.state)
    trainer.checkpointer.save_final(trainer.state)
    return trainer.finish(started)


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps the stage takes, and the warmup."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def plan(cls, config: TrainConfig, micro_batches_per_epoch: int, layout: BatchLayout) -> Schedule:
        """Steps per epoch = this rank's micro-batches // accumulation; `--max-steps` caps the total."""
        steps_per_epoch = micro_batches_per_epoch // layout.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise SystemExit(
                f"llava-trainer: {micro_batches_per_epoch} micro-batches per process per epoch is less than one "
                f"optimizer step ({layout.gradient_accumulation_steps} micro-batches); lower --global-batch-size"
            )
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps:
            total_steps = min(total_steps, config.max_steps)
        return cls(steps_per_epoch, total_steps, math.ceil(config.warmup_ratio * total_steps))

    def last_step_of(self, epoch: int) -> int:
        return min(self.total_steps, (epoch + 1) * self.steps_per_epoch)


@dataclass
class Trainer:
    """Everything one stage's loop works with, built once by `build`; `train` reads top-down."""

    config: TrainConfig
    world: World
    text: TextSide
    layout: BatchLayout
    loader: Any
    schedule: Schedule
    engine: Any
    progress: ProgressLog
    checkpointer: checkpoint.Checkpointer
    stop: checkpoint.GracefulStop = field(default_factory=checkpoint.GracefulStop)
    state: TrainState = field(default_factory=TrainState)
    resume_position: dict[str, Any] | None = None
    """The checkpointed loader position, applied to the first epoch the loop enters."""

    @classmethod
    def build(cls, config: TrainConfig, world: World) -> Trainer:
        """Precision, tokenizer, data (whose batch layout the engine then follows), model, DeepSpeed,
        the progress log (its `start` line) and the checkpointer."""
        torch.manual_seed(config.seed)  # same on every rank: the new projector must start identical
        if world.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # LLaVA's --tf32 True
            torch.backends.cudnn.allow_tf32 = True
        precision, why = llava_model.choose_precision(config.precision, world.device_type)
        text = load_text_side(config)
        try:
            loader = build_loader(config, text, world)
        except BatchSizeError as err:
            raise SystemExit(f"llava-trainer {config.stage}: {err}") from None
        layout: BatchLayout = loader.layout
        llm_config = llava_model.language_model_config(
            config.start_model or config.resolve(config.language_model)
        )
        ds_config = build_deepspeed_config(config, layout, precision, llm_config.hidden_size)
        model, shape, trainable, attention = build_model(config, text, world, precision, ds_config)
        schedule = Schedule.plan(config, len(loader), layout)
        engine = initialize_engine(model, config, ds_config, schedule)

        out = config.stage_output
        peak, peak_source = resolve_peak_tflops(config.peak_tflops, world.device_name, config.accelerator)
        progress = ProgressLog(
            out,
            config.stage,
            world,
            shape,
            peak,
            total_steps=schedule.total_steps,
            steps_per_epoch=schedule.steps_per_epoch,
            logging_steps=config.logging_steps,
        )
        progress.event(
            "start",
            world_size=world.world_size,
            device=world.device_name,
            backend=world.backend,
            precision=precision,
            precision_note=why,
            attention=attention,
            trainable_parameters=trainable,
            llm_parameters=shape.llm_params,
            start_model=str(config.start_model) if config.start_model else None,
            lora=config.lora_params.model_dump() if config.lora_params else None,
            learning_rates=list(engine.lr_scheduler.base_lrs),  # each optimizer group's peak, adapters first
            steps_per_epoch=schedule.steps_per_epoch,
            total_steps=schedule.total_steps,
            warmup_steps=schedule.warmup_steps,
            gradient_accumulation_steps=layout.gradient_accumulation_steps,
            peak_tflops=peak,
            peak_source=peak_source,
            deepspeed=ds_config,
        )
        if why:
            log.warning("%s", why)
        checkpointer = checkpoint.Checkpointer(
            engine,
            loader,
            out / "checkpoints",
            world,
            save_steps=config.save_steps,
            keep=config.save_total_limit,
            total_steps=schedule.total_steps,
        )
        return cls(config, world, text, layout, loader, schedule, engine, progress, checkpointer)

    def resume(self) -> None:
        """Continue from the newest complete checkpoint, if any (weights, optimizer, RNG, data)."""
        self.state, self.resume_position, path = self.checkpointer.resume()
        if path is not None:
            self.progress.event("resume", checkpoint=str(path), step=self.state.step, epoch=self.state.epoch)
        self.progress.begin(self.state.step)

    def epochs(self) -> Iterator[tuple[int, Iterator[dict[str, Any]]]]:
        """(epoch, this rank's micro-batches) for each epoch with steps left; after a mid-epoch
        resume the first one continues where the checkpointed loader stopped."""
        for epoch in range(self.state.epoch, self.config.epochs):
            if self.state.step >= self.schedule.total_steps:
                return
            self.loader.set_epoch(epoch)
            if self.resume_position is not None and self.state.step % self.schedule.steps_per_epoch:
                self.loader.load_state_dict(self.resume_position)
            self.resume_position = None
            yield epoch, iter(self.loader)

    def step(self, batches: Iterator[dict[str, Any]]) -> None:
        """One optimizer step: forward and backward over `gradient_accumulation_steps` micro-batches
        (DeepSpeed steps the optimizer and the scheduler at the accumulation boundary)."""
        for _ in range(self.layout.gradient_accumulation_steps):
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(
                    f"the data loader ended before the {len(self.loader)} micro-batches it announced"
                )
            loss = forward_loss(self.engine, batch, self.world, self.text)
            self.engine.backward(loss)
            self.engine.step()
            self.progress.micro_batch(batch, loss)
        self.state.step += 1
        self.state.epoch = self.state.step // self.schedule.steps_per_epoch

    def terminate(self) -> int:
        """After SIGTERM: save if it fits in what is left of the grace period, then exit 143 (the
        operator retries the stage, which resumes)."""
        left = self.stop.seconds_left(self.world)
        saved = self.checkpointer.save_before_exit(self.state, left)
        self.progress.event(
            "terminated", step=self.state.step, checkpoint_saved=saved, grace_seconds_left=round(left, 1)
        )
        self.progress.close()
        return EXIT_TERMINATED

    def finish(self, started: float) -> int:
        """Export the model (and pretrain's projector) and report the stage's results."""
        export_dir, projector = export(self.engine, self.config, self.text, self.world)
        stats = getattr(self.loader, "stats", None)
        self.progress.finish(
            self.state,
            data=stats.as_dict() if hasattr(stats, "as_dict") else None,
            checkpoint=str(export_dir),
            projector=str(projector) if projector else None,
            duration_seconds=round(time.monotonic() - started, 1),
        )
        return 0


# --- the pieces the loop names ------------------------------------------------------------------


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
