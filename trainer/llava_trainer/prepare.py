"""`llava-trainer prepare`: verify a data_dir, count it, measure it, and index it for training.

Checks the case's layout and fails with the missing path and what belongs there; then, per
training JSON: counts samples per source, checks every referenced image (missing, corrupt, too
large, OCR-VQA's all-`.jpg` rule), measures real token lengths with the real tokenizer and template
(image tokens included), and writes the per-sample index that training reuses (config.index_path).
MMMU parquet files are read and counted. Finally it applies the training loader's own exclusion
rule to the index under each stage's bad_images policy: where that stage would stop, prepare
fails (exit 1) and its last line says what to fix. Only the output directory is written; the
source data is opened read-only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .config import PrepareConfig
from .data.formats import FINETUNE_IMAGE_DIRS, JsonRecords, MalformedRecord, mmmu_files, parse_record
from .data.index import FLAG_MALFORMED, DatasetIndex, file_signature, write_index
from .data.survey import CHUNK_RECORDS, DatasetReport, survey_dataset, survey_mmmu, use_tokenizer
from .data.templates import IMAGE_TOKEN, SkipSample, render

log = logging.getLogger(__name__)

DATASETS = {"pretrain": "plain", "finetune": "vicuna_v1"}
"""Training JSON -> the template its stage trains with (lengths depend on it)."""
REFERENCE_CHECKS = 200


class LayoutError(Exception):
    """The data_dir does not have the case's layout; the message lists each missing path."""


def _expect(path: Path, what: str, *, directory: bool = False) -> list[str]:
    ok = path.is_dir() if directory else path.is_file()
    return [] if ok else [f"missing {path}: expected {what}"]


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
"""A Hugging Face checkpoint directory holds its weights in one of these."""
LLAVA_ARCHITECTURE = "LlavaForConditionalGeneration"


