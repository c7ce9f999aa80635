"""How long the samples are: from prepare's index when there is one, else the recipe's typical
lengths (an assumption the plan states).

A stage's samples as a histogram {(real tokens, images): count}, image tokens included, each
sample cut at the stage's max length as the trainer cuts it. Reading prepare's index needs no
numpy: `index-<stage>.npz` is a zip of `.npy` arrays (numpy's documented format), read here with
the standard library so `llavarun plan` runs where only the operator's dependencies are.
"""

from __future__ import annotations

import ast
import json
import struct
import sys
import zipfile
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

FLAG_MALFORMED = 1
"""index.py's FLAG_MALFORMED: a record the loader skips (a trainer-tier test checks they agree)."""


@dataclass(frozen=True)
class TokenLengths:
    """A stage's samples: {(real tokens after truncation, images): count} and where it came from."""

    counts: dict[tuple[int, int], int]
    source: str
    assumptions: list[str] = field(default_factory=list)
    longest_tokens: int | None = None
    """The longest sample when the histogram does not hold it (the recipe's estimate)."""

    @property
    def samples(self) -> int:
        return sum(self.counts.values())

    @property
    def longest(self) -> int:
        return max([tokens for tokens, _ in self.counts] + [self.longest_tokens or 0])

    @property
    def mean_tokens(self) -> float:
        return sum(t * n for (t, _), n in self.counts.items()) / max(self.samples, 1)

    @property
    def image_fraction(self) -> float:
        return sum(n for (_, i), n in self.counts.items() if i) / max(self.samples, 1)


RECIPE_SAMPLES = {
    "pretrain": {(20, 1): 558_128},
    "finetune": {(300, 1): 624_610, (1000, 0): 40_688},
}
"""The recipe's data without an index: LAION-CC-SBU 558K (one image and a short caption each,
about 20 text tokens with the plain template) and llava_v1_5_mix665k (624,610 samples with one
image and about 300 text tokens over their rounds, 40,688 text-only ShareGPT conversations of
about 1,000 tokens). Estimates: `prepare` measures the real ones."""
RECIPE_LONGEST_TEXT = {"pretrain": 64}
"""Longest caption assumed for pretrain's activations (captions are short); finetune's longest
samples reach the max length."""


def recipe_lengths(stage: str, *, image_tokens: int, max_length: int) -> TokenLengths:
    counts: Counter[tuple[int, int]] = Counter()
    for (text, images), n in RECIPE_SAMPLES[stage].items():
        counts[(min(text + images * image_tokens, max_length), images)] += n
    longest = RECIPE_LONGEST_TEXT.get(stage)
    longest_tokens = max_length if longest is None else min(longest + image_tokens, max_length)
    mean = sum(t * n for (t, _), n in counts.items()) / sum(counts.values())
    text = ", ".join(f"{n:,} x {t} tokens ({i} image)" for (t, i), n in sorted(counts.items()))
    return TokenLengths(
        dict(counts),
        "the recipe's typical lengths (no prepare index)",
        [
            f"{stage} data: {text}; mean {mean:.0f} real tokens per sample, longest {longest_tokens} "
            "(estimated; run prepare to measure)"
        ],
        longest_tokens,
    )


def from_arrays(
    text_tokens: list[int],
    num_images: list[int],
    flags: list[int],
    image_end_text: list[int],
    *,
    image_tokens: int,
    max_length: int,
) -> tuple[Counter[tuple[int, int]], int]:
    """The histogram of the samples the loader keeps (not malformed, images whole within the max
    length), each cut at the max length; and how many were left out."""
    counts: Counter[tuple[int, int]] = Counter()
    left_out = 0
    for text, images, flag, end in zip(text_tokens, num_images, flags, image_end_text, strict=True):
        if flag & FLAG_MALFORMED or (images and end + images * image_tokens > max_length):
            left_out += 1
            continue
        counts[(min(text + images * image_tokens, max_length), images)] += 1
    return counts, left_out


def read_index_lengths(
    index_file: Path, stage: str, *, image_tokens: int, max_length: int
) -> TokenLengths | None:
    """The edge: prepare's index of `stage`'s data (None when there is none for that stage)."""
    try:
        body = json.loads(index_file.read_text())
    except FileNotFoundError:
        return None
    entry = body.get("datasets", {}).get(stage)
    if not entry or not entry.get("measured"):
        return None
    arrays = read_npz(
        index_file.parent / entry["arrays"], ("text_tokens", "num_images", "flags", "image_end_text")
    )
    counts, left_out = from_arrays(
        arrays["text_tokens"],
        arrays["num_images"],
        arrays["flags"],
        arrays["image_end_text"],
        image_tokens=image_tokens,
        max_length=max_length,
    )
    notes = [f"{stage} data: {sum(counts.values()):,} samples measured by prepare ({index_file})"]
    if left_out:
        notes.append(
            f"{left_out:,} {stage} samples the loader skips (malformed, or image beyond the max length)"
        )
    return TokenLengths(dict(counts), f"prepare's index ({index_file})", notes)


_TYPECODES = {"i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "i8": "q", "u8": "Q"}


def read_npz(path: Path, names: tuple[str, ...]) -> dict[str, list[int]]:
    """Named 1-D integer arrays of an uncompressed or deflated `.npz` (numpy's `.npy` v1-v3)."""
    out = {}
    with zipfile.ZipFile(path) as archive:
        for name in names:
            out[name] = _read_npy(archive.read(f"{name}.npy"), f"{path}:{name}")
    return out


def _read_npy(data: bytes, where: str) -> list[int]:
    if data[:6] != b"\x93NUMPY":
        raise ValueError(f"{where}: not a .npy array")
    major = data[6]
    size_format, start = ("<H", 10) if major == 1 else ("<I", 12)
    (header_len,) = struct.unpack(size_format, data[8:start])
    header = ast.literal_eval(data[start : start + header_len].decode("latin1"))
    descr, shape = header["descr"], header["shape"]
    kind = descr[1:]
    if kind not in _TYPECODES or len(shape) != 1 or header.get("fortran_order"):
        raise ValueError(f"{where}: unsupported array {descr} {shape}")
    values = array(_TYPECODES[kind])
    if values.itemsize != int(kind[1:]):
        raise ValueError(f"{where}: {descr} has no same-size C type here")
    values.frombytes(data[start + header_len : start + header_len + shape[0] * values.itemsize])
    if (descr[0] == ">") != (sys.byteorder == "big") and descr[0] != "|":
        values.byteswap()
    return values.tolist()
