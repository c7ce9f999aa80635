"""The per-sample index prepare writes and training reuses (config.index_path).

`index.json` holds what was indexed (data file signature, template, tokenizer fingerprint) and
prepare's report; each dataset's per-sample arrays live beside it in `index-<name>.npz` (a few
bytes per sample: 665K samples ≈ 15 MB). Lengths are stored without image tokens, so one index
serves any vision tower: length = text_tokens + num_images * num_image_tokens.

A measured index also keeps every sample's tokens (`index-<name>-tokens.npy`, memory-mapped by the
loader, so DataLoader workers share one page-cached copy): the loader then never tokenizes. One
code per text token plus one per image: the id where the token is trained, `~id` where it is
masked, and the dtype's minimum where an image block goes (expanded to the vision tower's count
at load time). int16 for vocabularies up to 32767 ids (LLaMA/Vicuna + `<image>`, `<pad>`), else int32.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .formats import SOURCES, MalformedRecord, iter_json_array, parse_record, record_source
from .templates import IGNORE_INDEX, TokenizedSample

INDEX_VERSION = 1

FLAG_MALFORMED = 1
FLAG_MISSING_IMAGE = 2
FLAG_CORRUPT_IMAGE = 4
FLAG_MISMATCH = 8
FLAG_NOT_JPG = 16
FLAG_BAD_IMAGE = FLAG_MISSING_IMAGE | FLAG_CORRUPT_IMAGE

ARRAYS = ("offset", "nbytes", "text_tokens", "num_images", "image_end_text", "flags", "source")


@dataclass
class DatasetIndex:
    """Per-sample arrays of one LLaVA JSON file; `measured` says whether lengths are real tokens
    (prepare) or LLaVA's whitespace word-count proxy (a quick scan at start-up)."""

    offset: np.ndarray
    nbytes: np.ndarray
    text_tokens: np.ndarray
    num_images: np.ndarray
    image_end_text: np.ndarray
    """Text tokens before the end of the last image block (image tokens not counted)."""
    flags: np.ndarray
    source: np.ndarray
    measured: bool
    tokens: TokenTable | None = None
    """Every sample's tokens (measured indexes written by prepare), else None."""

    def __len__(self) -> int:
        return len(self.offset)

    def lengths(self, num_image_tokens: int) -> np.ndarray:
        return self.text_tokens.astype(np.int64) + self.num_images.astype(np.int64) * num_image_tokens

    def image_end(self, num_image_tokens: int) -> np.ndarray:
        """Tokens that must fit for the images to be kept whole (0 without images)."""
        end = self.image_end_text.astype(np.int64) + self.num_images.astype(np.int64) * num_image_tokens
        return np.where(self.num_images > 0, end, 0)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAYS}


IMAGE_SLOT_ID = -1
"""The image token id prepare tokenizes with (one token per image): marks where image blocks go."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.int16 if vocab_size <= np.iinfo(np.int16).max else np.int32)


def encode_tokens(tokens: TokenizedSample, dtype: np.dtype) -> np.ndarray:
    """Codes of a sample tokenized with image_token_id=IMAGE_SLOT_ID and one token per image."""
    ids = tokens.input_ids
    codes = np.where(tokens.labels == IGNORE_INDEX, ~ids, ids)
    codes[ids == IMAGE_SLOT_ID] = np.iinfo(dtype).min
    return codes.astype(dtype)


class TokenTable:
    """All samples' token codes (one flat array, memory-mapped) and where each sample's start.

    Picklable and small: a DataLoader worker maps the file itself.
    """

    def __init__(self, path: Path, starts: np.ndarray, codes: np.ndarray | None = None) -> None:
        self.path, self.starts = Path(path), np.asarray(starts, dtype=np.int64)
        self._codes = codes
        self._blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def codes(self) -> np.ndarray:
        if self._codes is None:
            self._codes = np.load(self.path, mmap_mode="r")
        return self._codes

    @cached_property
    def _flat(self) -> tuple[np.ndarray, int]:
        """(the codes as a plain ndarray view: slicing a memmap costs more than decoding, the image
        slot code)."""
        codes = self.codes
        return codes.view(np.ndarray), int(np.iinfo(codes.dtype).min)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getstate__(self) -> dict[str, Any]:
        state = {**self.__dict__, "_codes": None, "_blocks": {}}
        state.pop("_flat", None)
        return state

    def sample(
        self, index: int, *, image_token_id: int, num_image_tokens: int, mismatch: bool = False
    ) -> TokenizedSample:
        """What `tokenize_prompt` gives for this sample, image blocks expanded."""
        flat, slot = self._flat
        codes = flat[self.starts[index] : self.starts[index + 1]].astype(np.int64)
        masked = codes < 0
        ids = np.where(masked, ~codes, codes)
        labels = np.where(masked, IGNORE_INDEX, codes)
        slots = np.flatnonzero(codes == slot)
        if not len(slots):
            return TokenizedSample(ids, labels, 0, 0, mismatch)
        if len(slots) == 1:  # the usual case: splice one image block in
            at = int(slots[0])
            block_ids, block_labels = self._block(image_token_id, num_image_tokens)
            ids = np.concatenate((ids[:at], block_ids, ids[at + 1 :]))
            labels = np.concatenate((labels[:at], block_labels, labels[at + 1 :]))
            return TokenizedSample(ids, labels, 1, at + num_image_tokens, mismatch)
        repeats = np.where(codes == slot, num_image_tokens, 1)
        ids, labels = np.repeat(ids, repeats), np.repeat(labels, repeats)
        ids[np.repeat(codes == slot, repeats)] = image_token_id
        image_end = int(slots[-1]) + len(slots) * num_image_tokens - (len(slots) - 1)
        return TokenizedSample(ids, labels, len(slots), image_end, mismatch)

    def _block(self, image_token_id: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        key = (image_token_id, count)
        if key not in self._blocks:
            self._blocks[key] = (
                np.full(count, image_token_id, np.int64),
                np.full(count, IGNORE_INDEX, np.int64),
            )
        return self._blocks[key]


def empty_arrays(n: int) -> dict[str, np.ndarray]:
    return {
        "offset": np.zeros(n, np.int64),
        "nbytes": np.zeros(n, np.int64),
        "text_tokens": np.zeros(n, np.int32),
        "num_images": np.zeros(n, np.int16),
        "image_end_text": np.zeros(n, np.int32),
        "flags": np.zeros(n, np.uint8),
        "source": np.zeros(n, np.uint8),
    }


def file_signature(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def word_count(turns: Any) -> int:
    """LLaVA's `modality_lengths` proxy: whitespace-separated words over all turns."""
    return sum(len(str(turn.get("value", "")).split()) for turn in turns if isinstance(turn, dict))