def llava_model_problems(path: Path, field: str = "spec.finetune.modelPath") -> list[str]:
    """What keeps `path` from being a whole Hugging Face LLaVA model to train or evaluate (its
    config, weights, tokenizer and image processor); empty when it is one. Plain file checks."""
    wanted = (
        f"a Hugging Face LLaVA model directory ({LLAVA_ARCHITECTURE}, e.g. llava-hf/llava-1.5-7b-hf; {field})"
    )
    if not path.is_dir():
        return [f"missing {path}: expected {wanted}"]
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return [f"{path} is a LoRA adapter, not a model: use the merged model directory (model/) next to it"]
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        return [f"missing {path}/config.json: expected {wanted}"]
    except (OSError, ValueError) as err:
        return [f"{path}/config.json is not readable JSON ({err}): expected {wanted}"]
    kind = config.get("architectures") or config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(config, dict) or (
        config.get("model_type") != "llava" and LLAVA_ARCHITECTURE not in (config.get("architectures") or [])
    ):
        return [
            f"{path}/config.json describes {kind or 'no model type'}, not {LLAVA_ARCHITECTURE}: expected {wanted}"
        ]
    problems = []
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        problems.append(f"{path} has no weights ({' or '.join(WEIGHT_FILES)}): expected {wanted}")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        problems.append(f"missing {path}/tokenizer.json: a LLaVA model directory brings its tokenizer")
    if not any((path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        problems.append(
            f"missing {path}/preprocessor_config.json: a LLaVA model directory brings its image processor"
        )
    return problems


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
    if config.start_model is not None:  # task finetune: one LLaVA directory instead of the parts
        problems += llava_model_problems(config.start_model)
    elif training:
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


def _paths(config: PrepareConfig, stage: str) -> tuple[Path, Path]:
    """(training JSON, image root) of a training stage."""
    if stage == "pretrain":
        return config.resolve(config.pretrain_data), config.resolve(config.pretrain_images)
    return config.resolve(config.finetune_data), config.resolve(config.finetune_images)


def _tokenizer_meta(config: PrepareConfig, tokenizer: Any) -> dict[str, Any]:
    from .tokenizer import llava_tokens, tokenizer_fingerprint

    ids = llava_tokens(tokenizer, config.vision_dir)
    return {
        "path": str(config.tokenizer_dir),
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "image_token_id": ids.image_token_id,
        "pad_token_id": ids.pad_token_id,
    }


def _dataset_report(config: PrepareConfig, stage: str, survey: DatasetReport, num_image_tokens: int) -> dict:
    index, measured = survey.index, survey.index.measured
    lengths = index.lengths(num_image_tokens)
    valid = (index.flags & FLAG_MALFORMED) == 0
    return {
        "path": str(_paths(config, stage)[0]),
        "records": len(index),
        "sources": dict(survey.sources),
        "malformed": len(survey.malformed),
        "malformed_examples": survey.malformed[: config.max_listed],
        "tokenization_mismatches": survey.mismatches,
        "longer_than_max_length": int((lengths > config.max_length).sum()) if measured else None,
        "image_beyond_max_length": int((index.image_end(num_image_tokens) > config.max_length).sum())
        if measured
        else None,
        "lengths": _length_stats(lengths[valid]) if measured else None,
    }


def _reference_prompts(config: PrepareConfig, datasets: dict[str, tuple[DatasetIndex, dict]]) -> list[str]:
    """The first prompts of each training JSON, for the fast-vs-SentencePiece check."""
    prompts = []
    for stage, (index, _) in datasets.items():
        records = JsonRecords(_paths(config, stage)[0], index.offset, index.nbytes)
        for i in range(min(len(records), REFERENCE_CHECKS // len(datasets))):
            try:
                conversation = parse_record(records[i])
                prompts.append(render(DATASETS[stage], conversation.turns, len(conversation.images)).text)
            except (MalformedRecord, SkipSample):
                continue
    return prompts


def training_verdict(
    config: PrepareConfig, stage: str, index: DatasetIndex, num_image_tokens: int
) -> str | None:
    """Why `stage` would stop at start-up on this index, with what to fix; None when it would start.

    The training loader's own exclusion rule (one definition): with `bad_images: error` a known bad
    image stops the stage; malformed and image-truncated samples are skipped, so the stage stops
    only when nothing is left to train on.
    """
    from .data.loader import _excluded

    data_path = _paths(config, stage)[0]
    policy = getattr(config, f"{stage}_bad_images")
    records = JsonRecords(data_path, index.offset, index.nbytes)
    try:
        excluded, reasons = _excluded(
            index, records, num_image_tokens=num_image_tokens, max_length=config.max_length, bad_images=policy
        )
    except RuntimeError as err:
        return (
            f"{stage} would stop at start-up: {str(err).rstrip('.')} "
            f"(spec.{stage}.badImages in a LlavaRun, --{stage}-bad-images for prepare)."
        )
    if excluded.all():
        found = ", ".join(f"{n} {why}" for why, n in reasons.items()) or "no records at all"
        return (
            f"{stage} would have nothing to train on: {data_path} has {len(index)} records and none is "
            f"usable ({found}); fix the data listed above"
        )
    return None


def prepare(config: PrepareConfig, *, chunk_records: int = CHUNK_RECORDS) -> dict[str, Any]:
    """Everything `run` does except printing; returns {"results": PrepareResults fields, "report": details}."""
    started = time.monotonic()
    check_layout(config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    training = [s for s in config.stages if s in DATASETS]
    meta: dict[str, Any] = {"data_dir": str(config.data_dir.resolve()), "max_length": config.max_length}
    tokenizer, num_image_tokens = None, 0
    if training:
        from .tokenizer import image_token_count, load_tokenizer, vision_geometry

        num_image_tokens = image_token_count(*vision_geometry(config.vision_dir))
        meta["num_image_tokens"] = num_image_tokens
        if config.measure_lengths:
            tokenizer = load_tokenizer(config.tokenizer_dir, max_length=config.max_length)
            meta["tokenizer"] = _tokenizer_meta(config, tokenizer)
    use_tokenizer(tokenizer, config.tokenizer_dir, config.check_images)

    datasets: dict[str, tuple[DatasetIndex, dict]] = {}
    report: dict[str, Any] = {"datasets": {}}
    samples: Counter[str] = Counter()
    missing, not_jpg, mismatches = set(), set(), 0
    corrupt: dict[str, str] = {}
    verdicts: list[str] = []
    for stage in training:
        data_path, image_root = _paths(config, stage)
        try:
            survey = survey_dataset(
                data_path,
                image_root,
                stage,
                DATASETS[stage],
                workers=config.workers or os.cpu_count() or 1,
                chunk_records=chunk_records,
            )
        except ValueError as err:  # not a JSON array
            raise LayoutError(str(err)) from None
        info = {
            "path": str(data_path.resolve()),
            "signature": file_signature(data_path),
            "template": DATASETS[stage],
            "tokenizer": meta.get("tokenizer", {}).get("fingerprint"),
            "stage": stage,
        }
        datasets[stage] = (survey.index, info)
        report["datasets"][stage] = _dataset_report(config, stage, survey, num_image_tokens)
        samples.update(survey.sources)
        missing |= survey.missing
        corrupt.update(survey.corrupt)
        not_jpg |= survey.not_jpg
        mismatches += survey.mismatches
        verdict = training_verdict(config, stage, survey.index, num_image_tokens)
        if verdict:
            verdicts.append(verdict)
    if tokenizer is not None and datasets:
        report["tokenizer_reference_check"] = _reference_check(
            config.tokenizer_dir, tokenizer, _reference_prompts(config, datasets)
        )
    if "evaluate" in config.stages:
        report["mmmu"] = survey_mmmu(
            config.resolve(config.mmmu_dir), decode_images=config.check_images == "all"
        )
        samples["mmmu"] = sum(s.get("validation", 0) for s in report["mmmu"]["subjects"].values())
    report.update(
        missing_images=sorted(missing)[: config.max_listed],
        corrupt_images=[f"{path}: {corrupt[path]}" for path in sorted(corrupt)[: config.max_listed]],
        ocr_vqa_not_jpg=sorted(not_jpg)[: config.max_listed],
        verdicts=verdicts,
    )
    results = {
        "samples": dict(samples),
        "missing_images": len(missing),
        "corrupt_images": len(corrupt) + report.get("mmmu", {}).get("corrupt_images", 0),
        "ocr_vqa_not_jpg": len(not_jpg),
        "tokenization_mismatches": mismatches,
        "index": str(config.index_path) if datasets else None,
        "duration_seconds": round(time.monotonic() - started, 2),
    }
    if datasets:
        write_index(config.index_path, datasets, {**meta, "results": results, "report": report})
    return {"results": results, "report": report}


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
            f"prepare: WARNING the fast tokenizer differs from SentencePiece on {check['differ']}/"
            f"{check['checked']} prompt chunks; masks follow the fast tokenizer"
        )
    elif check:
        print(
            f"prepare: fast tokenizer == SentencePiece (LLaVA's slow path) on {check['checked']} prompt chunks"
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
    for verdict in report["verdicts"]:  # last: what stops the next stage and what to fix
        print(f"prepare: FAILED: {verdict}")


def run(config: PrepareConfig) -> int:
    """The stage command: 0 when the next stages can start on this data, 1 when one would stop
    (results and index are still written), 2 when the layout is incomplete."""
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
    return 1 if outcome["report"]["verdicts"] else 0
