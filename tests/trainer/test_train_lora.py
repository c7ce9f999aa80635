"""LoRA finetune on two processes under torchrun on gloo, as the operator launches it: ZeRO-2 on the
assembled model (Vicuna + CLIP + a projector) and ZeRO-3 on a task finetune from a whole LLaVA
model. Per ZeRO stage: a reference run over two epochs, and a run stopped mid-epoch then resumed
that must log the same losses. The checkpoints hold only what trains; the export is the merged
model, which plain transformers loads (peft absent) and which equals the adapters applied by peft.

This file is also the torchrun worker: run as a script it trains, and the tests check the result.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.test_train_distributed import run_two_processes

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

LLAVA_MODEL = "LLaVA-Finetune/checkpoints/llava-1.5-7b-hf"
FLAGS = [
    "--micro-batch-size", "2",
    "--global-batch-size", "4",
    "--dataloader-workers", "0",
    "--lr-scheduler", "constant",
    "--warmup-ratio", "0",
    "--logging-steps", "1",
    "--seed", "11",
    "--epochs", "2",
    "--save-steps", "1000",
    "--group-by-modality-length", "false",
    "--learning-rate", "0.001",
    "--lora-r", "8",
    "--lora-alpha", "16",
    "--lora-dropout", "0.05",
    "--lora-learning-rate", "0.01",
]  # fmt: skip
STOP_AT = 3
"""The stopped run's last step: mid-epoch (6 steps per epoch on 24 samples in global batches of 4)."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synth_dir: Path) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("lora")
    run_two_processes(__file__, synth_dir, out, timeout=900)
    return {"out": out, **json.loads((out / "result.json").read_text())}


@pytest.mark.parametrize("zero", ["2", "3"])
def test_lora_trains_adapters_and_projector_and_resumes_mid_epoch_with_the_same_losses(
    trained: dict[str, Any], zero: str
) -> None:
    result = trained[zero]
    assert result["codes"] == [0, 0, 0]
    start = result["start"]
    assert start["deepspeed"]["zero_optimization"]["stage"] == int(zero)
    assert (start["world_size"], start["steps_per_epoch"], start["total_steps"]) == (2, 6, 12)
    trainable = start["trainable_parameters"]
    assert trainable["language_model"] == trainable["lm_head"] == trainable["vision_tower"] == 0
    assert trainable["lora_adapters"] == 17408 and trainable["projector"] > 0  # r 8 on 2 x 7 layers
    # Two learning rates reach DeepSpeed's optimizer: the adapters' (first) and the projector's.
    assert start["learning_rates"][0] == 0.01 and set(start["learning_rates"]) == {0.01, 0.001}

    reference = {int(k): v for k, v in result["reference"].items()}
    assert sorted(reference) == list(range(1, 13))
    first, second = [sum(reference[s] for s in range(e, e + 6)) / 6 for e in (1, 7)]
    assert second < first - 0.05, reference  # the second pass over the data has learnt from the first

    assert sorted(map(int, result["stopped"])) == list(range(1, STOP_AT + 1))
    resumed = {int(k): v for k, v in result["resumed"].items()}
    assert result["resume_step"] == STOP_AT
    assert sorted(resumed) == list(range(STOP_AT + 1, 13))
    for step, loss in {**{int(k): v for k, v in result["stopped"].items()}, **resumed}.items():
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_a_lora_checkpoint_holds_the_adapters_and_the_projector_only(
    trained: dict[str, Any], synth_dir: Path
):
    import torch

    # ZeRO-2: the module's saved weights are exactly the trained ones.
    ds = trained["out"] / "z2" / "run" / "checkpoints" / "checkpoint-12" / "ds"
    saved = torch.load(ds / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert saved and all(".lora_A." in k or ".lora_B." in k or "multi_modal_projector." in k for k in saved)
    assert sum(".lora_" in k for k in saved) == 2 * 2 * 7  # A and B, 2 layers, 7 linear layers each
    # ZeRO-3: the partitions of both ranks are far smaller than the frozen model they train on.
    ds = trained["out"] / "z3" / "run" / "checkpoints" / "checkpoint-12" / "ds"
    frozen = (synth_dir / LLAVA_MODEL / "model.safetensors").stat().st_size
    assert sum(f.stat().st_size for f in ds.iterdir()) < frozen / 2


def test_the_merged_export_loads_and_generates_in_transformers_without_peft(trained: dict[str, Any]) -> None:
    model_dir = trained["out"] / "z3" / "run" / "model"
    script = f"""
import sys
sys.modules["peft"] = None  # stock transformers only
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
processor = AutoProcessor.from_pretrained({str(model_dir)!r})
model = LlavaForConditionalGeneration.from_pretrained({str(model_dir)!r}).eval()
inputs = processor(images=Image.new("RGB", (40, 30), "red"), text="USER: <image>\\nWhat is it? ASSISTANT:", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
print(out.shape[1] - inputs["input_ids"].shape[1])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 1


def test_the_merged_export_is_the_base_model_with_peft_applying_the_saved_adapters(
    trained: dict[str, Any], synth_dir: Path
) -> None:
    """Task finetune (ZeRO-3): the LLaVA model it started from, the trained projector and the
    adapters in peft's format give the logits of the merged export; and the merge changed them."""
    import torch
    from llava_trainer.model import load_projector
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    run = trained["out"] / "z3" / "run"
    base = LlavaForConditionalGeneration.from_pretrained(synth_dir / LLAVA_MODEL)
    load_projector(base, run / "mm_projector.bin")
    with_adapters = PeftModel.from_pretrained(base, run / "adapter").eval()
    merged = LlavaForConditionalGeneration.from_pretrained(run / "model").eval()
    original = LlavaForConditionalGeneration.from_pretrained(synth_dir / LLAVA_MODEL).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, 590, (2, 40))
    ids[:, 1:17] = merged.config.image_token_index
    inputs = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 56, 56)}
    with torch.no_grad():
        expected, got, before = (m(**inputs).logits for m in (with_adapters, merged, original))
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(got, before, atol=1e-3)


