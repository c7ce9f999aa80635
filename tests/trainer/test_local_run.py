"""`llavarun local`: a LlavaRun's stages as real trainer processes on this machine, with the
status document the cluster would hold, retries, Ctrl-C and resume, and the final report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

pytestmark = [pytest.mark.trainer, pytest.mark.slow]
TINY = ROOT / "examples" / "llavarun-tiny.yaml"


def tiny_run(tmp_path: Path, **spec_changes) -> Path:
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"].update(spec_changes)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def local_argv(run: Path, data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llava_operator.cli",
        "local",
        str(run),
        "--data-dir",
        str(data_dir),
        "--plain",
    ]


def llavarun_local(
    run: Path, data_dir: Path, **kwargs
) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    argv = local_argv(run, data_dir)
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, **kwargs)


def status_of(data_dir: Path) -> dict:
    return json.loads((data_dir / "Output" / "llavarun-status.json").read_text())


def test_tiny_example_runs_all_four_stages_and_reports(data_dir_copy: Path):
    result = llavarun_local(TINY, data_dir_copy)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = status_of(data_dir_copy)
    assert status["phase"] == "Succeeded"
    assert [s for s, e in status["stages"].items() if e["phase"] == "Succeeded"] == sorted(
        ["prepare", "pretrain", "finetune", "evaluate"]
    )
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True"
    # The trainer's part of the same document: counts, checkpoints, MMMU accuracy.
    results = status["results"]
    assert results["prepare"]["samples"]["pretrain"] > 0
    assert Path(results["finetune"]["checkpoint"]).is_dir()
    assert 0 <= results["evaluate"]["overall"] <= 100
    report = data_dir_copy / "Output" / "report" / "report.md"
    text = report.read_text()
    for stage in ("prepare", "pretrain", "finetune", "evaluate"):
        assert f"| {stage} | Succeeded |" in text
    assert (report.parent / "loss_pretrain.png").stat().st_size > 1000
    assert (report.parent / "loss_finetune.png").stat().st_size > 1000
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"phase": "Succeeded", "report": str(report)}


def test_failing_stage_is_retried_then_fails_naming_job_and_log(data_dir_copy: Path, tmp_path: Path):
    # prepare fails fast on a broken layout, so both attempts are cheap.
    run = tiny_run(
        tmp_path, stages=["prepare", "pretrain"], retries=1, paths={"pretrainData": "missing.json"}
    )
    result = llavarun_local(run, data_dir_copy)
    assert result.returncode == 1
    status = status_of(data_dir_copy)
    assert status["phase"] == "Failed"
    assert status["stages"]["prepare"]["attempts"] == 2
    assert "pretrain" not in status["stages"], "a later stage never starts after a failure"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "RetriesExhausted"
    assert "llava-tiny-prepare-r1" in failed["message"]
    log = data_dir_copy / "Output" / "logs" / "llava-tiny-prepare-r1.log"
    assert str(log) in failed["message"] and "missing.json" in log.read_text()


def test_interrupted_run_resumes_where_it_stopped(data_dir_copy: Path, tmp_path: Path):
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["stages"] = ["prepare", "pretrain"]
    doc["spec"]["pretrain"].update(epochs=3, saveSteps=2)
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(doc))
    argv = local_argv(run, data_dir_copy)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = data_dir_copy / "Output" / "checkpoints_pretrain" / "checkpoints"
    deadline = time.monotonic() + 600
    while not any(checkpoints.glob("checkpoint-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert status_of(data_dir_copy)["phase"] == "Suspended"

    result = llavarun_local(run, data_dir_copy)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = status_of(data_dir_copy)
    assert status["phase"] == "Succeeded"
    assert status["stages"]["prepare"]["attempts"] == 1, "a finished stage is not run again"
    log = (data_dir_copy / "Output" / "logs" / "llava-tiny-pretrain.log").read_text()
    assert '"event": "resume"' in log
