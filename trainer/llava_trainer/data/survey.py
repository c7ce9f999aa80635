"""What prepare learns about a data_dir, record by record (worker processes) and file by file.

Each training JSON is read by offset in chunks; a worker validates each record, measures its real
token length with the stage's template, and checks its images (cached per process, since COCO
images are shared by several instruction sets). The results become the per-sample index.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
from llava_operator.api.mmmu import SUBJECTS

from .dataset import tokenize_record
from .formats import SOURCES, JsonRecords, image_file, mmmu_files, parse_record, read_mmmu, record_source
from .images import ImageError, check_image
from .index import (
    FLAG_CORRUPT_IMAGE,
    FLAG_MALFORMED,
    FLAG_MISMATCH,
    FLAG_MISSING_IMAGE,
    FLAG_NOT_JPG,
    IMAGE_SLOT_ID,
    DatasetIndex,
    TokenTable,
    empty_arrays,
    encode_tokens,
    token_dtype,
    word_count,
)
from .templates import SkipSample, render

CHUNK_RECORDS = 2048
MMMU_SPLITS = ("dev", "validation", "test")


@dataclass
class DatasetReport:
    index: DatasetIndex
    sources: Counter[str] = field(default_factory=Counter)
    malformed: list[str] = field(default_factory=list)
    missing: set[str] = field(default_factory=set)
    corrupt: dict[str, str] = field(default_factory=dict)
    """Image path -> why training cannot use it: "corrupt: ..." or "too large: WxH ..."."""
    not_jpg: set[str] = field(default_factory=set)
    mismatches: int = 0


_WORKER: dict[str, Any] = {}


def _init_worker(language_model: str | None, check_images: str, measure: bool) -> None:
    """A worker's state: the tokenizer (inherited through fork, else loaded) and an image cache."""
    if not measure:
        _WORKER.pop("tokenizer", None)
    elif "tokenizer" not in _WORKER:
        from ..tokenizer import load_tokenizer

        _WORKER["tokenizer"] = load_tokenizer(language_model)
    _WORKER.update(language_model=language_model, check_images=check_images, images={})


def _check_path(image_root: Path, relative: str) -> tuple[ImageError | None, bool]:
    """(what training would raise, breaks the OCR-VQA .jpg rule) for one referenced image (a path
    parse_record accepted), cached per process."""
    cache = _WORKER["images"]
    if relative not in cache:
        path, mode = image_file(image_root, relative), _WORKER["check_images"]
        problem: ImageError | None
        if mode == "none":
            problem, fmt = None, None
        elif mode == "exists":
            problem, fmt = (None if path.is_file() else ImageError(path, "missing")), None
        else:
            problem, fmt = check_image(path)
        not_jpg = False
        if relative.startswith("ocr_vqa/"):
            not_jpg = not relative.endswith(".jpg") or (fmt is not None and fmt != "JPEG")
            if problem is not None and problem.problem == "missing":
                not_jpg = not_jpg or any(path.parent.glob(path.stem + ".*"))
        cache[relative] = (problem, not_jpg)
    return cache[relative]


def _where(position: int, offset: int, record: Any) -> str:
    """How a report names a record: its position in the array, its id when it has one, its byte."""
    rid = record.get("id") if isinstance(record, dict) else None
    named = f"id {rid!r}, " if rid is not None else ""
    return f"record {position} ({named}byte {offset})"