def test_zero2_export_changes_only_the_llms_linear_layers_and_the_projector(
    trained: dict[str, Any], synth_dir: Path
) -> None:
    import torch
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from tests.trainer.test_train_support import exported_state

    after = exported_state(trained["out"] / "z2" / "run" / "model")
    vicuna = LlamaForCausalLM.from_pretrained(
        synth_dir / "LLaVA-Pretrain/checkpoints/vicuna-13b-v1.5"
    ).state_dict()
    clip = CLIPVisionModel.from_pretrained(
        synth_dir / "LLaVA-Pretrain/checkpoints/clip-vit-large-patch14-336"
    )
    for name, weight in clip.state_dict().items():
        assert torch.equal(after[f"model.vision_tower.{name}"], weight), name
    for name, weight in vicuna.items():
        ours = after[name.replace("model.", "model.language_model.", 1)]
        rows = weight.shape[0] if name.endswith(("embed_tokens.weight", "lm_head.weight")) else None
        unchanged = torch.equal(ours[:rows], weight)
        linear = name.endswith("_proj.weight")
        assert unchanged != linear, f"{name}: {'unchanged' if unchanged else 'changed'}"


# --- the torchrun worker --------------------------------------------------------------------------


def _worker(synth_dir: Path, out: Path) -> None:
    import contextlib
    import io

    import llava_trainer.distributed as distributed
    from llava_trainer.cli import main
    from llava_trainer.model import save_projector
    from safetensors.torch import load_file

    distributed.shutdown = lambda: None  # one process group for all runs (DeepSpeed cannot re-init)
    world = distributed.init_distributed()
    projector = out / "mm_projector.bin"  # any projector of the right shape to start the ZeRO-2 runs from
    if world.is_main:
        save_projector(load_file(synth_dir / LLAVA_MODEL / "model.safetensors"), projector)
    distributed.barrier(world)
    starts = {"2": ["--pretrained-projector", str(projector)], "3": ["--model-path", LLAVA_MODEL]}
    result: dict[str, Any] = {}
    for zero, start in starts.items():
        base = ["finetune", "--data-dir", str(synth_dir), *FLAGS, "--zero-stage", zero, *start]
        runs = {
            "reference": [*base, "--output-dir", f"{out}/z{zero}/reference"],
            "stopped": [*base, "--output-dir", f"{out}/z{zero}/run", "--max-steps", str(STOP_AT)],
            "resumed": [*base, "--output-dir", f"{out}/z{zero}/run"],
        }
        result[zero] = {"codes": []}
        for name, args in runs.items():
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                result[zero]["codes"].append(main(args))
            records = [json.loads(line) for line in stdout.getvalue().splitlines() if line.startswith("{")]
            result[zero][name] = {str(r["step"]): r["loss"] for r in records if r["event"] == "step"}
            if world.is_main and name == "reference":  # rank 0 logs
                result[zero]["start"] = next(r for r in records if r["event"] == "start")
            if world.is_main and name == "resumed":
                result[zero]["resume_step"] = next(r["step"] for r in records if r["event"] == "resume")
    if world.is_main:
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
