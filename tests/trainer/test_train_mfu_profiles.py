"""Every accelerator profile yields an MFU: the operator renders a stage's flags for the profile,
the trainer parses them back and trains the tiny model on CPU, and the LlavaRun status gets a
non-null MFU measured against the profile's peak (the cpu profile has none: its run states one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from llava_operator.api import PROFILES, AcceleratorProfileName, LlavaRun, Stage
from llava_operator.trainer_command import trainer_args
from llava_trainer.config import CONFIGS, add_config_flags, parse_config

from tests.helpers import EXAMPLES, load_yaml
from tests.trainer.test_train_support import single_process_world, train_capturing

pytestmark = pytest.mark.trainer

STATED_CPU_PEAK = 0.1
"""TFLOP/s: roughly two cores' fp32 FMA peak; the cpu profile has no default, so the run states it."""


def rendered_pretrain_config(profile: AcceleratorProfileName, data_dir: Path, output_dir: Path):
    """The tiny example with `profile`, one process, one step: rendered as the operator does and
    parsed as `llava-trainer pretrain` does (the output moved out of the shared data_dir)."""
    doc = load_yaml(next(p for p in EXAMPLES if "tiny" in p.name))
    doc["spec"]["accelerator"] = {"profile": profile.value}
    if profile is AcceleratorProfileName.CPU:
        doc["spec"]["accelerator"]["peakTflops"] = STATED_CPU_PEAK
    doc["spec"]["pretrain"].update(
        globalBatchSize=2, microBatchSize=2, maxSteps=1, loggingSteps=1, resources={"gpusPerNode": 1}
    )
    spec = LlavaRun.model_validate(doc).spec
    command, *flags = trainer_args(spec, Stage.PRETRAIN, data_dir_override=str(data_dir))
    parser = argparse.ArgumentParser()
    add_config_flags(parser, CONFIGS[command])
    return parse_config(CONFIGS[command], parser.parse_args([*flags, "--output-dir", str(output_dir)]))


@pytest.mark.parametrize("profile", list(AcceleratorProfileName))
def test_each_profile_reports_mfu_against_its_peak(
    profile: AcceleratorProfileName, synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = rendered_pretrain_config(profile, synth_dir, tmp_path / "checkpoints_pretrain")
    status_file = tmp_path / "status.json"
    monkeypatch.delenv("LLAVARUN_PEAK_TFLOPS", raising=False)
    monkeypatch.setenv("LLAVARUN_STATUS_FILE", str(status_file))
    monkeypatch.setenv("LLAVARUN_STAGE", "pretrain")
    with single_process_world() as world:
        code, log = train_capturing(config, world)
    assert code == 0

    peak = PROFILES[profile].peak_tflops or STATED_CPU_PEAK
    start = next(r for r in log if r["event"] == "start")
    assert start["peak_tflops"] == peak
    step = next(r for r in log if r["event"] == "step")
    assert step["mfu"] == pytest.approx(100 * step["tflops_per_device"] / peak)
    status = json.loads(status_file.read_text())
    assert status["progress"]["mfu"] > 0 and status["progress"]["mfuFlagperf"] > 0
    assert status["results"]["pretrain"]["mfu"] > 0
