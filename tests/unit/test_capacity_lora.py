"""`llavarun plan` and the grace period count what a LoRA finetune trains: the adapters and the
projector, the LLM frozen (the trainer counts the same adapters for MFU)."""

from __future__ import annotations

from llava_operator.api import LlavaRun, Stage
from llava_operator.capacity.checkpoint import grace_period_seconds
from llava_operator.capacity.geometry import for_stage, recipe_geometry
from llava_operator.capacity.inputs import plan_for_run
from llava_operator.capacity.memory import trained_and_frozen

from tests.helpers import EXAMPLES, load_yaml


def run_of(name: str) -> LlavaRun:
    return LlavaRun.model_validate(load_yaml(next(p for p in EXAMPLES if p.name == name)))


def test_lora_trains_the_adapters_and_the_projector_of_finetune_lora_sh():
    """r 128 on all seven linear layers of Vicuna-7B's 32 decoder layers, plus the projector."""
    spec = run_of("llavarun-7b-lora.yaml").spec
    geometry = for_stage(recipe_geometry(spec.paths.language_model), spec, "finetune")
    trained, frozen = trained_and_frozen(geometry, "finetune")
    assert geometry.shape.adapter_params == 319_815_680
    assert trained == 319_815_680 + geometry.projector_params
    assert frozen == geometry.llm_params + geometry.vision_params


def test_lora_needs_far_less_optimizer_memory_and_time_to_save_than_the_full_finetune():
    full, lora = run_of("llavarun-7b.yaml"), run_of("llavarun-7b-lora.yaml")
    plans = {name: plan_for_run(run)["stages"]["finetune"] for name, run in (("full", full), ("lora", lora))}
    assert plans["lora"]["memoryGiB"]["optimizer"] < plans["full"]["memoryGiB"]["optimizer"] / 10
    assert (
        plans["lora"]["memoryGiB"]["gradients"] < plans["full"]["memoryGiB"]["gradients"] / 5
    )  # ZeRO-3 gathers
    assert any("LoRA adapters" in a for a in plans["lora"]["assumptions"])
    assert grace_period_seconds(lora.spec, Stage.FINETUNE) < grace_period_seconds(full.spec, Stage.FINETUNE)
