"""FLOP accounting and MFU follow the documented convention (docs/TRAINING.md) and FlagPerf's."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
from llava_trainer.flops import (
    LlavaShape,
    batch_flops,
    flagperf_flops,
    flagperf_params,
    mfu_percent,
    resolve_peak_tflops,
    sample_flops,
)
from llava_trainer.metrics import Throughput, TrainingLog

pytestmark = pytest.mark.trainer


def llava_config(hidden: int, layers: int, intermediate: int, heads: int) -> SimpleNamespace:
    text = SimpleNamespace(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32064,
    )
    vision = SimpleNamespace(
        hidden_size=1024, num_hidden_layers=24, intermediate_size=4096, image_size=336, patch_size=14
    )
    return SimpleNamespace(text_config=text, vision_config=vision, vision_feature_layer=-2)


VICUNA_7B = LlavaShape.from_config(llava_config(4096, 32, 11008, 32))
VICUNA_13B = LlavaShape.from_config(llava_config(5120, 40, 13824, 40))


def test_parameter_counts_match_the_published_model_sizes() -> None:
    assert VICUNA_7B.llm_params == pytest.approx(6.74e9, rel=0.01)
    assert VICUNA_13B.llm_params == pytest.approx(13.02e9, rel=0.01)
    # N excludes the input embedding: 1 vocab x hidden matrix less than the total.
    assert VICUNA_7B.llm_params - VICUNA_7B.llm_matmul_params == pytest.approx(32064 * 4096, rel=0.01)
    assert VICUNA_7B.image_tokens == 576
    assert VICUNA_13B.projector_params == pytest.approx(1024 * 5120 + 5120 * 5120, rel=0.001)


def test_clip_forward_is_about_038_tflop_per_image() -> None:
    assert VICUNA_7B.clip_forward_flops() == pytest.approx(0.38e12, rel=0.02)


def test_pretrain_sample_flops_match_the_worked_example() -> None:
    # 13B pretrain at T=607 is ~32.9 TF (4NT + attention + ViT).
    assert sample_flops(VICUNA_13B, "pretrain", 607, 1) == pytest.approx(32.9e12, rel=0.03)
    # finetune 7B at T=1150 is ~49.0 TF with 6NT.
    assert sample_flops(VICUNA_7B, "finetune", 1150, 1) == pytest.approx(49.0e12, rel=0.03)


def test_attention_is_counted_per_sample_not_per_padded_batch() -> None:
    split = batch_flops(VICUNA_7B, "finetune", [100, 100], 0)
    joined = batch_flops(VICUNA_7B, "finetune", [200], 0)
    assert split < joined
    assert joined - split == pytest.approx(12 * (200**2 - 2 * 100**2) * 4096 * 32)


def test_flagperf_uses_nominal_size_and_padded_tokens() -> None:
    assert flagperf_params(VICUNA_7B.llm_params) == 7e9
    assert flagperf_params(VICUNA_13B.llm_params) == 13e9
    assert flagperf_params(123_456) == 123_456
    assert flagperf_flops(VICUNA_13B, "pretrain", 1000) == 2 * 13e9 * 1000
    assert flagperf_flops(VICUNA_13B, "finetune", 1000) == 6 * 13e9 * 1000
    # The published A800 13B pretrain row: 2273.54 tokens/s/chip -> 18.95% at 312 TFLOP/s.
    mfu = mfu_percent(flagperf_flops(VICUNA_13B, "pretrain", 2273.54), 1.0, 1, 312.0)
    assert mfu == pytest.approx(18.95, abs=0.01)


def test_peak_comes_from_flag_then_env_then_the_accelerator_table(monkeypatch: pytest.MonkeyPatch) -> None:
    # The table itself (device rows, profile defaults) is tested in tests/unit/test_accelerator_profiles.py.
    monkeypatch.delenv("LLAVARUN_PEAK_TFLOPS", raising=False)
    assert resolve_peak_tflops(0.0, "cpu")[0] is None
    assert resolve_peak_tflops(0.0, "NVIDIA H100 80GB HBM3")[0] == 989.4
    assert resolve_peak_tflops(0.0, "NVIDIA A100-SXM4-80GB", "nvidia")[0] == 312.0  # device over profile
    assert resolve_peak_tflops(0.0, "cpu", "amd")[0] == 1307.4  # the profile's default
    assert resolve_peak_tflops(0.0, "cpu", "cpu")[0] is None
    monkeypatch.setenv("LLAVARUN_PEAK_TFLOPS", "500")
    assert resolve_peak_tflops(0.0, "NVIDIA H100 80GB HBM3") == (500.0, "LLAVARUN_PEAK_TFLOPS")
    assert resolve_peak_tflops(0.0, "cpu")[0] == 500.0
    assert resolve_peak_tflops(123.0, "x") == (123.0, "--peak-tflops")


def test_throughput_rates_and_mfu_are_null_without_a_peak() -> None:
    window = Throughput(
        samples=8, real_tokens=4000, padded_tokens=5000, images=8, flops=2e12, flagperf_flops=1e12
    )
    rates = window.rates(2.0, 2, None)
    assert rates["samples_per_second"] == 4.0
    assert rates["tokens_per_second"] == 2000.0
    assert rates["padded_tokens_per_second_per_device"] == 1250.0
    assert rates["mfu"] is None
    assert window.rates(2.0, 2, 1.0)["mfu"] == pytest.approx(50.0)
    assert Throughput.from_list(window.as_list()) == window


def test_log_lines_are_json_even_for_a_nan_loss(capsys: pytest.CaptureFixture[str]) -> None:
    TrainingLog(None, stage="pretrain").event("step", step=1, loss=math.nan, mfu=None)
    record = json.loads(capsys.readouterr().out)
    assert record["event"] == "step"
    assert record["stage"] == "pretrain"
    assert record["loss"] is None


# --- the accounting against torch's own FLOP counter on a real forward + backward ------------------


def tiny_llava(image_token: int = 250) -> object:
    """A random-init LLaVA at test widths with eager attention (every matmul visible to torch)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    vision = CLIPVisionConfig(
        image_size=56,
        patch_size=14,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        image_seq_length=16,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config)
    for module in model.modules():  # the vision tower and the LLM carry their own configs
        if getattr(module, "config", None) is not None:
            module.config._attn_implementation = "eager"
    return model.float()


