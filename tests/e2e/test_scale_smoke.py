"""`bench/scale.py` in quick mode (10 runs, 8 GPU nodes, its own control plane): every run
finishes with exactly one PyTorchJob per stage and the operator reports no reconcile errors.

The timings are the benchmark's business (docs/PERFORMANCE.md); this only keeps it runnable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.controlplane import cached_bin_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_scale_benchmark_quick_mode_finishes_every_run_without_lost_or_duplicated_stages(
    tmp_path: Path,
) -> None:
    if cached_bin_dir() is None:
        pytest.skip("control-plane binaries are not built (tests/cluster/build)")
    summary_file = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--runs", "10", "--nodes", "8", "--json", str(summary_file)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"bench/scale.py failed:\n{proc.stderr[-4000:]}\n{proc.stdout[-4000:]}"
    summary = json.loads(summary_file.read_text())
    assert summary == json.loads(proc.stdout)
    assert summary["phases"] == {"Succeeded": 10}
    assert summary["pytorchjobs"] == 10 * 4
    assert (summary["lost_stage_runs"], summary["duplicated_stage_runs"]) == ([], [])
    assert summary["first_job_seconds"]["n"] == 10
    assert summary["operator"]["reconcile_errors"] == 0 and summary["operator"]["error_log_lines"] == 0
    assert summary["operator"]["peak_rss_mb"] > 0 and summary["operator"]["cpu_seconds"] > 0
