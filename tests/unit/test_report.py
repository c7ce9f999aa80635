"""`llavarun report`: a run's status as the benchmark report (the same module `llavarun local` uses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llava_operator import yamlio
from llava_operator.cli import main
from llava_operator.local.report import report_markdown, run_report, write_report

ROOT = Path(__file__).resolve().parents[2]

STATUS = {
    "phase": "Succeeded",
    "stages": {
        "pretrain": {
            "phase": "Succeeded",
            "attempts": 1,
            "startTime": "2026-01-01T00:00:00Z",
            "completionTime": "2026-01-01T05:12:00Z",
        },
        "finetune": {"phase": "Succeeded", "attempts": 2},
        "evaluate": {"phase": "Succeeded", "attempts": 1},
    },
    "results": {
        # FlagPerf's A800 llava1.5_13b row: 2273.5 padded tokens/s per chip at 18.95 % (2N)
        "pretrain": {"samplesPerSecond": 29.6, "tokensPerSecond": 17600.0, "mfu": 37.4, "mfuFlagperf": 18.95},
        "finetune": {"tokensPerSecond": 12000.0, "mfu": 30.1, "mfuFlagperf": 40.57, "durationSeconds": 59000},
        "evaluate": {
            "split": "validation",
            "questions": 900,
            "overall": 36.2,
            "disciplines": {"Science": 30.0},
        },
    },
}


def a800_run(tmp_path: Path, status: dict | None = None) -> Path:
    run = yamlio.load_documents(ROOT / "examples" / "llavarun-13b.yaml")[0]
    run["spec"]["placement"]["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-A800-SXM4-80GB"}
    if status is not None:
        run["status"] = status
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    return path


def test_flagperf_rows_are_reproduced_in_its_tables_terms(tmp_path, capsys):
    assert main(["report", "--status-file", str(a800_run(tmp_path, STATUS)), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accelerator"]["model"].startswith("A800")
    pretrain, finetune = report["stages"]["pretrain"], report["stages"]["finetune"]
    assert pretrain["flagperfTokensPerSecondPerChip"] == pytest.approx(2273.5, rel=0.002)
    assert finetune["flagperfTokensPerSecondPerChip"] == pytest.approx(1622.9, rel=0.002)
    assert pretrain["tokensPerSecondPerChip"] == 17600.0 / 8 and pretrain["devices"] == 8
    assert pretrain["seconds"] == 5 * 3600 + 12 * 60  # from the stage's start and completion
    assert finetune["seconds"] == 59000  # from the trainer's result when the times are missing
    assert report["mmmu"]["overall"] == 36.2


def test_markdown_has_both_mfu_conventions_and_mmmu(tmp_path, capsys):
    assert main(["report", "--status-file", str(a800_run(tmp_path, STATUS))]) == 0
    out = capsys.readouterr().out
    assert "| MFU % | FlagPerf MFU % | FlagPerf tokens/s/chip |" in out
    assert "| pretrain | Succeeded | 1 | 18720.0 | 8 | 29.6 | 2200 | 37.4 | 18.9 | 2274 |" in out
    assert "| Science | 30.0 |" in out and "| **overall** | **36.2** |" in out
    assert "Accelerator: A800 80GB" in out


def test_a_bare_status_file_and_a_running_run(tmp_path, capsys):
    running = {
        "phase": "Running",
        "stages": {"pretrain": {"phase": "Running", "attempts": 1}},
        "progress": {"stage": "pretrain", "step": 10, "totalSteps": 100, "mfu": 41.0, "etaSeconds": 900},
    }
    path = tmp_path / "status.json"
    path.write_text(json.dumps(running))
    assert main(["report", "--status-file", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Running: pretrain step 10/100" in out and "ETA 900 s" in out
    assert "| pretrain | Running | 1 |" in out


def test_name_or_status_file_not_both(tmp_path, capsys):
    assert main(["report"]) == 1
    assert main(["report", "x", "--status-file", str(a800_run(tmp_path))]) == 1
    assert "not both" in capsys.readouterr().err


def test_llavarun_local_writes_the_same_report(tmp_path):
    history = {"pretrain": [(1, 2.0), (2, 1.5)]}
    path = write_report(tmp_path / "out", "tiny", ["prepare", "pretrain", "finetune"], STATUS, history)
    text = path.read_text()
    expected = report_markdown(run_report("tiny", STATUS, stage_order=["pretrain", "finetune"]))
    assert text.splitlines()[: len(expected)] == expected
    assert "| pretrain | Succeeded | 1 | 18720.0 |" in text
    assert (tmp_path / "out" / "loss_pretrain.png").stat().st_size > 0 and "![pretrain loss]" in text


def test_an_unusable_kubeconfig_is_one_line_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "kubeconfig"
    assert main(["report", "run", "--kubeconfig", str(missing)]) == 1
    assert capsys.readouterr().err.startswith(f"llavarun report: kubeconfig {missing}:")
