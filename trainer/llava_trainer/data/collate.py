"""Samples → one padded micro-batch in the layout HF `LlavaForConditionalGeneration` takes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .dataset import Sample
from .templates import IGNORE_INDEX


def collate(samples: Sequence[Sample], pad_token_id: int) -> dict[str, Any]:
    """Right-pad to the longest sample: input_ids with the pad id, labels with -100, attention 0.

    pixel_values holds every image of the batch in order of appearance (the order HF scatters
    image features into image-token positions) and is absent when the batch is text-only.
    The counters are what throughput and MFU accounting need: real tokens (image tokens count
    576 each at 336 px), padded tokens and images.
    """
    import torch

    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    lengths = [len(s.input_ids) for s in samples]
    batch, width = len(samples), max(lengths)
    input_ids = np.full((batch, width), pad_token_id, dtype=np.int64)
    labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((batch, width), dtype=np.int64)
    for row, (sample, length) in enumerate(zip(samples, lengths, strict=True)):
        input_ids[row, :length] = sample.input_ids
        labels[row, :length] = sample.labels
        attention_mask[row, :length] = 1
    out: dict[str, Any] = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
    }
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    if pixels:
        out["pixel_values"] = torch.from_numpy(np.ascontiguousarray(np.concatenate(pixels), dtype=np.float32))
    out["num_samples"] = batch
    out["num_real_tokens"] = int(sum(lengths))
    out["num_padded_tokens"] = batch * width
    out["num_images"] = int(sum(len(p) for p in pixels))
    return out
