"""Readers for the real data formats: LLaVA JSON arrays and MMMU parquet.

The LLaVA JSON files are one big array (558K / 665K records, up to ~1 GB). Parsed into Python
dicts they would cost gigabytes in every DataLoader worker, so they are read as an *offset index*:
one streaming pass records where each element starts and how many bytes it has (two integer
arrays), and a record is parsed on demand with one seek + `json.loads`.
"""

from __future__ import annotations

import ast
import codecs
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from llava_operator.api.mmmu import SUBJECTS

from ..tokenizer import IMAGE_TOKEN
from .templates import ROLES

FINETUNE_IMAGE_DIRS: tuple[str, ...] = (
    "coco/train2017",
    "gqa/images",
    "ocr_vqa/images",
    "textvqa/train_images",
    "vg/VG_100K",
    "vg/VG_100K_2",
)
"""Image directories of llava_v1_5_mix665k.json under LLaVA-Finetune/data (the case's layout)."""
FINETUNE_SOURCES: tuple[str, ...] = ("coco", "gqa", "ocr_vqa", "textvqa", "vg")
SOURCES: tuple[str, ...] = ("pretrain", *FINETUNE_SOURCES, "text_only", "other")
"""Sample sources counted by prepare (index codes are positions in this tuple)."""
MAX_RECORD_BYTES = 64 << 20
"""A single JSON element larger than this is treated as a format error, not read ahead."""

_WHITESPACE = re.compile(r"[ \t\n\r]*")


class MalformedRecord(ValueError):
    """A record that does not follow the LLaVA conversation format (the reason says how)."""


@dataclass(frozen=True)
class Conversation:
    """One LLaVA record: `{"id", "image"?, "conversations": [{"from", "value"}, ...]}`."""

    id: str
    images: tuple[str, ...]
    turns: tuple[tuple[str, str], ...]
    """(role, text) with role "human" or "gpt", in file order."""


def checked_image_path(relative: str) -> str:
    """`relative` if it names a file inside an image folder; else MalformedRecord saying why.

    Lexical on purpose: image folders may be symlinks to other storage, but a path in the data
    never reaches outside them (`../../etc/passwd`, `/etc/passwd`).
    """
    problem = None
    if "\0" in relative:
        problem = "contains a NUL byte"
    elif os.path.isabs(relative):
        problem = "is absolute"
    else:
        normal = os.path.normpath(relative)
        if normal == os.pardir or normal.startswith(os.pardir + os.sep):
            problem = "leaves the image folder"
    if problem:
        raise MalformedRecord(
            f"image path {relative!r} {problem}; image paths are relative to the stage's image folder "
            "and stay inside it"
        )
    return relative


def image_file(image_root: str | Path, relative: str) -> Path:
    """The file of a record's image: the one place image paths are resolved (prepare, training,
    inspect). Raises MalformedRecord for a path that would leave `image_root`."""
    return Path(image_root, checked_image_path(relative))


def _check_image_tags(turns: list[tuple[str, str]], images: tuple[str, ...]) -> None:
    """One `<image>` tag per image, the first in the first human turn: otherwise LLaVA's
    preprocessing silently trains something else (the image dropped, or a tag with no image)."""
    tags = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if not images:
        if tags:
            raise MalformedRecord(f"{tags} {IMAGE_TOKEN} tag(s) in a text-only record (no 'image' field)")
        return
    first_human = next((text for role, text in turns if role == "human"), "")
    if IMAGE_TOKEN not in first_human:
        raise MalformedRecord(
            f"'image' is set but the first human turn has no {IMAGE_TOKEN} tag; the image would not be seen"
        )
    if tags != len(images):
        raise MalformedRecord(f"{tags} {IMAGE_TOKEN} tags for {len(images)} image(s); one tag per image")


