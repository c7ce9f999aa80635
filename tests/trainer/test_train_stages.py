"""Pretrain then finetune on the synthetic data_dir, in this process (world size 1): what each
stage trains, what it writes, and that the exported model is a working Hugging Face LLaVA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.trainer.test_train_support import (
    configs,
    exported_state,
    single_process_world,
    snapshot,
    subset_json,
    train_capturing,
)

pytestmark = pytest.mark.trainer

VISION, PROJECTOR, LLM = "model.vision_tower.", "model.multi_modal_projector.", "model.language_model."


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory, synth_dir: Path) -> dict[str, Any]:
    """Pretrain (ZeRO-2) then finetune (ZeRO-3), 3 steps each; the weights each stage started
    from (spied right after freezing) and what it logged and reported."""
    import llava_trainer.train as train_module

    data_dir = synth_dir
    out = tmp_path_factory.mktemp("stages")
    pretrain, finetune = configs(data_dir, out, max_steps=3)
    status_file = out / "status.json"
    started: dict[str, dict[str, torch.Tensor]] = {}
    real_freeze = train_module.llava_model.freeze_for_stage

    def spy(model: Any, stage: str, **kwargs: Any) -> dict[str, int]:
        counts = real_freeze(model, stage, **kwargs)
        started[stage] = snapshot(model)
        return counts

    result: dict[str, Any] = {"out": out, "started": started, "status_file": status_file}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module.llava_model, "freeze_for_stage", spy)
        mp.setenv("LLAVARUN_STATUS_FILE", str(status_file))
        with single_process_world() as world:
            for config in (pretrain, finetune):
                mp.setenv("LLAVARUN_STAGE", config.stage)
                code, log = train_capturing(config, world)
                assert code == 0
                result[config.stage] = {"config": config, "log": log}
    return result


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> set[bool]:
    """For every weight under `prefix`: did it change? ({False} = none did, {True} = all did)."""
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return {not torch.equal(before[k], after[k]) for k in keys}


def test_pretrain_trains_only_the_projector(stages: dict[str, Any]) -> None:
    before = stages["started"]["pretrain"]
    after = exported_state(stages["out"] / "checkpoints_pretrain" / "model")
    assert set(after) == set(before)
    assert changed(before, after, PROJECTOR) == {True}
    assert changed(before, after, VISION) == {False}
    assert changed(before, after, LLM) == {False}
    assert changed(before, after, "lm_head.") == {False}


def test_finetune_starts_from_the_pretrained_projector_and_trains_llm_and_projector(
    stages: dict[str, Any],
) -> None:
    pretrained = exported_state(stages["out"] / "checkpoints_pretrain" / "model")
    before = stages["started"]["finetune"]
    after = exported_state(stages["out"] / "checkpoints_finetune" / "model")
    for key in (k for k in before if k.startswith(PROJECTOR)):
        assert torch.equal(before[key], pretrained[key]), key
    assert changed(before, after, PROJECTOR) == {True}
    assert True in changed(before, after, LLM)  # (norm weights barely move in 3 steps; most do)
    assert changed(before, after, "lm_head.") == {True}
    assert changed(before, after, VISION) == {False}
    for key in (k for k in before if k.startswith(VISION)):  # still the CLIP checkpoint's weights
        assert torch.equal(after[key], pretrained[key]), key


def test_pretrain_writes_llava_style_mm_projector(stages: dict[str, Any]) -> None:
    projector = torch.load(stages["out"] / "checkpoints_pretrain" / "mm_projector.bin", weights_only=True)
    exported = exported_state(stages["out"] / "checkpoints_pretrain" / "model")
    assert sorted(projector) == [
        "model.mm_projector.0.bias",
        "model.mm_projector.0.weight",
        "model.mm_projector.2.bias",
        "model.mm_projector.2.weight",
    ]
    assert torch.equal(
        projector["model.mm_projector.2.weight"].float(), exported[PROJECTOR + "linear_2.weight"]
    )


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_exported_model_loads_with_from_pretrained_and_generates(stages: dict[str, Any], stage: str) -> None:
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    directory = stages["out"] / f"checkpoints_{stage}" / "model"
    model = LlavaForConditionalGeneration.from_pretrained(directory)
    processor = AutoProcessor.from_pretrained(directory)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (
        model.config.text_config.vocab_size % 64
        == 0
        >= len(processor.tokenizer) - model.config.text_config.vocab_size
    )

    image = Image.new("RGB", (90, 50), (200, 30, 30))
    inputs = processor(images=image, text="USER: <image>\nWhat is shown? ASSISTANT:", return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == model.config.image_seq_length
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(processor.batch_decode(output, skip_special_tokens=True)[0], str)


def test_log_lines_carry_the_metrics(stages: dict[str, Any]) -> None:
    steps = [r for r in stages["finetune"]["log"] if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        assert record["loss"] > 0
        assert record["learning_rate"] == pytest.approx(1e-3)
        assert record["grad_norm"] > 0
        assert record["samples_per_second"] > 0
        assert record["padded_tokens_per_second"] >= record["tokens_per_second"] > 0
        assert record["mfu"] is None and record["mfu_flagperf"] is None  # CPU, no peak given
        assert record["gpu_memory_gib"] is None
    start = next(r for r in stages["finetune"]["log"] if r["event"] == "start")
    assert start["precision"] == "fp32"
    assert "CPU" in start["precision_note"]
    assert start["deepspeed"]["zero_optimization"]["stage"] == 3
    end = next(r for r in stages["pretrain"]["log"] if r["event"] == "end")
    assert end["steps"] == 3
    assert end["samples"] == 12
    assert list((stages["out"] / "checkpoints_pretrain" / "tensorboard").glob("events.out.tfevents.*"))


def test_status_file_gets_declared_progress_and_results(stages: dict[str, Any]) -> None:
    from llava_operator.api.status import LlavaRunStatus

    status = json.loads(Path(stages["status_file"]).read_text())
    LlavaRunStatus.model_validate(status)
    assert status["progress"]["stage"] == "finetune"
    assert status["progress"]["step"] == 3
    assert status["progress"]["percent"] == 100
    pretrain = status["results"]["pretrain"]
    assert pretrain["projector"].endswith("checkpoints_pretrain/mm_projector.bin")
    assert pretrain["checkpoint"].endswith("checkpoints_pretrain/model")
    assert pretrain["steps"] == 3
    assert "mfu" not in pretrain  # unknown on CPU: left out, not written as null
    assert status["results"]["finetune"]["samples"] == 12


def test_final_checkpoint_is_complete_and_holds_only_trainable_weights(stages: dict[str, Any]) -> None:
    root = stages["out"] / "checkpoints_pretrain" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["checkpoint-3"]
    checkpoint = root / "checkpoint-3"
    assert (checkpoint / "COMPLETE").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 3
    module = torch.load(checkpoint / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and all(k.startswith(PROJECTOR) for k in module)


def test_loss_falls_when_repeating_a_small_batch(
    tmp_path_factory: pytest.TempPathFactory, synth_dir: Path
) -> None:
    import llava_trainer.train as train_module

    data_dir = synth_dir
    out = tmp_path_factory.mktemp("overfit")
    subset = subset_json(data_dir / "LLaVA-Finetune" / "llava_v1_5_mix665k.json", out / "four.json", 4)
    _, finetune = configs(data_dir, out, data_path=str(subset), epochs=12, learning_rate=3e-3, zero_stage=2)
    with pytest.MonkeyPatch.context() as mp, single_process_world() as world:
        mp.setattr(train_module.llava_model, "load_projector", lambda model, path: None)  # no pretrain here
        code, log = train_capturing(finetune, world)
    assert code == 0
    losses = [r["loss"] for r in records_of(log)]
    assert len(losses) == 12
    assert losses[-1] < 0.7 * losses[0], losses


def records_of(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in log if r["event"] == "step"]
