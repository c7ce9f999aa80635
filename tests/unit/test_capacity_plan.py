"""`llavarun plan`: the plan's shape, its arithmetic and its edges, at the recipe's real sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from llava_operator.api.profiles import known_device
from llava_operator.capacity.geometry import recipe_geometry
from llava_operator.capacity.lengths import recipe_lengths
from llava_operator.capacity.memory import GIB, model_states
from llava_operator.cli import main
from llava_trainer.flops import sample_flops

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "llavarun-13b.yaml")


def plan(capsys, *args: str) -> tuple[int, dict]:
    code = main(["plan", EXAMPLE, "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_the_13b_recipe_fits_8_h100s_with_the_documented_shape(capsys):
    code, result = plan(capsys)
    assert code == 0
    assert result["device"]["model"].startswith("H100 SXM")  # from the example's node label
    for name in ("pretrain", "finetune"):
        stage = result["stages"][name]
        assert stage["devices"] == 8 and stage["fits"] is True and stage["fix"] is None
        gib = stage["memoryGiB"]
        assert set(gib) >= {"parameters", "gradients", "optimizer", "activations", "total", "capacity"}
        assert gib["capacity"] == known_device("H100 SXM").memory_gib
        parts = gib["parameters"] + gib["gradients"] + gib["optimizer"] + gib["activations"] + gib["overhead"]
        assert gib["total"] == pytest.approx(parts, abs=0.03)
        assert stage["gpuHours"] == pytest.approx(stage["hours"] * 8, rel=0.01)
        assert stage["assumptions"]
    # pretrain keeps the whole 13B LLM in 16 bits on every device (ZeRO-2 partitions only the
    # projector's states); finetune's ZeRO-3 splits weights and the 16 bytes/param of states by 8
    assert result["stages"]["pretrain"]["memoryGiB"]["parameters"] > 24
    assert result["stages"]["finetune"]["memoryGiB"]["optimizer"] == pytest.approx(
        12 * (13_016_519_680 + 21_000_000) / 8 / GIB, rel=0.01
    )


def test_time_is_the_trainers_flops_over_peak_devices_and_mfu(capsys):
    _, h100 = plan(capsys, "--mfu", "40")
    geometry = recipe_geometry("vicuna-13b-v1.5")
    lengths = recipe_lengths("pretrain", image_tokens=576, max_length=2048)
    flops = sum(n * sample_flops(geometry.shape, "pretrain", t, i) for (t, i), n in lengths.counts.items())
    seconds = flops / (989.4e12 * 8 * 0.40)
    assert h100["stages"]["pretrain"]["hours"] == pytest.approx(seconds / 3600, rel=0.01)
    _, a800 = plan(capsys, "--mfu", "40", "--device", "NVIDIA A800-SXM4-80GB")
    ratio = a800["stages"]["finetune"]["hours"] / h100["stages"]["finetune"]["hours"]
    assert ratio == pytest.approx(989.4 / 312.0, rel=0.01)


def test_a_measured_mfu_from_a_status_file_replaces_the_default(capsys, tmp_path):
    status = tmp_path / "status.json"
    status.write_text(
        json.dumps({"results": {"pretrain": {"mfu": 17.5}}, "progress": {"stage": "finetune", "mfu": 70}})
    )
    _, default = plan(capsys)
    _, measured = plan(capsys, "--from", str(status))
    assert measured["stages"]["pretrain"]["mfu"] == 17.5
    assert "measured" in measured["stages"]["pretrain"]["mfuSource"]
    assert measured["stages"]["pretrain"]["hours"] == pytest.approx(
        default["stages"]["pretrain"]["hours"] * default["stages"]["pretrain"]["mfu"] / 17.5, rel=0.01
    )
    assert measured["stages"]["finetune"]["mfu"] == 70


def test_a_stage_that_does_not_fit_gets_the_cheapest_change_that_does(capsys):
    code, result = plan(capsys, "--device", "NVIDIA A100-SXM4-40GB")
    assert code == 1
    stage = result["stages"]["finetune"]
    assert stage["fits"] is False
    assert stage["memoryGiB"]["total"] > stage["memoryGiB"]["capacity"]
    fix = stage["fix"]
    assert fix["change"].startswith("spec.finetune.microBatchSize:")
    assert fix["memoryGiB"]["total"] <= stage["memoryGiB"]["capacity"]
    assert 128 % (int(fix["change"].split(": ")[1]) * fix["devices"]) == 0  # the global batch still divides


def test_the_human_table_names_verdict_time_and_assumptions(capsys):
    assert main(["plan", EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert "verdict: fits" in out and "GPU-hours" in out and "assumptions:" in out
    assert "MFU 35% (default)" in out


def test_zero_stages_partition_what_deepspeed_partitions():
    trained, n = 1_000_000, 8
    z2 = model_states(trained, 0, precision="bf16", zero_stage=2, devices=n, largest_module=0)
    assert z2.total == 2 * trained + 18 * trained / n
    z3 = model_states(trained, 0, precision="bf16", zero_stage=3, devices=n, largest_module=1000)
    assert z3.total == 18 * trained / n + 4 * 1000
    frozen = model_states(0, trained, precision="bf16", zero_stage=2, devices=n, largest_module=0)
    assert frozen.total == 2 * trained  # frozen: only the 16-bit weight, replicated under ZeRO-2


def test_recipe_geometry_is_vicuna_13b_and_clip_l_336():
    geometry = recipe_geometry("LLaVA-Pretrain/checkpoints/vicuna-13b-v1.5")
    assert geometry.llm_params == 13_016_519_680  # Vicuna-13B's 13,015,864,320 + 128 new embedding rows
    assert geometry.vision_params == 303_507_456  # CLIPVisionModel ViT-L/14 at 336 px
    assert geometry.shape.image_tokens == 576 and geometry.shape.vocab == 32064


def test_plan_imports_no_torch():
    code = (
        "import sys; from llava_operator.cli import main; "
        f"rc = main(['plan', {EXAMPLE!r}, '--json']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stages"]["pretrain"]["fits"] is True


def test_unknown_devices_and_models_are_refused_with_what_to_do(capsys, tmp_path):
    assert main(["plan", EXAMPLE, "--device", "Voodoo5"]) == 1
    assert "not in the accelerator table" in capsys.readouterr().err
    run = tmp_path / "run.yaml"
    run.write_text(Path(EXAMPLE).read_text().replace("image: ", "paths: {languageModel: my-llm}\n  image: "))
    assert main(["plan", str(run)]) == 1
    assert "give --data-dir" in capsys.readouterr().err
