"""`llava-trainer prepare`: verify a data_dir, count it, measure it, and index it for training.

Checks the case's layout (DESIGN §1) and fails with the missing path and what belongs there;
then, per training JSON: counts samples per source, checks every referenced image (missing,
corrupt, OCR-VQA's all-`.jpg` rule), measures real token lengths with the real tokenizer and
template (image tokens included), and writes the per-sample index that training reuses
(config.index_path). MMMU parquet files are read and counted. Only the output directory is written;
the source data is opened read-only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np

from .config import PrepareConfig
from .data.dataset import tokenize_record
from .data.formats import (
    FINETUNE_IMAGE_DIRS,
    SOURCES,
    JsonRecords,
    MalformedRecord,
    mmmu_files,
    parse_record,
    read_mmmu,
    record_source,
)
from .data.images import check_image
from .data.index import (
    FLAG_CORRUPT_IMAGE,
    FLAG_MALFORMED,
    FLAG_MISMATCH,
    FLAG_MISSING_IMAGE,
    FLAG_NOT_JPG,
    DatasetIndex,
    empty_arrays,
    file_signature,
    word_count,
    write_index,
)
from .data.templates import IMAGE_TOKEN, SkipSample, render

log = logging.getLogger(__name__)

DATASETS = {"pretrain": "plain", "finetune": "vicuna_v1"}
"""Training JSON -> the template its stage trains with (lengths depend on it)."""
CHUNK_RECORDS = 2048
REFERENCE_CHECKS = 200
MMMU_SPLITS = ("dev", "validation", "test")


class LayoutError(Exception):
    """The data_dir does not have the case's layout; the message lists each missing path."""


@dataclass
class DatasetReport:
    index: DatasetIndex
    sources: Counter[str] = field(default_factory=Counter)
    malformed: list[str] = field(default_factory=list)
    missing: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    not_jpg: set[str] = field(default_factory=set)
    mismatches: int = 0


def _expect(path: Path, what: str, *, directory: bool = False) -> list[str]:
    ok = path.is_dir() if directory else path.is_file()
    return [] if ok else [f"missing {path}: expected {what}"]


def check_layout(config: PrepareConfig) -> None:
    """Raise LayoutError listing everything missing for the stages this run will execute."""
    root = config.data_dir
    if not root.is_dir():
        raise LayoutError(f"data_dir {root} does not exist or is not a directory")
    problems: list[str] = []
    training = [s for s in config.stages if s in DATASETS]
    if "pretrain" in training:
        problems += _expect(
            config.resolve(config.pretrain_data), "the LLaVA-Pretrain caption JSON (a JSON array)"
        )
        problems += _expect(
            config.resolve(config.pretrain_images), "LLaVA-Pretrain images/<dir>/<id>.jpg", directory=True
        )
    if "finetune" in training:
        problems += _expect(config.resolve(config.finetune_data), "llava_v1_5_mix665k.json (a JSON array)")
        images = config.resolve(config.finetune_images)
        for sub in FINETUNE_IMAGE_DIRS:
            problems += _expect(images / sub, f"the {sub.split('/')[0]} images of mix665k", directory=True)
    if training:
        model = config.resolve(config.language_model)
        problems += _expect(model / "config.json", "a Vicuna/LLaMA Hugging Face checkpoint")
        if not ((model / "tokenizer.model").is_file() or (model / "tokenizer.json").is_file()):
            problems.append(f"missing {model}/tokenizer.model: expected the Vicuna tokenizer")
        vision = config.resolve(config.vision_tower)
        problems += _expect(vision / "config.json", "a CLIP vision checkpoint (clip-vit-large-patch14-336)")
        problems += _expect(vision / "preprocessor_config.json", "the CLIP image processor config")
    if "evaluate" in config.stages:
        mmmu = config.resolve(config.mmmu_dir)
        if not mmmu.is_dir():
            problems.append(f"missing {mmmu}: expected MMMU/MMMU/<Subject>/validation-*.parquet")
        elif not mmmu_files(mmmu, "validation"):
            problems.append(
                f"no MMMU subject in {mmmu}: expected <Subject>/validation-00000-of-00001.parquet"
            )
    if problems:
        raise LayoutError("the data_dir layout is incomplete:\n  " + "\n  ".join(problems))