def scan_dataset(path: Path, stage: str) -> DatasetIndex:
    """A quick index without a tokenizer: offsets, image counts and word-count lengths."""
    columns: dict[str, list[int]] = {name: [] for name in ARRAYS}
    for offset, nbytes, record in iter_json_array(path):
        flags, images, words, source = 0, 0, 0, SOURCES.index("other")
        try:
            conversation = parse_record(record)
            images, words = len(conversation.images), word_count(record["conversations"])
            source = SOURCES.index(record_source(conversation.images, stage))
        except MalformedRecord:
            flags = FLAG_MALFORMED
        for name, value in zip(ARRAYS, (offset, nbytes, words, images, 0, flags, source), strict=True):
            columns[name].append(value)
    arrays = empty_arrays(len(columns["offset"]))
    for name in ARRAYS:
        arrays[name][:] = columns[name]
    return DatasetIndex(**arrays, measured=False)


def write_index(
    index_path: Path, datasets: dict[str, tuple[DatasetIndex, dict[str, Any]]], meta: dict[str, Any]
) -> None:
    """Write the arrays, then index.json last (atomically), so a reader never sees a half index."""
    index_path.parent.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, (index, info) in datasets.items():
        arrays_file = f"index-{name}.npz"
        arrays = index.arrays()
        entries[name] = {**info, "arrays": arrays_file, "records": len(index), "measured": index.measured}
        if index.tokens is not None:
            tokens_file = f"index-{name}-tokens.npy"
            codes = index.tokens.codes
            _atomic_write(index_path.parent / tokens_file, lambda f, codes=codes: np.save(f, codes))
            arrays["token_start"] = index.tokens.starts
            entries[name]["tokens"] = tokens_file
        _atomic_write(index_path.parent / arrays_file, lambda f, arrays=arrays: np.savez(f, **arrays))
    body = {"version": INDEX_VERSION, **meta, "datasets": entries}
    _atomic_write(index_path, lambda f: f.write(json.dumps(body, indent=2, sort_keys=False).encode()))


def _atomic_write(path: Path, write: Any) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        write(f)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)
    os.replace(f.name, path)


def load_index(
    index_path: Path, data_path: Path, *, template: str, tokenizer_fingerprint: str
) -> tuple[DatasetIndex | None, str]:
    """The index of `data_path` if prepare's index matches it, else (None, why not)."""
    try:
        body = json.loads(index_path.read_text())
    except FileNotFoundError:
        return None, f"no index at {index_path}"
    except (OSError, ValueError) as err:
        return None, f"unreadable index {index_path}: {err}"
    if body.get("version") != INDEX_VERSION:
        return None, f"index version {body.get('version')} != {INDEX_VERSION}"
    entry = next(
        (e for e in body.get("datasets", {}).values() if Path(e.get("path", "")) == data_path.resolve()), None
    )
    if entry is None:
        return None, f"{data_path} is not in the index"
    if entry.get("signature") != file_signature(data_path):
        return None, f"{data_path} changed since it was indexed"
    # Word-count indexes (prepare --measure-lengths false) hold no template- or tokenizer-specific values.
    if entry.get("measured") and entry.get("template") != template:
        return None, f"indexed with template {entry.get('template')!r}, training uses {template!r}"
    if entry.get("measured") and entry.get("tokenizer") != tokenizer_fingerprint:
        return None, "indexed with a different tokenizer"
    try:
        with np.load(index_path.parent / entry["arrays"]) as arrays:
            index = DatasetIndex(
                **{name: arrays[name] for name in ARRAYS}, measured=bool(entry.get("measured"))
            )
            if entry.get("measured") and entry.get("tokens") and "token_start" in arrays:
                index.tokens = TokenTable(index_path.parent / entry["tokens"], arrays["token_start"])
        if index.tokens is not None and len(index.tokens.codes) != index.tokens.starts[-1]:
            raise ValueError(f"{entry['tokens']} does not match {entry['arrays']}")
    except (OSError, KeyError, ValueError) as err:
        return None, f"unreadable index arrays: {err}"
    return index, "ok"
