"""Training data: real LLaVA/MMMU formats, templates and masking, images, batching.

Modules: `formats` (readers), `templates` (plain / vicuna_v1 + masks), `images` (expand2square,
CLIP preprocessing), `dataset` (`build_sample`), `sampler` (modality-length grouping, sharding),
`collate` (padding), `index` (prepare's per-sample index), `loader` (`build_train_loader`, the
contract with the training loop). Names are re-exported lazily so that importing a light module
(e.g. from `prepare`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_train_loader": "loader",
    "TrainLoader": "loader",
    "DataStats": "loader",
    "build_sample": "dataset",
    "Sample": "dataset",
    "collate": "collate",
    "ImagePipeline": "images",
    "ImageError": "images",
    "SkipSample": "templates",
    "read_mmmu": "formats",
    "mmmu_files": "formats",
    "MMMUQuestion": "formats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
