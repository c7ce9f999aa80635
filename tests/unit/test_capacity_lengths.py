"""Token lengths for the plan: prepare's index read without numpy, and the recipe's estimate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from llava_operator.capacity.lengths import from_arrays, read_index_lengths, read_npz, recipe_lengths


@pytest.mark.parametrize("compress", [False, True])
def test_npz_arrays_read_without_numpy_equal_numpys(tmp_path, compress):
    arrays = {
        "text_tokens": np.array([5, 70000, 3], np.int32),
        "num_images": np.array([1, 0, 2], np.int16),
        "flags": np.array([0, 1, 255], np.uint8),
        "big": np.array([2**40, -1], ">i8"),
    }
    path = tmp_path / "a.npz"
    (np.savez_compressed if compress else np.savez)(path, **arrays)
    read = read_npz(path, tuple(arrays))
    assert read == {name: values.tolist() for name, values in arrays.items()}


def test_the_histogram_keeps_what_the_loader_keeps_cut_at_max_length():
    counts, left_out = from_arrays(
        text_tokens=[10, 10, 500, 40, 300],
        num_images=[1, 1, 0, 1, 1],
        flags=[0, 0, 0, 1, 0],  # the fourth is malformed
        image_end_text=[1, 1, 0, 1, 250],  # the fifth's image ends beyond max_length
        image_tokens=100,
        max_length=300,
    )
    assert counts == {(110, 1): 2, (300, 0): 1}  # the text-only sample is cut at 300
    assert left_out == 2


def test_a_prepare_index_is_read_per_stage(tmp_path):
    np.savez(
        tmp_path / "index-pretrain.npz",
        text_tokens=np.array([7, 9], np.int32),
        num_images=np.array([1, 1], np.int16),
        flags=np.zeros(2, np.uint8),
        image_end_text=np.array([1, 1], np.int32),
    )
    entry = {"arrays": "index-pretrain.npz", "measured": True}
    (tmp_path / "index.json").write_text(json.dumps({"version": 1, "datasets": {"pretrain": entry}}))
    found = read_index_lengths(tmp_path / "index.json", "pretrain", image_tokens=576, max_length=2048)
    assert found.counts == {(583, 1): 1, (585, 1): 1}
    assert found.longest == 585 and "prepare" in found.source
    assert read_index_lengths(tmp_path / "index.json", "finetune", image_tokens=576, max_length=2048) is None
    assert read_index_lengths(tmp_path / "none.json", "pretrain", image_tokens=576, max_length=2048) is None


def test_recipe_lengths_are_stated_as_estimates():
    finetune = recipe_lengths("finetune", image_tokens=576, max_length=2048)
    assert finetune.samples == 665_298 and finetune.longest == 2048
    assert 0.93 < finetune.image_fraction < 0.95
    assert "estimated" in finetune.assumptions[0]
    pretrain = recipe_lengths("pretrain", image_tokens=576, max_length=2048)
    assert pretrain.samples == 558_128 and pretrain.longest == 640
