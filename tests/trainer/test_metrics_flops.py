"""FLOP accounting and MFU follow the documented convention (docs/TRAINING.md) and FlagPerf's."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from llava_trainer.metrics import (
    LlavaShape,
    Throughput,
    TrainingLog,
    batch_flops,
    flagperf_flops,
    flagperf_params,
    mfu_percent,
    resolve_peak_tflops,
    sample_flops,
)

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
