"""Accelerator profiles: what differs between vendors when a stage asks for accelerators.

The seed benchmark is run by many chip vendors, so the accelerator is data, not a constant.
Only NVIDIA can be exercised here; the others must at least render correctly.

This module is also the one table of peak TFLOP/s (the MFU denominator): the operator passes the
run's profile to the trainer, and the trainer looks up the device it runs on here, falling back to
the profile's default. Plain Python (no pydantic, no torch): bench/gpu_step.py loads it by path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class AcceleratorProfileName(StrEnum):
    NVIDIA = "nvidia"
    AMD = "amd"
    ASCEND = "ascend"
    ILUVATAR = "iluvatar"
    CAMBRICON = "cambricon"
    CPU = "cpu"


@dataclass(frozen=True)
class Device:
    """An accelerator model, recognised by the name torch reports for it, and its peak."""

    model: str
    name_parts: tuple[str, ...]
    """Every part must occur in the upper-cased device name ("NVIDIA H100 PCIe" has H100 and PCIE)."""
    peak_tflops: float
    """Dense bf16 TFLOP/s from the vendor's datasheet (half the "with sparsity" figure)."""

    def matches(self, device_name: str) -> bool:
        name = device_name.upper()
        return all(part in name for part in self.name_parts)


H100_SXM = Device("H100 SXM", ("H100",), 989.4)
MI300X = Device("MI300X", ("MI300X",), 1307.4)

DEVICES: dict[AcceleratorProfileName, tuple[Device, ...]] = {
    # Most specific first: the first device whose parts all match wins (H100 PCIe before H100,
    # H200 before H20).
    AcceleratorProfileName.NVIDIA: (
        Device("H100 PCIe", ("H100", "PCIE"), 756.0),
        Device("H100 NVL", ("H100", "NVL"), 835.0),
        H100_SXM,  # "NVIDIA H100 80GB HBM3"
        Device("H800 PCIe", ("H800", "PCIE"), 756.0),
        Device("H800 SXM", ("H800",), 989.4),
        Device("H200 NVL", ("H200", "NVL"), 835.0),
        Device("H200 SXM / GH200", ("H200",), 989.4),
        Device("H20", ("H20",), 148.0),
        Device("B200", ("B200",), 2250.0),
        Device("A100", ("A100",), 312.0),  # SXM and PCIe alike
        Device("A800", ("A800",), 312.0),
        Device("L40S", ("L40S",), 362.05),
    ),
    AcceleratorProfileName.AMD: (
        Device("MI325X", ("MI325X",), 1307.4),
        MI300X,
        Device("MI300A", ("MI300A",), 980.6),
        Device("MI250X", ("MI250X",), 383.0),
        Device("MI250", ("MI250",), 362.1),
        Device("MI210", ("MI210",), 181.0),
    ),
}
"""Devices whose name identifies their peak; profiles without rows use their default only."""


@dataclass(frozen=True)
class AcceleratorProfile:
    """Defaults a profile supplies; every one of them can be overridden in the LlavaRun."""

    resource_name: str | None
    """Extended resource the device plugin advertises; None for CPU-only runs."""
    taint_key: str | None
    """Key of the taint GPU node pools usually carry; a toleration for it is always rendered."""
    backend: str
    """torch.distributed backend."""
    peak_tflops: float | None
    """Dense bf16 peak per device when the device is not in DEVICES; None: no honest default
    exists (a CPU's peak depends on the machine), so MFU needs a stated peak."""
    env: dict[str, str] = field(default_factory=dict)


PROFILES: dict[AcceleratorProfileName, AcceleratorProfile] = {
    AcceleratorProfileName.NVIDIA: AcceleratorProfile(
        "nvidia.com/gpu", "nvidia.com/gpu", "nccl", H100_SXM.peak_tflops
    ),
    AcceleratorProfileName.AMD: AcceleratorProfile("amd.com/gpu", "amd.com/gpu", "nccl", MI300X.peak_tflops),
    AcceleratorProfileName.ASCEND: AcceleratorProfile(
        "huawei.com/Ascend910", "huawei.com/Ascend910", "hccl", 304.277
    ),
    AcceleratorProfileName.ILUVATAR: AcceleratorProfile("iluvatar.ai/gpu", "iluvatar.ai/gpu", "nccl", 192.0),
    AcceleratorProfileName.CAMBRICON: AcceleratorProfile(
        "cambricon.com/mlu", "cambricon.com/mlu", "cncl", 256.0
    ),
    AcceleratorProfileName.CPU: AcceleratorProfile(None, None, "gloo", None, {"CUDA_VISIBLE_DEVICES": ""}),
}


def known_device(device_name: str) -> Device | None:
    """The table's row for a device name as torch reports it, of any vendor; None if unknown."""
    for devices in DEVICES.values():
        for device in devices:
            if device.matches(device_name):
                return device
    return None


def device_peak_tflops(profile: AcceleratorProfileName | None, device_name: str) -> tuple[float | None, str]:
    """The per-device peak for MFU when none is stated, and where it came from: the device's own
    row (so an A100 under the nvidia profile counts 312, not the H100's 989.4), else the profile's
    default, else None."""
    device = known_device(device_name)
    if device is not None:
        return device.peak_tflops, f"device table: {device.model} ({device_name})"
    if profile is None:
        return None, f"unknown device {device_name!r} and no accelerator profile"
    default = PROFILES[AcceleratorProfileName(profile)].peak_tflops
    if default is None:
        return None, f"profile {profile} has no default peak; state one (accelerator.peakTflops)"
    return default, f"profile {profile} default ({device_name!r} is not in the device table)"
