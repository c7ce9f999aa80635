"""bench/gpu_step.py runs without DeepSpeed and pydantic (the GPU machine has neither) and reports
throughput and MFU fields for both stages; checked here at tiny shapes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[2]
WITHOUT_DEEPSPEED_OR_PYDANTIC = """
import runpy, sys
sys.modules["deepspeed"] = None  # importing either now raises ImportError
sys.modules["pydantic"] = None
sys.argv = ["gpu_step.py", "--tiny", "--out", sys.argv[1]]
runpy.run_path("bench/gpu_step.py", run_name="__main__")
"""


def test_gpu_step_bench_runs_tiny_on_cpu_without_deepspeed_or_pydantic(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLAVARUN_PEAK_TFLOPS")}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_DEEPSPEED_OR_PYDANTIC, str(out)],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert json.loads(done.stdout) == report
    assert report["device"] and report["peak_tflops"] is None
    assert [(r["stage"], r["model"]) for r in report["results"]] == [
        ("pretrain", "tiny"),
        ("finetune", "tiny"),
    ]
    for result in report["results"]:
        assert result["samples_per_second"] > 0
        assert result["tokens_per_second"] == pytest.approx(
            result["samples_per_second"] * result["seq_len"], rel=0.01
        )
        assert result["seq_len"] > result["image_tokens"] == 16
        assert result["mfu"] is None  # no peak on CPU
        assert result["loss"] > 0
