"""One peak table (llava_operator.api.profiles) serves the profile defaults, the trainer's lookup by
device name and the flags the operator renders."""

from __future__ import annotations

import pytest
from llava_operator.api import PROFILES, AcceleratorProfileName, LlavaRun, Stage
from llava_operator.api.profiles import DEVICES, device_peak_tflops, known_device
from llava_operator.trainer_command import stage_config, stage_env

from tests.helpers import EXAMPLES, load_yaml


@pytest.mark.parametrize(
    ("device_name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H800", 989.4),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA H20", 148.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A800-SXM4-80GB", 312.0),
        ("AMD Instinct MI300X", 1307.4),
        ("AMD Instinct MI250X/MI250", 383.0),
        ("Some Future Accelerator", None),
        ("cpu", None),
    ],
)
def test_devices_are_recognised_by_the_name_torch_reports(device_name: str, peak: float | None) -> None:
    device = known_device(device_name)
    assert (device.peak_tflops if device else None) == peak


def test_every_accelerator_profile_but_cpu_has_a_default_peak() -> None:
    for name, profile in PROFILES.items():
        if name is AcceleratorProfileName.CPU:
            assert profile.peak_tflops is None  # a CPU's peak depends on the machine: state it
        else:
            assert profile.peak_tflops and profile.peak_tflops > 0, name
    # The defaults are rows of the device table, not numbers of their own.
    nvidia, amd = AcceleratorProfileName.NVIDIA, AcceleratorProfileName.AMD
    assert PROFILES[nvidia].peak_tflops == known_device("NVIDIA H100 80GB HBM3").peak_tflops
    assert PROFILES[amd].peak_tflops == known_device("AMD Instinct MI300X").peak_tflops
    assert set(DEVICES) <= set(AcceleratorProfileName)


def test_the_device_row_beats_the_profile_default_which_beats_nothing() -> None:
    nvidia, amd, cpu = (AcceleratorProfileName(n) for n in ("nvidia", "amd", "cpu"))
    assert device_peak_tflops(nvidia, "NVIDIA A100-SXM4-80GB")[0] == 312.0
    peak, source = device_peak_tflops(nvidia, "NVIDIA L4")
    assert peak == PROFILES[nvidia].peak_tflops and "profile nvidia default" in source
    assert device_peak_tflops(amd, "cpu")[0] == PROFILES[amd].peak_tflops
    assert (
        device_peak_tflops("ascend", "Ascend910B3")[0] == PROFILES[AcceleratorProfileName.ASCEND].peak_tflops
    )
    assert device_peak_tflops(cpu, "cpu")[0] is None
    assert device_peak_tflops(None, "cpu")[0] is None


def tiny_run(**accelerator: object) -> LlavaRun:
    doc = load_yaml(next(p for p in EXAMPLES if "tiny" in p.name))
    doc["spec"]["accelerator"] = accelerator
    return LlavaRun.model_validate(doc)


@pytest.mark.parametrize("profile", list(AcceleratorProfileName))
def test_every_training_stage_gets_the_profile_and_only_a_stated_peak(
    profile: AcceleratorProfileName,
) -> None:
    for stage in (Stage.PRETRAIN, Stage.FINETUNE):
        config = stage_config(tiny_run(profile=profile.value).spec, stage)
        assert (config.accelerator, config.peak_tflops) == (profile, 0.0)
        stated = stage_config(tiny_run(profile=profile.value, peakTflops=123.5).spec, stage)
        assert (stated.accelerator, stated.peak_tflops) == (profile, 123.5)
    # The flags carry the peak; the environment no longer repeats it.
    env = stage_env(tiny_run(profile=profile.value, peakTflops=123.5).spec, "run", Stage.PRETRAIN, 0)
    assert "LLAVARUN_PEAK_TFLOPS" not in env
