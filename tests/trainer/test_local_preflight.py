"""`llavarun local` refuses a run that cannot work on this machine before anything starts: within
seconds, with exit status 2, naming the field or file and what is expected, and writing nothing."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from llava_operator.cli import main
from llava_operator.local.preflight import Refused, cpu_cores, preflight
from llava_operator.validate import load_run

from tests.helpers import ROOT

pytestmark = pytest.mark.trainer
TINY = ROOT / "examples" / "llavarun-tiny.yaml"
MULTINODE = ROOT / "examples" / "llavarun-multinode.yaml"
REFUSED = 2
SECONDS = 3.0
"""A refusal is a few file checks; generous for a loaded 2-core machine (typically ~0.1 s)."""
MODEL = "LLaVA-Pretrain/checkpoints/vicuna-13b-v1.5"
VISION = "LLaVA-Pretrain/checkpoints/clip-vit-large-patch14-336"


def tiny(**spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load(TINY.read_text())
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key] = {**doc["spec"][key], **value}
        else:
            doc["spec"][key] = value
    return doc


TOO_MANY = cpu_cores() + 1
TOO_BIG = {
    "microBatchSize": 1,
    "globalBatchSize": TOO_MANY,
    "resources": {"nodes": 1, "gpusPerNode": TOO_MANY},
}
"""A pretrain stage with one process more than this machine has cores."""


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


Case = tuple[str, dict[str, Any], Callable[[Path], Any], str]
CASES: list[Case] = [
    ("no data_dir", tiny(), lambda d: shutil.rmtree(d), "--data-dir {d}: not a directory"),
    (
        "training JSON missing",
        tiny(paths={"pretrainData": "LLaVA-Pretrain/missing.json"}),
        lambda d: None,
        "missing {d}/LLaVA-Pretrain/missing.json: expected the LLaVA-Pretrain caption JSON",
    ),
    (
        "language model missing",
        tiny(paths={"languageModel": "LLaVA-Pretrain/checkpoints/nowhere"}),
        lambda d: None,
        "missing {d}/LLaVA-Pretrain/checkpoints/nowhere/config.json",
    ),
    (
        "vision tower without weights",
        tiny(),
        lambda d: (d / VISION / "model.safetensors").unlink(),
        f"{{d}}/{VISION} has no weights",
    ),
    (
        "tokenizer missing",
        tiny(),
        lambda d: (d / MODEL / "tokenizer.model").unlink(),
        f"missing {{d}}/{MODEL}/tokenizer.model: expected the Vicuna tokenizer",
    ),
    (
        "tokenizer truncated",
        tiny(),
        lambda d: truncate(d / MODEL / "tokenizer.model"),
        f"{{d}}/{MODEL}/tokenizer.model is not a readable tokenizer",
    ),
    (
        "evaluate without a model",
        tiny(stages=["evaluate"]),
        lambda d: None,
        "missing {d}/Output/checkpoints_finetune/model: expected the model to evaluate",
    ),
    (
        "finetune without a projector",
        tiny(stages=["finetune"]),
        lambda d: None,
        "missing {d}/Output/checkpoints_pretrain/mm_projector.bin: spec.finetune.pretrainedProjector",
    ),
    (
        "more processes than cores",
        tiny(pretrain=TOO_BIG),
        lambda d: None,
        f"spec.pretrain.resources: nodes 1 x gpusPerNode {TOO_MANY} = {TOO_MANY} processes, "
        f"and this machine has {cpu_cores()} CPU cores (lower nodes/gpusPerNode to fit, or pass --oversubscribe",
    ),
    (
        "suspended in the spec",
        tiny(suspend=True),
        lambda d: None,
        "spec.suspend: true would start nothing",
    ),
    (
        "the output holds another run",
        tiny(),
        lambda d: (
            (d / "Output" / "local").mkdir(),
            (d / "Output" / "local" / "llavarun.json").write_text('{"metadata": {"name": "other"}}'),
        ),
        "{d}/Output holds the state of LlavaRun other: use another spec.paths.output",
    ),
    (
        "output is a file",
        tiny(),
        lambda d: (shutil.rmtree(d / "Output"), (d / "Output").write_text("")),
        "{d}/Output is not a writable directory",
    ),
]


def listing(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*")} if root.exists() else {}


@pytest.mark.parametrize(("doc", "breaks", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_run_that_cannot_work_here_is_refused_at_once_and_writes_nothing(
    doc: dict[str, Any],
    breaks: Callable[[Path], Any],
    expected: str,
    data_dir_copy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(doc))
    breaks(data_dir_copy)
    before = listing(data_dir_copy)
    started = time.monotonic()
    code = main(["local", str(run), "--data-dir", str(data_dir_copy)])
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == REFUSED, err
    assert f"LlavaRun {doc['metadata']['name']} cannot start on this machine:" in err
    assert expected.format(d=data_dir_copy) in err
    assert took < SECONDS
    assert listing(data_dir_copy) == before


def test_the_multinode_example_is_refused_in_seconds_with_every_stage_named(synth_dir: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "llava_operator.cli", "local", str(MULTINODE), "--data-dir", str(synth_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - started
    assert result.returncode == REFUSED, result.stdout + result.stderr
    assert result.stdout == ""
    for stage, processes in (("pretrain", 32), ("finetune", 32), ("evaluate", 8)):
        assert f"spec.{stage}.resources: nodes " in result.stderr
        assert f" = {processes} processes" in result.stderr
    assert took < 10 * SECONDS  # a fresh interpreter included


def test_oversubscribing_is_allowed_when_asked_for(synth_dir: Path) -> None:
    run = load_run(tiny(pretrain=TOO_BIG))
    with pytest.raises(Refused):
        preflight(run, synth_dir)
    preflight(run, synth_dir, oversubscribe=True)


def test_every_problem_is_reported_at_once(data_dir_copy: Path) -> None:
    run = load_run(
        tiny(
            paths={"pretrainData": "missing.json"},
            pretrain=TOO_BIG,
        )
    )
    (data_dir_copy / MODEL / "tokenizer.model").unlink()
    with pytest.raises(Refused) as refused:
        preflight(run, data_dir_copy)
    text = str(refused.value)
    for fragment in ("spec.pretrain.resources", "missing.json", "tokenizer.model"):
        assert fragment in text


def test_a_second_llavarun_local_on_the_same_output_is_refused(
    data_dir_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two supervisors would run the same attempt twice: the second one is refused at once."""
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(tiny()))
    lock = data_dir_copy / "Output" / "local" / "lock"
    lock.parent.mkdir(parents=True)
    with lock.open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the first `llavarun local` holds it
        started = time.monotonic()
        code = main(["local", str(run), "--data-dir", str(data_dir_copy)])
        took = time.monotonic() - started
    assert code == REFUSED
    assert f"another llavarun local is running LlavaRun llava-tiny on {data_dir_copy / 'Output'}" in (
        capsys.readouterr().err
    )
    assert took < SECONDS
    assert not (data_dir_copy / "Output" / "llavarun-status.json").exists()
