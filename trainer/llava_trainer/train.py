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
from dataclasses import dataclass, field
from typing import Any

import torch

from . import checkpoint
from . import model as llava_model
from .checkpoint import TrainState
from .config import TrainConfig, config_to_args
from .deepspeed_config import BatchLayout, BatchSizeError, build_deepspeed_config
from .distributed import (
    World,
    init_distributed,
    relaunch_under_torchrun_if_needed,
)
from .flops import resolve_peak_tflops
from .metrics import ProgressLog
from .train_parts import (
    TextSide,
    build_loader,
    build_model,
    export,
    forward_loss,
    initialize_engine,
    load_text_side,
)

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
