"""The batch layout is computed and validated once, and the data loader and the step schedule both
follow that one object (a global batch that does not split is an error, never silently shrunk)."""

from __future__ import annotations

from pathlib import Path

import pytest
from llava_trainer.config import FinetuneConfig
from llava_trainer.data.loader import build_train_loader
from llava_trainer.deepspeed_config import BatchLayout, BatchSizeError, batch_layout

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def text_side(synth_dir: Path):
    from llava_trainer.train_parts import load_text_side

    return load_text_side(FinetuneConfig(data_dir=synth_dir))


def loader_for(text_side, data_dir: Path, tmp_path: Path, *, world_size: int = 1, **sizes: int):
    config = FinetuneConfig(
        data_dir=data_dir, output_dir=tmp_path / "checkpoints_finetune", dataloader_workers=0, **sizes
    )
    return build_train_loader(
        config,
        text_side.tokenizer,
        text_side.image_processor,
        rank=0,
        world_size=world_size,
        num_image_tokens=text_side.num_image_tokens,
        image_token_id=text_side.image_token_id,
    )


def test_a_layout_that_does_not_multiply_out_cannot_exist() -> None:
    assert BatchLayout(16, 2, 4, 2).gradient_accumulation_steps == 4
    with pytest.raises(BatchSizeError):
        BatchLayout(global_batch_size=16, micro_batch_size=2, gradient_accumulation_steps=1, world_size=2)
    with pytest.raises(BatchSizeError):
        BatchLayout(global_batch_size=0, micro_batch_size=2, gradient_accumulation_steps=0, world_size=2)


def test_the_loader_is_built_for_the_runs_layout(text_side, synth_dir: Path, tmp_path: Path) -> None:
    loader = loader_for(text_side, synth_dir, tmp_path, world_size=2, global_batch_size=8, micro_batch_size=2)
    assert loader.layout == batch_layout(8, 2, 2)
    # One megabatch (the unit LLaVA sorts by length) is one optimizer step of all ranks.
    assert loader.sampler.megabatch_size == loader.layout.global_batch_size == 8
    assert loader.sampler.micro_batch_size == 2 and loader.sampler.world_size == 2


def test_a_global_batch_that_does_not_split_is_refused_by_the_loader(
    text_side, synth_dir: Path, tmp_path: Path
) -> None:
    # 6 is not a multiple of 4 x 1: the loader used to train on global batches of 4 without a word.
    with pytest.raises(BatchSizeError, match="--global-batch-size 6"):
        loader_for(text_side, synth_dir, tmp_path, global_batch_size=6, micro_batch_size=4)


def test_the_schedule_counts_optimizer_steps_of_the_layout(tmp_path: Path) -> None:
    from llava_trainer.train import Schedule

    config = FinetuneConfig(data_dir=tmp_path, epochs=3, warmup_ratio=0.1)
    schedule = Schedule.plan(config, micro_batches_per_epoch=13, layout=batch_layout(8, 2, 1))
    assert (schedule.steps_per_epoch, schedule.total_steps, schedule.warmup_steps) == (3, 9, 1)
    assert [schedule.last_step_of(epoch) for epoch in range(3)] == [3, 6, 9]
    capped = Schedule.plan(config.model_copy(update={"max_steps": 4}), 13, batch_layout(8, 2, 1))
    assert capped.total_steps == 4 and capped.last_step_of(1) == 4
    with pytest.raises(SystemExit, match="less than one optimizer step"):
        Schedule.plan(config, micro_batches_per_epoch=3, layout=batch_layout(8, 2, 1))