def _process_chunk(task: tuple[str, str, str, str, int, np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Validate, check images and measure one run of records (read by offset); `first` is the
    position of the run's first record in the array."""
    data_path, image_root, stage, template, first, offsets, nbytes = task
    records = JsonRecords(data_path, offsets, nbytes)
    arrays = empty_arrays(len(records))
    result: dict[str, Any] = {
        "malformed": [],
        "missing": set(),
        "corrupt": {},
        "not_jpg": set(),
        "mismatches": 0,
    }
    tokenizer = _WORKER.get("tokenizer")
    dtype = token_dtype(len(tokenizer)) if tokenizer is not None else None
    codes: list[np.ndarray] = []
    code_counts = np.zeros(len(records), dtype=np.int64)  # 0 for malformed records
    for i in range(len(records)):
        record = None
        try:
            record = records[i]
            conversation = parse_record(record)
            arrays["source"][i] = SOURCES.index(record_source(conversation.images, stage))
            arrays["num_images"][i] = len(conversation.images)
            if tokenizer is not None:
                # One slot per image: the codes keep where blocks go, lengths are stored without them.
                _, tokens = tokenize_record(
                    record,
                    template=template,
                    tokenizer=tokenizer,
                    image_token_id=IMAGE_SLOT_ID,
                    num_image_tokens=1,
                )
                images = len(conversation.images)
                arrays["text_tokens"][i] = len(tokens.input_ids) - images
                arrays["image_end_text"][i] = tokens.image_end - images if images else 0
                codes.append(encode_tokens(tokens, dtype))
                code_counts[i] = len(codes[-1])
                if tokens.mismatch:
                    arrays["flags"][i] |= FLAG_MISMATCH
                    result["mismatches"] += 1
            else:
                render(template, conversation.turns, len(conversation.images))
                arrays["text_tokens"][i] = word_count(record["conversations"])
        except (ValueError, SkipSample) as err:  # MalformedRecord, bad JSON, template rules
            arrays["flags"][i] |= FLAG_MALFORMED
            result["malformed"].append(f"{_where(first + i, int(offsets[i]), record)}: {err}")
            continue
        for relative in conversation.images:
            problem, not_jpg = _check_path(Path(image_root), relative)
            if problem is not None and problem.problem == "missing":
                arrays["flags"][i] |= FLAG_MISSING_IMAGE
                result["missing"].add(relative)
            elif problem is not None:
                arrays["flags"][i] |= FLAG_CORRUPT_IMAGE
                result["corrupt"][relative] = problem.reason
            if not_jpg:
                arrays["flags"][i] |= FLAG_NOT_JPG
                result["not_jpg"].add(relative)
    result["arrays"] = arrays
    if dtype is not None:  # malformed records have no codes
        result["codes"] = np.concatenate(codes) if codes else np.zeros(0, dtype)
        result["code_counts"] = code_counts
    return result


def use_tokenizer(tokenizer: Any | None, language_model: str | Path, check_images: str) -> None:
    """Set this process's worker state; forked workers inherit the loaded tokenizer (None: word counts)."""
    _WORKER.clear()
    if tokenizer is not None:
        _WORKER["tokenizer"] = tokenizer
    _init_worker(str(language_model), check_images, tokenizer is not None)


def survey_dataset(
    data_path: Path,
    image_root: Path,
    stage: str,
    template: str,
    *,
    workers: int,
    chunk_records: int = CHUNK_RECORDS,
) -> DatasetReport:
    """Index one training JSON and check its images, in worker processes when it is large enough.

    Call `use_tokenizer` first; workers are forked from this process and share its tokenizer (it
    has not run yet here, so there is no tokenizer thread pool to break).
    """
    scanned = JsonRecords.scan(data_path)
    tasks = [
        (
            str(data_path),
            str(image_root),
            stage,
            template,
            s,
            scanned.offsets[s : s + chunk_records],
            scanned.lengths[s : s + chunk_records],
        )
        for s in range(0, len(scanned), chunk_records)
    ]
    measure = "tokenizer" in _WORKER
    if workers > 1 and len(tasks) > 1:
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        initargs = (_WORKER.get("language_model"), _WORKER["check_images"], measure)
        with ProcessPoolExecutor(
            workers, mp_context=get_context(method), initializer=_init_worker, initargs=initargs
        ) as pool:
            results = list(pool.map(_process_chunk, tasks))
    else:
        results = [_process_chunk(task) for task in tasks]
    arrays = empty_arrays(len(scanned))
    arrays["offset"][:], arrays["nbytes"][:] = scanned.offsets, scanned.lengths
    report = DatasetReport(DatasetIndex(**arrays, measured=measure))
    start = 0
    for result in results:
        part = result["arrays"]
        for name in ("text_tokens", "num_images", "image_end_text", "flags", "source"):
            getattr(report.index, name)[start : start + len(part[name])] = part[name]
        start += len(part["source"])
        report.malformed += result["malformed"]
        report.missing |= result["missing"]
        report.corrupt.update(result["corrupt"])
        report.not_jpg |= result["not_jpg"]
        report.mismatches += result["mismatches"]
    if measure:
        counts = np.concatenate([r["code_counts"] for r in results]) if results else np.zeros(0, np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)])
        dtype = token_dtype(len(_WORKER["tokenizer"]))
        codes = np.concatenate([r["codes"] for r in results]) if results else np.zeros(0, dtype)
        report.index.tokens = TokenTable(Path(), starts, codes.astype(dtype, copy=False))
    valid = (report.index.flags & FLAG_MALFORMED) == 0
    report.sources = Counter(SOURCES[s] for s in report.index.source[valid])
    return report


def survey_mmmu(mmmu_dir: Path, *, decode_images: bool) -> dict[str, Any]:
    """Questions per subject and split; unreadable files and undecodable embedded images."""
    from io import BytesIO

    from PIL import Image

    subjects: dict[str, dict[str, int]] = {}
    errors, images, corrupt = [], 0, 0
    for split in MMMU_SPLITS:
        for subject, path in mmmu_files(mmmu_dir, split).items():
            try:
                questions = read_mmmu(path, images=decode_images)
            except (OSError, ValueError) as err:
                errors.append(f"{path}: {err}")
                continue
            subjects.setdefault(subject, {})[split] = len(questions)
            for question in questions:
                for data in filter(None, question.images):
                    images += 1
                    try:
                        with Image.open(BytesIO(data)) as picture:
                            picture.load()
                    except Exception:
                        corrupt += 1
                        errors.append(f"{question.id}: an embedded image cannot be decoded")
    return {
        "subjects": subjects,
        "missing_subjects": [s for s in SUBJECTS if s not in subjects],
        "images_checked": images,
        "corrupt_images": corrupt,
        "errors": errors,
    }
