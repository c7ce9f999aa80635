"""The checkpointer owns the save cadence: every --save-steps before the last step, once at the
end (never twice for one step), and after SIGTERM only if the last save's duration fits in the
grace period left. A real DeepSpeed engine and the real data loader, in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llava_trainer.checkpoint import Checkpointer, TrainState, complete_checkpoints
from llava_trainer.config import PretrainConfig
from llava_trainer.deepspeed_config import build_deepspeed_config

from tests.trainer.test_train_support import single_process_world

pytestmark = pytest.mark.trainer


def saved_steps(root: Path) -> list[int]:
    return [step for step, _ in complete_checkpoints(root)]


def saved_at(root: Path, step: int) -> float:
    return json.loads((root / f"checkpoint-{step}" / "trainer_state.json").read_text())["saved_at"]


def test_saves_follow_the_cadence_and_the_grace_period(synth_dir: Path, tmp_path: Path) -> None:
    import deepspeed
    import torch
    from llava_trainer.train_parts import build_loader, load_text_side

    config = PretrainConfig(
        data_dir=synth_dir,
        output_dir=tmp_path / "checkpoints_pretrain",
        global_batch_size=2,
        micro_batch_size=2,
        dataloader_workers=0,
        precision="fp32",
    )
    root = config.stage_output / "checkpoints"
    with single_process_world() as world:
        loader = build_loader(config, load_text_side(config), world)
        model = torch.nn.Linear(4, 4)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=list(model.parameters()),
            config=build_deepspeed_config(config, loader.layout, "fp32", hidden_size=4),
        )
        checkpointer = Checkpointer(engine, loader, root, world, save_steps=2, keep=2, total_steps=5)
        state = TrainState()
        for step in range(1, 6):
            state.step = step
            checkpointer.save_if_due(state)
        assert saved_steps(root) == [2, 4]  # not 5: the last step is the final save's

        checkpointer.save_final(state)
        assert saved_steps(root) == [4, 5]  # --save-total-limit 2
        first = saved_at(root, 5)
        checkpointer.save_final(state)
        assert saved_at(root, 5) == first  # this step is on disk already: not written again
        assert checkpointer.save_before_exit(state, seconds_left=0.0) is True

        state.step = 6  # SIGTERM after one more step; a save needs its last duration x 1.25 + 1 s
        assert checkpointer.save_before_exit(state, seconds_left=0.5) is False
        assert saved_steps(root) == [4, 5]
        assert checkpointer.save_before_exit(state, seconds_left=60.0) is True
        assert saved_steps(root) == [5, 6]
