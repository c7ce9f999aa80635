"""Accelerator profiles: what differs between vendors when a stage asks for accelerators.

The seed benchmark is run by many chip vendors, so the accelerator is data, not a constant.
Only NVIDIA can be exercised here; the others must at least render correctly.
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
class AcceleratorProfile:
    """Defaults a profile supplies; every one of them can be overridden in the LlavaRun."""

    resource_name: str | None
    """Extended resource the device plugin advertises; None for CPU-only runs."""
    taint_key: str | None
    """Key of the taint GPU node pools usually carry; a toleration for it is always rendered."""
    backend: str
    """torch.distributed backend."""
    peak_tflops: float
    """Dense bf16 peak per device, the MFU denominator."""
    env: dict[str, str] = field(default_factory=dict)


PROFILES: dict[AcceleratorProfileName, AcceleratorProfile] = {
    AcceleratorProfileName.NVIDIA: AcceleratorProfile("nvidia.com/gpu", "nvidia.com/gpu", "nccl", 989.4),
    AcceleratorProfileName.AMD: AcceleratorProfile("amd.com/gpu", "amd.com/gpu", "nccl", 1307.4),
    AcceleratorProfileName.ASCEND: AcceleratorProfile(
        "huawei.com/Ascend910", "huawei.com/Ascend910", "hccl", 304.277
    ),
    AcceleratorProfileName.ILUVATAR: AcceleratorProfile("iluvatar.ai/gpu", "iluvatar.ai/gpu", "nccl", 192.0),
    AcceleratorProfileName.CAMBRICON: AcceleratorProfile(
        "cambricon.com/mlu", "cambricon.com/mlu", "cncl", 256.0
    ),
    AcceleratorProfileName.CPU: AcceleratorProfile(None, None, "gloo", 1.0, {"CUDA_VISIBLE_DEVICES": ""}),
}
