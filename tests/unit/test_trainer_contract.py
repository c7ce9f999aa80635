"""The flags the operator renders are exactly what `llava-trainer` parses back."""

from __future__ import annotations

import argparse

import pytest
from llava_operator.api import LlavaRun, Stage
from llava_operator.render import render_stage_job
from llava_operator.trainer_command import stage_config
from llava_trainer.config import CONFIGS, add_config_flags, parse_config

from tests.helpers import EXAMPLES, load_yaml


def parse_rendered(args: list[str]):
    stage, flags = args[0], args[1:]
    parser = argparse.ArgumentParser()
    add_config_flags(parser, CONFIGS[stage])
    return parse_config(CONFIGS[stage], parser.parse_args(flags))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_rendered_args_round_trip(path):
    run = LlavaRun.model_validate(load_yaml(path))
    for stage in run.spec.stages:
        container = render_stage_job(run, stage)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
            "containers"
        ][0]
        assert parse_rendered(container["args"]) == stage_config(run.spec, stage)


def test_stage_hyperparameters_reach_the_trainer():
    doc = load_yaml(EXAMPLES[0])
    doc["spec"]["finetune"].update(learningRate=1e-5, microBatchSize=8, gradientCheckpointing=False)
    run = LlavaRun.model_validate(doc)
    config = stage_config(run.spec, Stage.FINETUNE)
    assert (config.learning_rate, config.micro_batch_size, config.gradient_checkpointing) == (1e-5, 8, False)
    assert str(config.output_dir) == "/data/Output/checkpoints_finetune"
    assert config.template == "vicuna_v1" and config.zero_stage == 3


def test_prepare_checks_only_the_inputs_of_the_run_stages():
    doc = load_yaml(next(p for p in EXAMPLES if "benchmark" in p.name))
    doc["spec"]["stages"] = ["prepare", "pretrain"]
    config = stage_config(LlavaRun.model_validate(doc).spec, Stage.PREPARE)
    assert config.stages == ["pretrain"]
