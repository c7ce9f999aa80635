"""Accelerator profiles: what differs between vendors when a stage asks for accelerators.

The seed benchmark is run by many chip vendors, so the accelerator is data, not a constant.
Only NVIDIA can be exercised here; the others must at least render correctly.

This module is also the one table of peak TFLOP/s (the MFU denominator) and device memory (what
`llavarun plan` fits a stage into): the operator passes the
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
    """An accelerator model, recognised by the name torch reports for it: its peak and memory."""

    model: str
    name_parts: tuple[str, ...]
    """Every part must occur in the upper-cased device name ("NVIDIA H100 PCIe" has H100 and PCIE)."""
    peak_tflops: float
    """Dense bf16 TFLOP/s from the vendor's datasheet (half the "with sparsity" figure)."""
    memory_gib: float
    """Memory per device as torch reports it (total_memory, GiB; a little under the marketed GB),
    the capacity `llavarun plan` fits a stage into. Like the peak, per package (an MI250X package,
    which torch shows as two devices, counts once)."""

    def matches(self, device_name: str) -> bool:
        name = device_name.upper()
        return all(part in name for part in self.name_parts)


H100_SXM = Device("H100 SXM 80GB", ("H100",), 989.4, 79.1)
MI300X = Device("MI300X 192GB", ("MI300X",), 1307.4, 192.0)

DEVICES: dict[AcceleratorProfileName, tuple[Device, ...]] = {
    # Most specific first: the first device whose parts all match wins (H100 PCIe before H100,
    # H200 before H20, A100 80GB before A100).
    AcceleratorProfileName.NVIDIA: (
        Device("H100 PCIe 80GB", ("H100", "PCIE"), 756.0, 79.1),
        Device("H100 NVL 94GB", ("H100", "NVL"), 835.0, 93.1),
        H100_SXM,  # "NVIDIA H100 80GB HBM3"
        Device("H800 PCIe 80GB", ("H800", "PCIE"), 756.0, 79.1),
        Device("H800 SXM 80GB", ("H800",), 989.4, 79.1),
        Device("H200 NVL 141GB", ("H200", "NVL"), 835.0, 139.8),
        Device("H200 SXM / GH200 141GB", ("H200",), 989.4, 139.8),
        Device("H20 96GB", ("H20",), 148.0, 95.0),
        Device("B200 180GB", ("B200",), 2250.0, 178.4),
        Device("A100 80GB", ("A100", "80GB"), 312.0, 79.2),  # SXM and PCIe alike
        Device("A100 40GB", ("A100",), 312.0, 39.4),
        Device("A800 80GB", ("A800", "80GB"), 312.0, 79.2),
        Device("A800 40GB", ("A800",), 312.0, 39.4),
        Device("L40S 48GB", ("L40S",), 362.05, 44.4),
    ),
    AcceleratorProfileName.AMD: (
        Device("MI325X 256GB", ("MI325X",), 1307.4, 256.0),
        MI300X,
        Device("MI300A 128GB", ("MI300A",), 980.6, 128.0),
        Device("MI250X 128GB", ("MI250X",), 383.0, 128.0),
        Device("MI250 128GB", ("MI250",), 362.1, 128.0),
        Device("MI210 64GB", ("MI210",), 181.0, 64.0),
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


DEFAULT_DEVICES: dict[AcceleratorProfileName, Device] = {
    AcceleratorProfileName.NVIDIA: H100_SXM,
    AcceleratorProfileName.AMD: MI300X,
}
"""The device a profile's default peak comes from: what `llavarun plan` assumes when the run names
no device (placement node labels) and none is given."""


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