def parse_record(record: Any) -> Conversation:
    """Validate a decoded JSON element; raises MalformedRecord naming what is wrong."""
    if not isinstance(record, dict):
        raise MalformedRecord(f"expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise MalformedRecord("'conversations' must be a non-empty list")
    parsed = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise MalformedRecord(f"conversations[{i}] needs a string 'value'")
        if turn.get("from") not in ROLES:
            raise MalformedRecord(
                f"conversations[{i}].from is {turn.get('from')!r}, expected one of {list(ROLES)}"
            )
        parsed.append((turn["from"], turn["value"]))
    image = record.get("image")
    images: tuple[str, ...]
    if image is None:
        images = ()
    elif isinstance(image, str) and image:
        images = (image,)
    elif isinstance(image, list) and image and all(isinstance(i, str) and i for i in image):
        images = tuple(image)
    else:
        raise MalformedRecord(f"'image' must be a relative path, got {image!r}")
    images = tuple(checked_image_path(path) for path in images)
    _check_image_tags(parsed, images)
    return Conversation(str(record.get("id", "")), images, tuple(parsed))


def record_source(images: tuple[str, ...], stage: str) -> str:
    """Which source a sample counts under: pretrain, a mix665k image set, or text_only."""
    if not images:
        return "text_only"
    if stage == "pretrain":
        return "pretrain"
    top = images[0].split("/", 1)[0]
    return top if top in FINETUNE_SOURCES else "other"


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def iter_json_array(path: str | Path, *, chunk_chars: int = 1 << 22) -> Iterator[tuple[int, int, Any]]:
    """Stream a top-level JSON array: yields (byte offset, byte length, element) per element.

    Only a few MB of text are held at a time; `json.loads(file[offset:offset + length])`
    gives the element back. Raises ValueError naming the file and byte position on bad JSON.
    """
    path = Path(path)
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        buf, pos, cursor, eof = "", 0, 0, False  # cursor: byte offset of buf[pos]

        def fill() -> None:
            nonlocal buf, pos, eof
            data = f.read(chunk_chars)
            buf = buf[pos:] + utf8.decode(data, final=not data)
            pos, eof = 0, not data

        def skip_whitespace() -> str:
            nonlocal pos, cursor
            while True:
                end = _WHITESPACE.match(buf, pos).end()
                cursor += end - pos
                pos = end
                if pos < len(buf):
                    return buf[pos]
                if eof:
                    return ""
                fill()

        def fail(message: str) -> ValueError:
            return ValueError(f"{path}: invalid JSON array at byte {cursor}: {message}")

        fill()
        if skip_whitespace() != "[":
            raise fail("expected '[' (a JSON array of records)")
        pos, cursor = pos + 1, cursor + 1
        expect_value = True
        first = True
        while True:
            char = skip_whitespace()
            if char == "]" and (first or not expect_value):
                pos, cursor = pos + 1, cursor + 1
                if skip_whitespace():
                    raise fail("data after the end of the array")
                return
            if not expect_value:
                if char != ",":
                    raise fail(f"expected ',' or ']', found {char!r}" if char else "unexpected end of file")
                pos, cursor, expect_value = pos + 1, cursor + 1, True
                continue
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as err:
                    if eof or len(buf) - pos > MAX_RECORD_BYTES:
                        raise fail(err.msg) from None
                fill()
            size = _utf8_len(buf[pos:end])
            yield cursor, size, value
            pos, cursor = end, cursor + size
            expect_value, first = False, False


class JsonRecords:
    """Random access to the elements of a JSON array by (offset, length), one open file per process.

    Picklable (the handle is reopened in each DataLoader worker), and small: two int arrays.
    """

    def __init__(self, path: str | Path, offsets: np.ndarray, lengths: np.ndarray) -> None:
        self.path = Path(path)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self._file: BinaryIO | None = None
        self._pid = -1

    @classmethod
    def scan(cls, path: str | Path) -> JsonRecords:
        offsets, lengths = [], []
        for offset, length, _ in iter_json_array(path):
            offsets.append(offset)
            lengths.append(length)
        return cls(path, np.array(offsets), np.array(lengths))

    def __len__(self) -> int:
        return len(self.offsets)

    def raw(self, index: int) -> bytes:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115 (kept open)
        self._file.seek(int(self.offsets[index]))
        return self._file.read(int(self.lengths[index]))

    def __getitem__(self, index: int) -> Any:
        return json.loads(self.raw(index))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": -1}


# ---------------------------------------------------------------------------------------------
# MMMU

MMMU_COLUMNS: tuple[str, ...] = (
    "id",
    "question",
    "options",
    "explanation",
    *(f"image_{i}" for i in range(1, 8)),
    "img_type",
    "answer",
    "topic_difficulty",
    "question_type",
    "subfield",
)
MMMU_IMAGE_COLUMNS: tuple[str, ...] = tuple(f"image_{i}" for i in range(1, 8))


@dataclass(frozen=True)
class MMMUQuestion:
    id: str
    subject: str
    question: str
    options: list[str]
    """Parsed from the string column (a Python list literal); [] for open questions."""
    answer: str
    question_type: str
    """"multiple-choice" or "open"."""
    images: list[bytes | None] = field(default_factory=list)
    """image_1..image_7 as encoded bytes (None where the column is null)."""
    explanation: str = ""
    img_type: str = ""
    topic_difficulty: str = ""
    subfield: str = ""


def mmmu_files(mmmu_dir: str | Path, split: str) -> dict[str, Path]:
    """subject -> parquet file of that split, for the subjects present (`<Subject>/<split>-*.parquet`)."""
    root = Path(mmmu_dir)
    found = {}
    for subject in SUBJECTS:
        files = sorted((root / subject).glob(f"{split}-*.parquet"))
        if files:
            found[subject] = files[0]
    return found


def parse_options(text: str | None, question_id: str) -> list[str]:
    """MMMU stores options as a string holding a Python list, e.g. "['1', '2']"."""
    if not text:
        return []
    try:
        options = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"MMMU {question_id}: options {text[:80]!r} is not a Python list: {err}") from None
    if not isinstance(options, list):
        raise ValueError(f"MMMU {question_id}: options {text[:80]!r} is not a list")
    return [str(o) for o in options]


def read_mmmu(path: str | Path, *, images: bool = True) -> list[MMMUQuestion]:
    """All questions of one subject/split parquet file; `images=False` skips the image bytes."""
    import pyarrow.parquet as pq

    path = Path(path)
    schema = pq.read_schema(path)
    missing = [c for c in MMMU_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: not an MMMU parquet file, missing columns {missing}")
    columns = [c for c in MMMU_COLUMNS if images or c not in MMMU_IMAGE_COLUMNS]
    rows = pq.read_table(path, columns=columns).to_pylist()
    subject = path.parent.name
    questions = []
    for row in rows:
        qid = str(row["id"])
        pictures = []
        if images:
            for column in MMMU_IMAGE_COLUMNS:
                cell = row[column]
                pictures.append(cell.get("bytes") if isinstance(cell, dict) else None)
        questions.append(
            MMMUQuestion(
                id=qid,
                subject=subject,
                question=row["question"] or "",
                options=parse_options(row["options"], qid),
                answer=str(row["answer"] or ""),
                question_type=row["question_type"] or "",
                images=pictures,
                explanation=row["explanation"] or "",
                img_type=row["img_type"] or "",
                topic_difficulty=row["topic_difficulty"] or "",
                subfield=row["subfield"] or "",
            )
        )
    return questions
