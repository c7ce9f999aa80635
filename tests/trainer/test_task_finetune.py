"""Task finetune from a whole LLaVA model (the tiny llava-hf-format one `llava-trainer synth`
writes), without a pretrain stage: `llavarun local` end to end with a LoRA finetune and MMMU on
the merged model, a refusal naming a model directory that is not LLaVA, and a full finetune
in this process that starts from exactly the model's weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.helpers import ROOT
from tests.trainer.test_local_run import llavarun_local, status_of
from tests.trainer.test_train_support import (
    configs,
    exported_state,
    losses,
    single_process_world,
    snapshot,
    train_capturing,
)

pytestmark = pytest.mark.trainer

EXAMPLE = ROOT / "examples" / "llavarun-task-finetune-cpu.yaml"
LLAVA_MODEL = "LLaVA-Finetune/checkpoints/llava-1.5-7b-hf"


def log_records(path: Path, event: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if f'"event": "{event}"' in line]


@pytest.mark.slow
def test_lora_task_finetune_runs_through_llavarun_local_and_evaluates_the_merged_model(data_dir_copy: Path):
    result = llavarun_local(EXAMPLE, data_dir_copy)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = status_of(data_dir_copy)
    assert status["phase"] == "Succeeded"
    assert sorted(status["stages"]) == ["evaluate", "finetune", "prepare"]
    output = data_dir_copy / "Output"
    assert not any((output / "checkpoints_pretrain").iterdir()), "no pretrain stage, no projector needed"

    # prepare measured the data with the LLaVA model's own tokenizer, which training then reused.
    index = json.loads((output / "prepare" / "index.json").read_text())
    assert index["max_length"] == 256, "the longest training stage of this run (finetune)"
    assert index["tokenizer"]["path"] == str(data_dir_copy / LLAVA_MODEL)
    log = output / "logs" / "llava-tiny-task-finetune.log"
    (start,) = log_records(log, "start")
    assert start["start_model"] == str(data_dir_copy / LLAVA_MODEL) and start["lora"]["r"] == 8
    assert start["trainable_parameters"]["language_model"] == 0 and start["learning_rates"] == [0.005, 0.001]
    assert not any("scanning" in line for line in log.read_text().splitlines()), "the index was reused"

    finetune = status["results"]["finetune"]
    model_dir = Path(finetune["checkpoint"])
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == [
        "LlavaForConditionalGeneration"
    ]
    assert (model_dir.parent / "adapter" / "adapter_config.json").is_file()
    assert not list(model_dir.glob("adapter_*")), "the model itself is merged, no adapter files"
    evaluated = json.loads(Path(status["results"]["evaluate"]["resultsFile"]).read_text())
    assert evaluated["model"] == str(model_dir)
    assert 0 <= status["results"]["evaluate"]["overall"] <= 100


def test_local_refuses_a_task_finetune_whose_model_is_not_llava(data_dir_copy: Path, tmp_path: Path):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["finetune"]["modelPath"] = "LLaVA-Pretrain/checkpoints/vicuna-13b-v1.5"
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(doc))
    result = llavarun_local(run, data_dir_copy)
    assert result.returncode == 2
    assert (
        f"{data_dir_copy}/LLaVA-Pretrain/checkpoints/vicuna-13b-v1.5/config.json describes ['LlamaForCausalLM'], "
        "not LlavaForConditionalGeneration" in result.stderr
    )
    assert "spec.finetune.modelPath" in result.stderr


def test_full_task_finetune_starts_from_the_llava_models_weights(tmp_path: Path, synth_dir: Path):
    import llava_trainer.train as train_module

    _, config = configs(synth_dir, tmp_path, max_steps=3, zero_stage=2)
    config = config.model_copy(update={"model_path": LLAVA_MODEL})
    started: dict[str, torch.Tensor] = {}
    real_freeze = train_module.llava_model.freeze_for_stage

    def spy(model: Any, stage: str, **kwargs: Any) -> dict[str, int]:
        started.update(snapshot(model))
        return real_freeze(model, stage, **kwargs)

    with pytest.MonkeyPatch.context() as mp, single_process_world() as world:
        mp.setattr(train_module.llava_model, "freeze_for_stage", spy)
        code, log = train_capturing(config, world)
    assert code == 0 and sorted(losses(log)) == [1, 2, 3]
    start = next(r for r in log if r["event"] == "start")
    assert (
        start["trainable_parameters"]["language_model"] > 0
        and "lora_adapters" not in start["trainable_parameters"]
    )

    released = exported_state(synth_dir / LLAVA_MODEL)
    assert set(started) == set(released)
    for name, weight in released.items():  # the projector too: nothing assembled, nothing new
        assert torch.equal(started[name], weight), name
    after = exported_state(config.stage_output / "model")
    assert all(torch.equal(after[k], v) for k, v in released.items() if k.startswith("model.vision_tower."))
    for prefix in ("model.language_model.layers.", "model.multi_modal_projector.", "lm_head."):
        assert any(not torch.equal(after[k], v) for k, v in released.items() if k.startswith(prefix)), prefix


def test_evaluate_refuses_an_adapter_directory_naming_the_merged_model(
    synth_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from llava_trainer.config import EvaluateConfig
    from llava_trainer.evaluate.run import run

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    config = EvaluateConfig(data_dir=synth_dir, model_path=str(adapter), output_dir=tmp_path / "out")
    assert run(config) == 2
    assert f"{adapter} is a LoRA adapter, not a model: use the merged model directory" in caplog.text
