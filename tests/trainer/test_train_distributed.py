"""Two processes under torchrun on gloo, the way the operator launches a stage: pretrain on ZeRO-2
through the `llava-trainer` command line, finetune on ZeRO-3 (with ranks seeing different
modalities in one step), and a ZeRO-3 finetune stopped and resumed with the same losses.

This file is also the torchrun worker: run as a script it trains, and the test checks the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.trainer

COMMON_FLAGS = [
    "--micro-batch-size", "2",
    "--global-batch-size", "4",
    "--dataloader-workers", "0",
    "--lr-scheduler", "constant",
    "--warmup-ratio", "0",
    "--logging-steps", "1",
    "--seed", "11",
]  # fmt: skip


def test_two_processes_pretrain_zero2_then_finetune_zero3_and_resume(tmp_path: Path, synth_dir: Path) -> None:
    run_two_processes(__file__, synth_dir, tmp_path, timeout=600)
    result = json.loads((tmp_path / "result.json").read_text())

    assert result["codes"] == [0, 0, 0, 0]
    assert sorted(result["pretrain"]) == ["1", "2", "3"]
    assert result["start"]["world_size"] == 2
    assert result["start"]["gradient_accumulation_steps"] == 1
    assert result["start"]["deepspeed"]["zero_optimization"]["stage"] == 2
    assert result["text_only_on_rank1"] >= 1  # the ranks disagreed on modality and did not deadlock
    reference, resumed = result["finetune"], result["resumed"]
    assert sorted(resumed) == ["3", "4"]
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step

    _check_export(tmp_path / "a" / "checkpoints_finetune" / "model", synth_dir)


def _check_export(directory: Path, synth_dir: Path) -> None:
    """ZeRO-3's gathered export is whole: the vision tower equals the CLIP checkpoint it came from."""
    import torch
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(directory)
    clip = CLIPVisionModel.from_pretrained(
        synth_dir / "LLaVA-Pretrain/checkpoints/clip-vit-large-patch14-336"
    )
    for name, weight in clip.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], weight), name


def run_two_processes(script: str, *args: Path, timeout: float) -> None:
    """`script args` under torchrun with 2 gloo processes, in a clean environment (no rank or
    status file left by this pytest process); fails with the processes' output."""
    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": f"{repo}:{repo / 'trainer'}:{repo / 'operator'}",
        "OMP_NUM_THREADS": "1",
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LLAVARUN_STATUS_FILE"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        script, *map(str, args),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the torchrun worker --------------------------------------------------------------------------


class _TextOnlyOnRank1:
    """Rank 1's first micro-batch of an epoch loses its images (ids -> unk, no pixel_values), so the
    two ranks run different modalities in the same step."""

    count = 0

    def __init__(self, loader: Any, rank: int) -> None:
        self.loader, self.rank = loader, rank

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Any:
        for batch in self.loader:
            if self.rank == 1 and self.loader.position == 1 and "pixel_values" in batch:
                image_id = self.image_token_id
                batch = dict(batch)
                batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == image_id, 0)
                del batch["pixel_values"]
                batch["num_images"] = 0
                type(self).count += 1
            yield batch


def _worker(synth_dir: Path, out: Path) -> None:
    import contextlib
    import io

    import llava_trainer.distributed as distributed
    import llava_trainer.train as train_module
    from llava_trainer.cli import main

    # One process group for all runs: DeepSpeed cannot re-initialise after a shutdown.
    distributed.shutdown = lambda: None
    real_loader = train_module.build_loader

    def loader(config: Any, text: Any, world: Any) -> Any:
        wrapped = _TextOnlyOnRank1(real_loader(config, text, world), world.rank)
        wrapped.image_token_id = text.image_token_id
        return wrapped

    train_module.build_loader = loader
    data = ["--data-dir", str(synth_dir), *COMMON_FLAGS]
    projector = out / "a" / "checkpoints_pretrain" / "mm_projector.bin"
    runs = {
        "pretrain": ["pretrain", *data, "--output-dir", f"{out}/a/checkpoints_pretrain", "--max-steps", "3",
                     "--learning-rate", "0.01"],
        "finetune": ["finetune", *data, "--output-dir", f"{out}/a/checkpoints_finetune", "--max-steps", "4",
                     "--pretrained-projector", str(projector), "--group-by-modality-length", "false"],
        "stopped": ["finetune", *data, "--output-dir", f"{out}/b/checkpoints_finetune", "--max-steps", "2",
                    "--pretrained-projector", str(projector), "--group-by-modality-length", "false"],
        "resumed": ["finetune", *data, "--output-dir", f"{out}/b/checkpoints_finetune", "--max-steps", "4",
                    "--pretrained-projector", str(projector), "--group-by-modality-length", "false"],
    }  # fmt: skip
    result: dict[str, Any] = {"codes": []}
    for name, args in runs.items():
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            result["codes"].append(main(args))
        records = [json.loads(line) for line in stdout.getvalue().splitlines() if line.startswith("{")]
        result[name] = {str(r["step"]): r["loss"] for r in records if r["event"] == "step"}
        if name == "pretrain":
            result["start"] = next((r for r in records if r["event"] == "start"), {})
    counts = distributed.all_reduce_floats([float(_TextOnlyOnRank1.count)], train_module_world())
    result["text_only_on_rank1"] = counts[0]
    if int(os.environ["RANK"]) == 0:
        (out / "result.json").write_text(json.dumps(result))


def train_module_world() -> Any:
    from llava_trainer.distributed import init_distributed

    return init_distributed()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
