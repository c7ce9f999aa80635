"""The recipe variants as the API and the trainer's flags see them: LoRA (a nested contract section
serialised as flat `--lora-*` flags), the 7B examples, and a task finetune from a whole LLaVA
model, whose directory `prepare`, `llavarun local` and `llavarun validate --data-dir` check."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from llava_operator.api import LlavaRun, Stage
from llava_operator.api.stage_params import FinetuneParams, LoraParams
from llava_operator.cli import main
from llava_operator.trainer_command import trainer_args
from llava_trainer.config import FinetuneConfig, PrepareConfig, add_config_flags, config_to_args, parse_config
from llava_trainer.prepare import llava_model_problems

from tests.helpers import ROOT, load_yaml

EXAMPLES = ROOT / "examples"


def parse(args: list[str]) -> FinetuneConfig:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, FinetuneConfig)
    return parse_config(FinetuneConfig, parser.parse_args(args))


def flags(args: list[str]) -> dict[str, str]:
    return dict(zip(args[1::2], args[2::2], strict=True))


def test_the_lora_defaults_are_llavas_finetune_lora_script():
    assert LoraParams().model_dump() == {
        "r": 128,
        "alpha": 256,
        "dropout": 0.05,
        "target_modules": [],  # every linear layer of the LLM
        "learning_rate": 2e-4,
    }
    assert FinetuneParams().learning_rate == 2e-5  # the projector's rate (LLaVA's mm_projector_lr)
    assert FinetuneParams().lora is None  # full finetune unless asked


def test_the_lora_section_is_flat_flags_that_round_trip():
    config = FinetuneConfig(data_dir="/d", lora={"r": 16, "target_modules": ["q_proj", "v_proj"]})
    args = config_to_args(config)
    given = flags(["finetune", *args])
    assert given["--lora-r"] == "16" and given["--lora-alpha"] == "256"
    assert given["--lora-target-modules"] == "q_proj,v_proj" and given["--lora-learning-rate"] == "0.0002"
    assert parse(args) == config
    assert parse(["--data-dir", "/d", "--lora-r", "4"]).lora == LoraParams(r=4)  # any lora flag turns it on
    assert parse(config_to_args(FinetuneConfig(data_dir="/d", lora={}))).lora == LoraParams()  # `lora: {}`
    full = config_to_args(FinetuneConfig(data_dir="/d"))
    assert not [a for a in full if a.startswith("--lora")] and parse(full).lora is None


def test_a_bad_lora_flag_is_named():
    with pytest.raises(SystemExit) as failed:
        parse(["--data-dir", "/d", "--lora-r", "0", "--lora-target-modules", "q_proj,lm_head"])
    message = str(failed.value)
    assert "--lora-r: Input should be greater than or equal to 1" in message
    assert "--lora-target-modules: Input should be 'q_proj'," in message and "'lm_head'" in message


def test_the_7b_examples_train_vicuna_7b_and_lora_renders_llavas_settings():
    for name in ("llavarun-7b.yaml", "llavarun-7b-lora.yaml"):
        run = LlavaRun.model_validate(load_yaml(EXAMPLES / name))
        for stage in run.spec.stages:
            args = " ".join(trainer_args(run.spec, stage))
            assert "13b" not in args, (name, stage)
            if stage in (Stage.PREPARE, Stage.PRETRAIN, Stage.FINETUNE):
                assert "--language-model LLaVA-Pretrain/checkpoints/vicuna-7b-v1.5" in args
        finetune = flags(trainer_args(run.spec, Stage.FINETUNE))
        assert (finetune["--learning-rate"], finetune["--global-batch-size"], finetune["--zero-stage"]) == (
            "2e-05",
            "128",
            "3",
        )
    lora = flags(
        trainer_args(
            LlavaRun.model_validate(load_yaml(EXAMPLES / "llavarun-7b-lora.yaml")).spec, Stage.FINETUNE
        )
    )
    assert [lora[f"--lora-{k}"] for k in ("r", "alpha", "dropout", "learning-rate")] == [
        "128",
        "256",
        "0.05",
        "0.0002",
    ]


def test_a_task_finetune_reaches_prepare_and_finetune_without_a_pretrain_stage():
    run = LlavaRun.model_validate(load_yaml(EXAMPLES / "llavarun-task-finetune.yaml"))
    assert run.spec.stages == [Stage.PREPARE, Stage.FINETUNE, Stage.EVALUATE]
    model = "LLaVA-Finetune/checkpoints/llava-1.5-7b-hf"
    assert flags(trainer_args(run.spec, Stage.FINETUNE))["--model-path"] == model
    prepare = flags(trainer_args(run.spec, Stage.PREPARE))
    assert (prepare["--finetune-model-path"], prepare["--stages"]) == (model, "finetune,evaluate")
    config = parse(trainer_args(run.spec, Stage.FINETUNE)[1:])
    assert config.start_model == config.tokenizer_dir == config.vision_dir == Path("/data") / model


def test_prepare_refuses_a_task_finetune_beside_pretrain():
    with pytest.raises(ValueError, match="drop pretrain from --stages"):
        PrepareConfig(data_dir="/d", stages=["pretrain", "finetune"], finetune_model_path="m")
    assert PrepareConfig(data_dir="/d", stages=["finetune"], finetune_model_path="m").start_model == Path(
        "/d/m"
    )


def write_model(path: Path, config: dict, files: tuple[str, ...]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    for name in files:
        (path / name).write_text("{}")
    return path


LLAVA_CONFIG = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}
COMPLETE = ("model.safetensors", "tokenizer.json", "preprocessor_config.json")


def test_a_llava_model_directory_is_checked_whole(tmp_path: Path):
    assert llava_model_problems(write_model(tmp_path / "ok", LLAVA_CONFIG, COMPLETE)) == []
    (missing,) = llava_model_problems(tmp_path / "nowhere")
    assert missing.startswith(f"missing {tmp_path}/nowhere: expected a Hugging Face LLaVA model directory")
    (llama,) = llava_model_problems(
        write_model(tmp_path / "vicuna", {"architectures": ["LlamaForCausalLM"]}, COMPLETE)
    )
    assert "describes ['LlamaForCausalLM'], not LlavaForConditionalGeneration" in llama
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert "is a LoRA adapter, not a model" in llava_model_problems(adapter)[0]
    weights, tokenizer, processor = llava_model_problems(
        write_model(tmp_path / "bare", LLAVA_CONFIG, ()), field="--model-path"
    )
    assert weights.startswith(f"{tmp_path}/bare has no weights") and "--model-path" in weights
    assert tokenizer.startswith(f"missing {tmp_path}/bare/tokenizer.json")
    assert processor.startswith(f"missing {tmp_path}/bare/preprocessor_config.json")


def test_validate_with_a_data_dir_names_the_model_path_that_is_not_llava(tmp_path: Path, capsys):
    data_dir = tmp_path / "data"
    write_model(data_dir / "LLaVA-Finetune/checkpoints/llava-1.5-7b-hf", {"model_type": "llama"}, COMPLETE)
    run = EXAMPLES / "llavarun-task-finetune.yaml"
    assert main(["validate", str(run)]) == 0  # offline: the object is valid
    assert main(["validate", str(run), "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert f"{data_dir}/LLaVA-Finetune/checkpoints/llava-1.5-7b-hf/config.json describes llama" in err
    assert "spec.finetune.modelPath" in err
    assert "vicuna" not in err, "a task finetune needs no language model or vision tower checkpoint"
