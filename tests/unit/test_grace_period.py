"""Preempted pods get the time their checkpoint needs: one grace period per stage, sized from what
the stage saves, rendered into the pod spec and the trainer's environment alike."""

from __future__ import annotations

from typing import Any

import pytest
from llava_operator.api import LlavaRun, Stage
from llava_operator.capacity.checkpoint import grace_period_seconds
from llava_operator.render import render_stage_job

from tests.helpers import EXAMPLES, load_yaml


def example(name: str) -> dict[str, Any]:
    return load_yaml(next(p for p in EXAMPLES if name in p.name))


def pod_templates(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_pod_and_its_trainer_get_the_same_grace_period(path):
    run = LlavaRun.model_validate(load_yaml(path))
    for stage in run.spec.stages:
        for pod in pod_templates(render_stage_job(run, stage)):
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            assert pod["terminationGracePeriodSeconds"] == grace_period_seconds(run.spec, stage)
            assert env["LLAVARUN_GRACE_SECONDS"] == str(pod["terminationGracePeriodSeconds"])
            # torchrun waits as long for its workers before it kills them
            assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(pod["terminationGracePeriodSeconds"])


def test_the_13b_finetune_gets_minutes_pretrain_less_and_evaluate_the_kubernetes_default():
    """13B finetune on one node writes ~180 GB (16-bit weights and fp32 Adam states of 13B trained
    parameters) at 1 GiB/s; pretrain saves only the projector; evaluate saves nothing."""
    spec = LlavaRun.model_validate(example("13b")).spec
    assert 200 < grace_period_seconds(spec, Stage.FINETUNE) < 400
    assert grace_period_seconds(spec, Stage.PRETRAIN) <= 60
    assert grace_period_seconds(spec, Stage.EVALUATE) == 30


def test_more_nodes_write_in_parallel_under_zero3():
    doc = example("13b")
    one = grace_period_seconds(LlavaRun.model_validate(doc).spec, Stage.FINETUNE)
    doc["spec"]["finetune"] = {"globalBatchSize": 512, "resources": {"nodes": 4, "gpusPerNode": 8}}
    assert grace_period_seconds(LlavaRun.model_validate(doc).spec, Stage.FINETUNE) < one


def test_the_7b_model_needs_less_time_than_the_13b():
    doc = example("13b")
    big = grace_period_seconds(LlavaRun.model_validate(doc).spec, Stage.FINETUNE)
    doc["spec"]["paths"] = {"languageModel": "LLaVA-Pretrain/checkpoints/vicuna-7b-v1.5"}
    assert grace_period_seconds(LlavaRun.model_validate(doc).spec, Stage.FINETUNE) < big


def test_a_stated_grace_period_wins():
    doc = example("13b")
    doc["spec"].setdefault("finetune", {})["resources"] = {"terminationGracePeriodSeconds": 900}
    run = LlavaRun.model_validate(doc)
    (pod, *_) = pod_templates(render_stage_job(run, Stage.FINETUNE))
    assert pod["terminationGracePeriodSeconds"] == 900