def measured_training_flops(model: object, tokens: int, image_token: int = 250) -> float:
    """torch.utils.flop_counter's count of one sample's forward and backward (16 image tokens)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(3, 200, (1, tokens))
    ids[0, 1:17] = image_token
    labels = ids.clone()
    labels[0, :17] = -100
    with FlopCounterMode(display=False) as counter:
        loss = model(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56), labels=labels).loss
        loss.backward()
    return float(counter.get_total_flops())


@pytest.mark.parametrize("variant", ["pretrain", "finetune", "lora"])
def test_sample_flops_match_torchs_flop_counter(variant: str) -> None:
    """What the log's MFU counts is what the model computes: pretrain (frozen LLM, 4N), full
    finetune (6N) and LoRA (frozen LLM 4N + adapters 6N_a), measured on a real forward + backward.
    The projector's first layer needs no input gradient, so the formula's 6·N_proj per image token
    overcounts by 2·(CLIP width x LLM width) per image token, well under the tolerance."""
    from llava_operator.api.stage_params import LoraParams
    from llava_trainer import lora
    from llava_trainer.model import freeze_for_stage

    model = tiny_llava()
    stage = "pretrain" if variant == "pretrain" else "finetune"
    freeze_for_stage(model, stage, lora=variant == "lora")
    shape = LlavaShape.from_config(model.config)
    if variant == "lora":
        model, adapters = lora.apply_lora(model, LoraParams(r=32, alpha=64, dropout=0.0))
        assert adapters == shape.lora_params(32)  # the planner's count is what peft built
        shape = replace(shape, adapter_params=adapters)
    tokens = 48
    expected = sample_flops(shape, stage, tokens, images=1)
    assert measured_training_flops(model, tokens) == pytest.approx(expected, rel=0.01)


def test_lora_counts_its_adapters_and_not_the_llms_weight_gradients() -> None:
    # LLaVA-1.5-7B's LoRA (r 128 on all seven linear layers of 32 decoder layers): 319.8M adapters.
    assert VICUNA_7B.lora_params(128) == 319_815_680
    assert VICUNA_7B.lora_params(128, ["q_proj", "v_proj"]) == 32 * 2 * 128 * (4096 + 4096)
    shape = replace(VICUNA_7B, adapter_params=VICUNA_7B.lora_params(128))
    full = sample_flops(VICUNA_7B, "finetune", 1000, 1)
    lora = sample_flops(shape, "finetune", 1000, 1)
    assert full - lora == pytest.approx((2 * VICUNA_7B.llm_matmul_params - 6 * 319_815_680) * 1000)
    # FlagPerf's convention is per stage: LoRA is a finetune there (6N per padded token).
    assert flagperf_flops(shape, "finetune", 1000) == flagperf_flops(VICUNA_7B, "finetune", 1000)
