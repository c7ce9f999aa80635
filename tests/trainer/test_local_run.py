"""`llavarun local`: a LlavaRun's stages as real trainer processes on this machine, with the
status document the cluster would hold, retries, stop signals and resume, and the final report."""

from __future__ import annotations

import json
import os
import re
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


def local_argv(run: Path, data_dir: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llava_operator.cli",
        "local",
        str(run),
        "--data-dir",
        str(data_dir),
        *flags,
    ]


def llavarun_local(run: Path, data_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = local_argv(run, data_dir, *flags)
    return subprocess.run(argv, capture_output=True, text=True, timeout=900)


def status_of(data_dir: Path) -> dict:
    return json.loads((data_dir / "Output" / "llavarun-status.json").read_text())


def processes() -> list[tuple[int, int, int, str]]:
    """(pid, parent pid, process group, state) of every process, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        out.append((int(stat.parent.name), int(fields[1]), int(fields[2]), fields[0]))
    return out


def process_groups_below(pid: int) -> set[int]:
    """The process groups of every process below `pid` (torchrun puts each worker in its own)."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, ppid, group, _ in processes():
            if ppid == parent:
                found.add(group)
                todo.append(child)
    return found


def living_members(groups: set[int]) -> list[int]:
    """Processes of these process groups that still run (zombies awaiting their reaper do not)."""
    return [pid for pid, _, group, state in processes() if group in groups and state != "Z"]


def test_tiny_example_runs_all_four_stages_and_reports(data_dir_copy: Path):
    """Not on a terminal (a CI log, `| tee`): events and periodic progress lines, the final table
    ending its line, the report path printed once, as the last line."""
    result = llavarun_local(TINY, data_dir_copy, "--progress-seconds", "1")
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

    out = result.stdout
    for stage in ("prepare", "pretrain", "finetune", "evaluate"):
        assert f"StageStarted: stage {stage} started as job llava-tiny-{stage}" in out
        assert f"StageSucceeded: stage {stage} succeeded" in out
    assert re.search(r"^\d\d:\d\d:\d\d \[pretrain\] step \d+/\d+ loss ", out, re.MULTILINE)
    assert out.endswith(f"┘\nLlavaRun llava-tiny succeeded\nreport: {report}\n")
    assert out.count(str(report)) == 1
    assert result.stderr == ""


def test_failing_stage_is_retried_then_fails_quoting_the_error_and_the_log(
    data_dir_copy: Path, tmp_path: Path
):
    """The operator's vocabulary: retries exhausted is BackoffLimitExceeded, the message names the
    failed job, quotes its error and (locally) its log."""
    # prepare fails fast on a training JSON that is not JSON, so both attempts are cheap.
    (data_dir_copy / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json").write_text("not json")
    run = tiny_run(tmp_path, stages=["prepare", "pretrain"], retries=1)
    result = llavarun_local(run, data_dir_copy)
    assert result.returncode == 1
    status = status_of(data_dir_copy)
    assert status["phase"] == "Failed"
    assert status["stages"]["prepare"]["attempts"] == 2
    assert "pretrain" not in status["stages"], "a later stage never starts after a failure"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "BackoffLimitExceeded")
    log = data_dir_copy / "Output" / "logs" / "llava-tiny-prepare-r1.log"
    error = "blip_laion_cc_sbu_558k.json: invalid JSON array at byte 0"
    assert failed["message"].startswith("job llava-tiny-prepare-r1 failed: exited 2: llava-trainer prepare: ")
    assert error in failed["message"] and failed["message"].endswith(f"; log: {log}")
    assert error in log.read_text()
    # Each attempt's failure is said as it happens, with its error.
    assert "StageRetrying: stage prepare attempt 1/2 failed" in result.stdout
    assert "StageFailed: stage prepare failed after 2 attempt(s)" in result.stdout
    assert result.stdout.count(error) >= 3  # retrying, failed, and the run's summary


def test_a_failed_run_is_final_until_started_fresh(data_dir_copy: Path, tmp_path: Path):
    pretrain_json = data_dir_copy / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json"
    good = pretrain_json.read_text()
    pretrain_json.write_text("not json")
    run = tiny_run(tmp_path, stages=["prepare", "pretrain"], retries=0)
    assert llavarun_local(run, data_dir_copy).returncode == 1
    failed = next(c for c in status_of(data_dir_copy)["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "StageFailed"
    logs = sorted((data_dir_copy / "Output" / "logs").iterdir())

    pretrain_json.write_text(good)
    again = llavarun_local(run, data_dir_copy)
    assert again.returncode == 1, "failure is final, as on a cluster"
    assert "--fresh" in again.stdout
    assert sorted((data_dir_copy / "Output" / "logs").iterdir()) == logs, "nothing ran"

    # Started again as a new run (prepare only, to keep the test short): the old failure is gone.
    fresh = llavarun_local(tiny_run(tmp_path, stages=["prepare"]), data_dir_copy, "--fresh")
    assert fresh.returncode == 0, fresh.stdout[-3000:]
    status = status_of(data_dir_copy)
    assert (status["phase"], status["stages"]["prepare"]["attempts"]) == ("Succeeded", 1)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_checkpoints_ends_the_process_group_and_a_rerun_resumes(
    stop: signal.Signals, data_dir_copy: Path, tmp_path: Path
):
    """Ctrl-C and `kill` alike: the stage's whole process group is stopped (the trainer saves a
    checkpoint on its way out), the status file says the run is suspended, and the same command
    resumes from that checkpoint (after SIGTERM; SIGINT checks the stop only, to save time)."""
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["stages"] = ["prepare", "pretrain"]
    doc["spec"]["pretrain"].update(epochs=30, saveSteps=20)  # ~10 s of steps: time to stop it
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(doc))
    argv = local_argv(run, data_dir_copy)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = data_dir_copy / "Output" / "checkpoints_pretrain" / "checkpoints"
    deadline = time.monotonic() + 600
    while not any(checkpoints.glob("checkpoint-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be stopped"
    groups = process_groups_below(proc.pid)
    assert len(living_members(groups)) >= 3, "torchrun and its two workers"
    os.kill(proc.pid, stop)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + stop, out[-3000:]
    assert living_members(groups) == []
    status = status_of(data_dir_copy)
    assert status["phase"] == "Suspended"
    suspended = next(c for c in status["conditions"] if c["type"] == "Suspended")
    assert suspended["status"] == "True"
    assert status["stages"]["pretrain"]["phase"] == "Suspended"
    assert (suspended["reason"], status["observedGeneration"]) == ("Suspended", 2)
    log = data_dir_copy / "Output" / "logs" / "llava-tiny-pretrain.log"
    (terminated,) = [
        json.loads(line) for line in log.read_text().splitlines() if '"event": "terminated"' in line
    ]
    assert terminated["checkpoint_saved"] is True
    if stop is signal.SIGINT:
        return

    result = llavarun_local(run, data_dir_copy)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = status_of(data_dir_copy)
    assert status["phase"] == "Succeeded"
    assert status["stages"]["prepare"]["attempts"] == 1, "a finished stage is not run again"
    assert status["stages"]["pretrain"]["attempts"] == 1, "the suspended attempt itself was resumed"
    assert '"event": "resume"' in log.read_text()
    # As on a cluster: suspended (generation 2), resumed (3), and the Suspended condition says so.
    suspended = next(c for c in status["conditions"] if c["type"] == "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("False", "Resumed")
    assert status["observedGeneration"] == 3
    assert "Resumed: resumed at stage pretrain" in result.stdout
