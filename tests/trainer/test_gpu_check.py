"""bench/gpu_check.sh in tiny mode on CPU: gpu_step's measurements beside the plan's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_tiny_prints_measured_and_planned_side_by_side(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny pretrain" in done.stdout and "tiny finetune" in done.stdout
    assert "plan GiB" in done.stdout
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    measured = json.loads((tmp_path / "gpu_step.json").read_text())["results"]
    assert [r["case"] for r in rows] == [f"{m['model']} {m['stage']}" for m in measured]
    for row, result in zip(rows, measured, strict=True):
        assert row["tokens_per_second"] == result["tokens_per_second"] > 0
        assert row["plan"]["memory_gib"] > 0
        parts = row["plan"]["memory_bytes"]
        # the optimizer keeps two moments per trained parameter, in the weights' dtype (fp32 on CPU)
        assert parts["optimizer"] == 2 * parts["gradients"] > 0
        assert row["plan"]["memory_gib"] == pytest.approx(sum(parts.values()) / 2**30, abs=1e-4)