# --- per-record work, run in worker processes -------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(language_model: str | None, check_images: str, measure: bool) -> None:
    if not measure:
        _WORKER.pop("tokenizer", None)
    elif "tokenizer" not in _WORKER:
        from .tokenizer import load_tokenizer

        _WORKER["tokenizer"] = load_tokenizer(language_model)
    _WORKER.update(check_images=check_images, measure=measure, images={})


def _check_path(image_root: Path, relative: str) -> tuple[str | None, bool]:
    """(problem, breaks the OCR-VQA .jpg rule) for one referenced image, cached per process."""
    cache = _WORKER["images"]
    if relative not in cache:
        path, mode = image_root / relative, _WORKER["check_images"]
        if mode == "none":
            problem, fmt = None, None
        elif mode == "exists":
            problem, fmt = (None if path.is_file() else "missing"), None
        else:
            problem, fmt = check_image(path)
        not_jpg = False
        if relative.startswith("ocr_vqa/"):
            not_jpg = not relative.endswith(".jpg") or (fmt is not None and fmt != "JPEG")
            if problem == "missing":
                not_jpg = not_jpg or any(path.parent.glob(path.stem + ".*"))
        cache[relative] = (problem, not_jpg)
    return cache[relative]


def _process_chunk(task: tuple[str, str, str, str, np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Validate, check images and measure one run of records (read by offset)."""
    data_path, image_root, stage, template, offsets, nbytes = task
    records = JsonRecords(data_path, offsets, nbytes)
    arrays = empty_arrays(len(records))
    result: dict[str, Any] = {
        "malformed": [],
        "missing": set(),
        "corrupt": set(),
        "not_jpg": set(),
        "mismatches": 0,
    }
    tokenizer = _WORKER.get("tokenizer")
    for i in range(len(records)):
        try:
            record = records[i]
            conversation = parse_record(record)
            arrays["source"][i] = SOURCES.index(record_source(conversation.images, stage))
            arrays["num_images"][i] = len(conversation.images)
            if tokenizer is not None:
                # Zero-length image blocks: lengths are stored without image tokens.
                _, tokens = tokenize_record(
                    record, template=template, tokenizer=tokenizer, image_token_id=0, num_image_tokens=0
                )
                arrays["text_tokens"][i], arrays["image_end_text"][i] = (
                    len(tokens.input_ids),
                    tokens.image_end,
                )
                if tokens.mismatch:
                    arrays["flags"][i] |= FLAG_MISMATCH
                    result["mismatches"] += 1
            else:
                render(template, conversation.turns, len(conversation.images))
                arrays["text_tokens"][i] = word_count(record["conversations"])
        except (ValueError, SkipSample) as err:  # MalformedRecord, bad JSON, template rules
            arrays["flags"][i] |= FLAG_MALFORMED
            result["malformed"].append(f"record at byte {offsets[i]}: {err}")
            continue
        for relative in conversation.images:
            problem, not_jpg = _check_path(Path(image_root), relative)
            if problem:
                arrays["flags"][i] |= FLAG_MISSING_IMAGE if problem == "missing" else FLAG_CORRUPT_IMAGE
                result[problem].add(relative)
            if not_jpg:
                arrays["flags"][i] |= FLAG_NOT_JPG
                result["not_jpg"].add(relative)
    result["arrays"] = arrays
    return result


def _pool(config: PrepareConfig, workers: int, measure: bool) -> ProcessPoolExecutor:
    # fork shares the already-loaded tokenizer; the parent has not run it yet (no thread pool to break).
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(
        workers,
        mp_context=get_context(method),
        initializer=_init_worker,
        initargs=(str(config.resolve(config.language_model)), config.check_images, measure),
    )


def index_dataset(
    config: PrepareConfig, stage: str, *, workers: int, measure: bool, chunk_records: int = CHUNK_RECORDS
) -> DatasetReport:
    """Scan one training JSON into its index, in worker processes when it is large enough."""
    data_path = config.resolve(config.pretrain_data if stage == "pretrain" else config.finetune_data)
    image_root = config.resolve(config.pretrain_images if stage == "pretrain" else config.finetune_images)
    scanned = JsonRecords.scan(data_path)
    tasks = [
        (
            str(data_path),
            str(image_root),
            stage,
            DATASETS[stage],
            scanned.offsets[s : s + chunk_records],
            scanned.lengths[s : s + chunk_records],
        )
        for s in range(0, len(scanned), chunk_records)
    ]
    if workers > 1 and len(tasks) > 1:
        with _pool(config, workers, measure) as pool:
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
        report.corrupt |= result["corrupt"]
        report.not_jpg |= result["not_jpg"]
        report.mismatches += result["mismatches"]
    valid = (report.index.flags & FLAG_MALFORMED) == 0
    report.sources = Counter(SOURCES[s] for s in report.index.source[valid])
    return report


def check_mmmu(mmmu_dir: Path, *, decode_images: bool) -> dict[str, Any]:
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
    from llava_operator.api.mmmu import SUBJECTS

    return {
        "subjects": subjects,
        "missing_subjects": [s for s in SUBJECTS if s not in subjects],
        "images_checked": images,
        "corrupt_images": corrupt,
        "errors": errors,
    }


def _length_stats(lengths: np.ndarray) -> dict[str, float]:
    if not len(lengths):
        return {}
    p50, p95, p99 = np.percentile(lengths, [50, 95, 99])
    return {
        "mean": round(float(lengths.mean()), 1),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "max": int(lengths.max()),
    }


def _reference_check(model_dir: Path, tokenizer: Any, prompts: list[str]) -> dict[str, int] | None:
    """Fast tokenizer vs the SentencePiece reference (LLaVA's slow path) on the first prompts."""
    from .tokenizer import SentencePieceReference, encode_chunks

    if not (model_dir / "tokenizer.model").is_file():
        return None
    reference = SentencePieceReference.from_tokenizer(model_dir / "tokenizer.model", tokenizer)
    chunks = [c for p in prompts for c in p.split(IMAGE_TOKEN)]
    fast, _ = encode_chunks(tokenizer, chunks)
    differ = sum(ids != reference.encode(c) for ids, c in zip(fast, chunks, strict=True))
    return {"checked": len(chunks), "differ": int(differ)}


def prepare(config: PrepareConfig, *, chunk_records: int = CHUNK_RECORDS) -> dict[str, Any]:
    """Everything `run` does except printing; returns {"results": PrepareResults fields, "report": details}."""
    started = time.monotonic()
    check_layout(config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workers = config.workers or os.cpu_count() or 1
    training = [s for s in config.stages if s in DATASETS]
    measure = config.measure_lengths and bool(training)
    meta: dict[str, Any] = {"data_dir": str(config.data_dir.resolve()), "max_length": config.max_length}
    tokenizer, fingerprint, num_image_tokens = None, None, 0
    _WORKER.clear()
    if training:
        from .tokenizer import (
            image_token_count,
            llava_tokens,
            load_tokenizer,
            tokenizer_fingerprint,
            vision_geometry,
        )

        num_image_tokens = image_token_count(*vision_geometry(config.resolve(config.vision_tower)))
        if measure:
            tokenizer = load_tokenizer(config.resolve(config.language_model), max_length=config.max_length)
            _WORKER["tokenizer"] = tokenizer  # inherited by forked workers
            fingerprint = tokenizer_fingerprint(tokenizer)
            ids = llava_tokens(tokenizer, config.resolve(config.vision_tower))
            meta["tokenizer"] = {
                "path": str(config.resolve(config.language_model)),
                "fingerprint": fingerprint,
                "vocab_size": len(tokenizer),
                "image_token_id": ids.image_token_id,
                "pad_token_id": ids.pad_token_id,
            }
        meta["num_image_tokens"] = num_image_tokens
    _init_worker(str(config.resolve(config.language_model)), config.check_images, measure)

    datasets, report, samples = {}, {"datasets": {}}, Counter()
    missing, corrupt, not_jpg, mismatches, malformed = [], [], [], 0, 0
    for stage in training:
        data_path = config.resolve(config.pretrain_data if stage == "pretrain" else config.finetune_data)
        try:
            result = index_dataset(
                config, stage, workers=workers, measure=measure, chunk_records=chunk_records
            )
        except ValueError as err:  # not a JSON array
            raise LayoutError(str(err)) from None
        index = result.index
        lengths = index.lengths(num_image_tokens)
        info = {
            "path": str(data_path.resolve()),
            "signature": file_signature(data_path),
            "template": DATASETS[stage],
            "tokenizer": fingerprint,
            "stage": stage,
        }
        datasets[stage] = (index, info)
        samples.update(result.sources)
        missing += sorted(result.missing)
        corrupt += sorted(result.corrupt)
        not_jpg += sorted(result.not_jpg)
        mismatches += result.mismatches
        malformed += len(result.malformed)
        report["datasets"][stage] = {
            "path": str(data_path),
            "records": len(index),
            "sources": dict(result.sources),
            "malformed": len(result.malformed),
            "malformed_examples": result.malformed[: config.max_listed],
            "tokenization_mismatches": result.mismatches,
            "longer_than_max_length": int((lengths > config.max_length).sum()) if measure else None,
            "image_beyond_max_length": int((index.image_end(num_image_tokens) > config.max_length).sum())
            if measure
            else None,
            "lengths": _length_stats(lengths[(index.flags & FLAG_MALFORMED) == 0]) if measure else None,
        }
    if tokenizer is not None and datasets:
        prompts = []
        for stage, (index, _) in datasets.items():
            records = JsonRecords(
                config.resolve(config.pretrain_data if stage == "pretrain" else config.finetune_data),
                index.offset,
                index.nbytes,
            )
            for i in range(min(len(records), REFERENCE_CHECKS // len(datasets))):
                try:
                    conversation = parse_record(records[i])
                    prompts.append(render(DATASETS[stage], conversation.turns, len(conversation.images)).text)
                except (MalformedRecord, SkipSample):
                    continue
        report["tokenizer_reference_check"] = _reference_check(
            config.resolve(config.language_model), tokenizer, prompts
        )
    if "evaluate" in config.stages:
        report["mmmu"] = check_mmmu(
            config.resolve(config.mmmu_dir), decode_images=config.check_images == "all"
        )
        samples["mmmu"] = sum(s.get("validation", 0) for s in report["mmmu"]["subjects"].values())
    report.update(
        missing_images=missing[: config.max_listed],
        corrupt_images=corrupt[: config.max_listed],
        ocr_vqa_not_jpg=not_jpg[: config.max_listed],
    )
    results = {
        "samples": dict(samples),
        "missing_images": len(missing),
        "corrupt_images": len(corrupt) + (report.get("mmmu", {}).get("corrupt_images", 0)),
        "ocr_vqa_not_jpg": len(not_jpg),
        "tokenization_mismatches": mismatches,
        "index": str(config.index_path) if datasets else None,
        "duration_seconds": round(time.monotonic() - started, 2),
    }
    if datasets:
        write_index(config.index_path, datasets, {**meta, "results": results, "report": report})
    return {"results": results, "report": report, "malformed": malformed}


def _report_status(results: dict[str, Any]) -> None:
    try:
        from .status import StatusReporter
    except ImportError:
        return
    StatusReporter.from_env().results("prepare", results)


def _print_summary(outcome: dict[str, Any]) -> None:
    results, report = outcome["results"], outcome["report"]
    print("prepare: samples " + ", ".join(f"{k} {v}" for k, v in results["samples"].items()))
    for stage, info in report["datasets"].items():
        lengths = info.get("lengths") or {}
        print(
            f"prepare: {stage}: {info['records']} records, {info['malformed']} malformed, "
            f"{info['tokenization_mismatches']} tokenization mismatches, "
            f"{info['longer_than_max_length']} longer than max_length, lengths {lengths}"
        )
        for example in info["malformed_examples"]:
            print(f"  malformed: {example}")
    for key in ("missing_images", "corrupt_images", "ocr_vqa_not_jpg"):
        if results[key]:
            print(f"prepare: WARNING {results[key]} {key.replace('_', ' ')}, e.g.:")
            for path in report[key]:
                print(f"  {path}")
    check = report.get("tokenizer_reference_check")
    if check and check["differ"]:
        print(
            f"prepare: WARNING the fast tokenizer differs from SentencePiece on {check['differ']}/{check['checked']} "
            "prompt chunks; masks follow the fast tokenizer"
        )
    if "mmmu" in report:
        mmmu = report["mmmu"]
        print(
            f"prepare: MMMU {len(mmmu['subjects'])} subjects, {results['samples'].get('mmmu', 0)} validation "
            f"questions, {len(mmmu['missing_subjects'])} subjects missing"
        )
        for error in mmmu["errors"][:10]:
            print(f"  {error}")
    print(f"prepare: index {results['index']} ({results['duration_seconds']} s)")


def run(config: PrepareConfig) -> int:
    try:
        outcome = prepare(config)
    except (LayoutError, FileNotFoundError) as err:
        print(f"llava-trainer prepare: {err}", file=sys.stderr)
        return 2
    _print_summary(outcome)
    out = config.stage_output
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(outcome["results"], indent=2) + "\n")
    _report_status(outcome["results"])
    return 0
