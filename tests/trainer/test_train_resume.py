"""A stopped run resumes from its newest complete checkpoint and continues the same step sequence:
after a crash (from the last periodic checkpoint) and after SIGTERM (from the checkpoint it saved
in the grace period, exiting 143 so the operator retries the stage)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.test_train_support import (
    FaultyLoader,
    configs,
    losses,
    single_process_world,
    train_capturing,
)

pytestmark = pytest.mark.trainer


def run_stage(config: Any, *, crash_at: int | None = None, sigterm_at: int | None = None) -> tuple[int, list]:
    """One in-process run of `config` (finetune without a pretrained projector), optionally with a
    crash or SIGTERM injected after that many micro-batches."""
    import llava_trainer.train as train_module

    real_loader = train_module.build_loader
    with pytest.MonkeyPatch.context() as mp, single_process_world() as world:
        mp.setattr(train_module.llava_model, "load_projector", lambda model, path: None)
        mp.setattr(
            train_module,
            "build_loader",
            lambda *a: FaultyLoader(real_loader(*a), crash_at=crash_at, sigterm_at=sigterm_at),
        )
        return train_capturing(config, world)


def test_crash_then_restart_resumes_from_the_last_checkpoint_with_the_same_losses(
    tmp_path: Path, synth_dir: Path
) -> None:
    # Finetune on ZeRO-3: the trainable LLM's fp32 master weights and Adam state live in the
    # per-rank ZeRO partitions; the data position and RNG in our per-rank trainer state.
    _, reference_config = configs(synth_dir, tmp_path / "reference", max_steps=5, save_steps=2)
    _, config = configs(synth_dir, tmp_path / "crashed", max_steps=5, save_steps=2)
    code, reference = run_stage(reference_config)
    assert code == 0

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(config, crash_at=7)  # micro-batch 7 = the first of step 4 (2 per step)
    checkpoints = config.stage_output / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-2"]  # save_total_limit 1

    code, resumed = run_stage(config)
    assert code == 0
    assert next(r for r in resumed if r["event"] == "resume")["step"] == 2
    assert sorted(losses(resumed)) == [3, 4, 5]
    for step, loss in losses(resumed).items():
        assert loss == pytest.approx(losses(reference)[step], rel=1e-5, abs=1e-6), step


def test_sigterm_saves_a_checkpoint_exits_143_and_the_retry_continues(
    tmp_path: Path, synth_dir: Path
) -> None:
    reference_config, _ = configs(synth_dir, tmp_path / "reference", max_steps=4)
    config, _ = configs(synth_dir, tmp_path / "terminated", max_steps=4)
    code, reference = run_stage(reference_config)
    assert code == 0

    code, terminated = run_stage(config, sigterm_at=3)  # during step 2
    assert code == 143
    assert sorted(losses(terminated)) == [1, 2]
    event = next(r for r in terminated if r["event"] == "terminated")
    assert event["step"] == 2 and event["checkpoint_saved"] is True
    checkpoints = config.stage_output / "checkpoints"
    assert json.loads((checkpoints / "checkpoint-2" / "COMPLETE").read_text()) == {"step": 2}
    # A later kill left a half-written checkpoint and a temporary one: never resumed from.
    (checkpoints / "checkpoint-3").mkdir()
    (checkpoints / ".tmp-checkpoint-3").mkdir()

    code, resumed = run_stage(config)
    assert code == 0
    assert next(r for r in resumed if r["event"] == "resume")["step"] == 2
    assert sorted(losses(resumed)) == [3, 4]
    for step, loss in {**losses(terminated), **losses(resumed)}.items():
        assert loss == pytest.approx(losses(reference)[step], rel=1e-5, abs=1e-6), step
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4"]
    assert (config.stage_output / "mm_projector.bin").is_file()
