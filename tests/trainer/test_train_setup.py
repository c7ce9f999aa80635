"""The pieces around the loop, without training: batch layout, DeepSpeed config, launcher env,
precision choice, projector keys, checkpoint bookkeeping, the SIGTERM save decision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llava_trainer.checkpoint import (
    COMPLETE,
    checkpoint_fits,
    complete_checkpoints,
    latest_checkpoint,
    remove_incomplete,
)
from llava_trainer.config import FinetuneConfig, PretrainConfig
from llava_trainer.deepspeed_config import BatchSizeError, batch_layout, build_deepspeed_config
from llava_trainer.distributed import torchrun_relaunch_command
from llava_trainer.model import attention_implementation, choose_precision, normalise_projector_keys

pytestmark = pytest.mark.trainer


def test_gradient_accumulation_comes_from_global_batch_and_world_size() -> None:
    layout = batch_layout(global_batch_size=256, micro_batch_size=32, world_size=8)
    assert layout.gradient_accumulation_steps == 1
    assert batch_layout(128, 4, 8).gradient_accumulation_steps == 4


def test_indivisible_global_batch_is_a_readable_error() -> None:
    with pytest.raises(
        BatchSizeError, match=r"--global-batch-size 100 is not a multiple of --micro-batch-size 16"
    ):
        batch_layout(100, 16, 2)


def test_deepspeed_config_follows_llavas_zero2_and_zero3_files(tmp_path: Path) -> None:
    pretrain = PretrainConfig(data_dir=tmp_path)
    finetune = FinetuneConfig(data_dir=tmp_path)
    zero2 = build_deepspeed_config(pretrain, batch_layout(256, 32, 8), "bf16", hidden_size=5120)
    zero3 = build_deepspeed_config(finetune, batch_layout(128, 16, 8), "bf16", hidden_size=5120)

    assert zero2["train_batch_size"] == 256 and zero2["gradient_accumulation_steps"] == 1
    assert zero2["zero_optimization"]["stage"] == 2
    assert zero2["zero_optimization"]["reduce_bucket_size"] == 5120 * 5120
    assert zero2["gradient_clipping"] == 1.0
    assert zero2["bf16"] == {"enabled": True} and zero2["fp16"]["enabled"] is False
    assert zero2["optimizer"]["type"] == "AdamW"
    assert zero2["optimizer"]["params"]["lr"] == 1e-3
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero3["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * 5120
    assert zero3["optimizer"]["params"]["lr"] == 2e-5
    assert (
        build_deepspeed_config(finetune, batch_layout(128, 16, 8), "fp32", 5120)["bf16"]["enabled"] is False
    )


def test_training_operator_env_without_torchrun_relaunches_under_torchrun() -> None:
    env = {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "8",
        "PET_NODE_RANK": "1",
        "MASTER_ADDR": "run-pretrain-master-0",
        "MASTER_PORT": "23456",
        "RANK": "1",  # the training-operator's pod index, not a process rank
        "WORLD_SIZE": "16",
    }
    command = torchrun_relaunch_command(env, ["pretrain", "--data-dir", "/data"])
    assert command is not None
    assert command[1:3] == ["-m", "torch.distributed.run"]
    flags = dict(zip(command[3:13:2], command[4:13:2], strict=True))
    assert flags == {
        "--nnodes": "2",
        "--nproc-per-node": "8",
        "--node-rank": "1",
        "--master-addr": "run-pretrain-master-0",
        "--master-port": "23456",
    }
    assert command[13:] == ["-m", "llava_trainer", "pretrain", "--data-dir", "/data"]


def test_no_relaunch_under_torchrun_or_without_operator_env() -> None:
    assert torchrun_relaunch_command({"PET_NPROC_PER_NODE": "8", "TORCHELASTIC_RUN_ID": "x"}, []) is None
    assert torchrun_relaunch_command({}, ["pretrain"]) is None


def test_cpu_trains_in_fp32_and_says_why() -> None:
    assert choose_precision("bf16", "cpu") == ("fp32", "accelerator is CPU: training in fp32 instead of bf16")
    assert choose_precision("bf16", "cuda") == ("bf16", None)
    assert choose_precision("fp32", "cpu") == ("fp32", None)
    assert attention_implementation("cpu", "fp32") == "sdpa"


def test_projector_files_load_with_llava_or_hf_key_names() -> None:
    tensors = {name: torch.full((2,), float(i)) for i, name in enumerate(["w1", "b1", "w2", "b2"])}
    llava = {
        "model.mm_projector.0.weight": tensors["w1"],
        "model.mm_projector.0.bias": tensors["b1"],
        "model.mm_projector.2.weight": tensors["w2"],
        "model.mm_projector.2.bias": tensors["b2"],
    }
    hf = {
        "model.multi_modal_projector.linear_1.weight": tensors["w1"],
        "model.multi_modal_projector.linear_1.bias": tensors["b1"],
        "multi_modal_projector.linear_2.weight": tensors["w2"],
        "multi_modal_projector.linear_2.bias": tensors["b2"],
    }
    for state in (llava, hf):
        assert normalise_projector_keys(state) == {
            "linear_1.weight": tensors["w1"],
            "linear_1.bias": tensors["b1"],
            "linear_2.weight": tensors["w2"],
            "linear_2.bias": tensors["b2"],
        }
    with pytest.raises(ValueError, match="projector file has no"):
        normalise_projector_keys({"model.mm_projector.0.weight": tensors["w1"]})


def test_only_marked_checkpoints_count_and_leftovers_are_removed(tmp_path: Path) -> None:
    for step, complete in ((2, True), (10, True), (12, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / COMPLETE).write_text("{}")
    (tmp_path / ".tmp-checkpoint-14").mkdir()
    (tmp_path / "notes").mkdir()

    assert [step for step, _ in complete_checkpoints(tmp_path)] == [2, 10]  # numeric order, not text
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    remove_incomplete(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2", "notes"]
    assert latest_checkpoint(tmp_path / "missing") is None


def test_sigterm_saves_only_if_the_last_checkpoint_time_fits_the_grace_period() -> None:
    assert checkpoint_fits(None, 25.0)  # never measured: try
    assert not checkpoint_fits(None, -1.0)
    assert checkpoint_fits(10.0, 25.0)
    assert not checkpoint_fits(20.0, 25.0)  # 20 s x 1.25 + 1 s margin > 25 s
