"""`llava-trainer inspect`: show exactly what the model trains on for one sample.

For people: the prompt with trained tokens highlighted, masked tokens dimmed and each image block
summarised as `<image xN>`. For machines (`--json`): input_ids, labels and per-token text.
It runs the training code path (`build_sample`), so what it shows is what training sees.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from .config import FinetuneConfig, PretrainConfig, TrainConfig
from .data.dataset import build_sample
from .data.formats import JsonRecords, iter_json_array
from .data.images import ImageError, ImagePipeline
from .data.index import load_index
from .data.templates import IGNORE_INDEX, SkipSample

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("LLAVARUN_DATA_DIR"), required=False)
    parser.add_argument("--stage", choices=("pretrain", "finetune"), required=True)
    parser.add_argument("--index", type=int, default=0, help="position of the record in the JSON array")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--data-path", help="training JSON (default: the stage's, relative to --data-dir)")
    parser.add_argument("--image-folder", help="image root (default: the stage's)")
    parser.add_argument("--language-model", help="tokenizer checkpoint (default: the case's Vicuna)")
    parser.add_argument("--vision-tower", help="CLIP checkpoint (default: the case's CLIP-L/336)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto")


def _config(args: argparse.Namespace) -> TrainConfig:
    overrides = {
        key: value
        for key, value in (
            ("data_path", args.data_path),
            ("image_folder", args.image_folder),
            ("language_model", args.language_model),
            ("vision_tower", args.vision_tower),
        )
        if value
    }
    config_class = PretrainConfig if args.stage == "pretrain" else FinetuneConfig
    return config_class(data_dir=args.data_dir, max_length=args.max_length, **overrides)


def read_record(config: TrainConfig, index: int, fingerprint: str) -> tuple[dict[str, Any], str | None]:
    """(record `index` of the stage's JSON, a warning when the file is truncated or invalid).

    With prepare's index (which only exists for a file that parsed whole and has not changed since)
    the record is read by offset; otherwise the file is streamed to the end, so a file that prepare
    and training would refuse is named even when the record itself reads fine.
    """
    data_path = config.resolve(config.data_path)
    found, _ = load_index(
        config.index_path, data_path, template=config.template, tokenizer_fingerprint=fingerprint
    )
    if found is not None:
        if not 0 <= index < len(found):
            raise IndexError(f"{data_path} has {len(found)} records; --index {index} is out of range")
        return JsonRecords(data_path, found.offset, found.nbytes)[index], None
    record, count = None, 0
    try:
        for count, (_, _, element) in enumerate(iter_json_array(data_path), start=1):
            if count - 1 == index:
                record = element
    except ValueError as err:
        if record is None:
            raise
        return record, f"{err}; prepare and training refuse this file until it is fixed"
    if record is None:
        raise IndexError(f"{data_path} has {count} records; --index {index} is out of range")
    return record, None


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Printable text of each token: "▁" as a space, byte-fallback pieces joined into characters."""
    texts: list[str] = []
    pending: list[int] = []

    def flush() -> None:
        if pending:
            texts[-1] = bytes(pending).decode("utf-8", errors="replace")
            pending.clear()

    for piece in tokenizer.convert_ids_to_tokens(ids):
        match = _BYTE_PIECE.match(piece or "")
        if match:
            pending.append(int(match.group(1), 16))
            texts.append("")
            continue
        flush()
        texts.append((piece or "").replace("▁", " "))
    flush()
    return texts


def describe(sample: Any, tokenizer: Any, image_token_id: int) -> dict[str, Any]:
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    return {
        "id": sample.id,
        "images": list(sample.image_paths),
        "pixel_values_shape": list(sample.pixel_values.shape) if sample.pixel_values is not None else None,
        "num_tokens": len(ids),
        "num_image_tokens": sum(i == image_token_id for i in ids),
        "num_trained": sum(label != IGNORE_INDEX for label in labels),
        "tokenization_mismatch": sample.mismatch,
        "truncated": sample.truncated,
        "input_ids": ids,
        "labels": labels,
        "tokens": token_texts(tokenizer, ids),
    }


def render_text(info: dict[str, Any], image_token_id: int) -> Any:
    """rich Text: trained tokens green, masked dim, `<image xN>` for each image block."""
    from rich.text import Text

    text = Text()
    ids, labels, tokens = info["input_ids"], info["labels"], info["tokens"]
    i = 0
    while i < len(ids):
        if ids[i] == image_token_id:
            j = i
            while j < len(ids) and ids[j] == image_token_id:
                j += 1
            text.append(f"<image x{j - i}>", style="bold magenta")
            i = j
            continue
        piece = tokens[i].replace("\n", "↵\n")
        text.append(piece, style="bold green" if labels[i] != IGNORE_INDEX else "dim")
        i += 1
    return text


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .tokenizer import llava_tokens, load_tokenizer, tokenizer_fingerprint

    if args.data_dir is None:
        raise SystemExit("llava-trainer inspect: --data-dir is required")
    config = _config(args)
    try:
        tokenizer = load_tokenizer(config.resolve(config.language_model), max_length=config.max_length)
        ids = llava_tokens(tokenizer, config.resolve(config.vision_tower))
        record, file_warning = read_record(config, args.index, tokenizer_fingerprint(tokenizer))
    except (FileNotFoundError, IndexError, ValueError) as err:
        print(f"llava-trainer inspect: {err}", file=sys.stderr)
        return 2
    if file_warning:
        print(f"llava-trainer inspect: WARNING {file_warning}", file=sys.stderr)
    common = dict(
        template=config.template,
        tokenizer=tokenizer,
        image_token_id=ids.image_token_id,
        num_image_tokens=ids.num_image_tokens,
        max_length=config.max_length,
    )
    try:
        sample = build_sample(record, **common)
    except SkipSample as err:
        print(f"inspect: record {args.index} is not trained on ({err.reason}): {err}")
        return 1
    image_error = None
    if sample.image_paths:
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor.from_pretrained(str(config.resolve(config.vision_tower)))
        pipeline = ImagePipeline(processor, config.image_aspect_ratio)
        try:
            sample = build_sample(
                record, **common, image_folder=config.resolve(config.image_folder), images=pipeline
            )
        except ImageError as err:
            image_error = str(err)
    info = {
        "stage": config.stage,
        "index": args.index,
        "template": config.template,
        **describe(sample, tokenizer, ids.image_token_id),
        "image_error": image_error,
        "file_warning": file_warning,
    }
    if args.json:
        print(json.dumps(info))
        return 0 if image_error is None else 1
    console = Console(
        force_terminal={"always": True, "never": False}.get(args.color),
        no_color=args.color == "never",
        highlight=False,
    )
    images = ", ".join(info["images"]) or "none (text-only)"
    console.print(f"[bold]{config.stage}[/] record {args.index} id={info['id']!r} template={config.template}")
    console.print(
        f"images: {images}"
        + (f" → pixel_values {info['pixel_values_shape']}" if info["pixel_values_shape"] else "")
    )
    if image_error:
        console.print(f"[bold red]image error:[/] {image_error}")
    console.print(
        f"tokens: {info['num_tokens']} ({info['num_image_tokens']} image), trained {info['num_trained']}, "
        f"masked {info['num_tokens'] - info['num_trained']}; truncated: {info['truncated']}; "
        f"tokenization mismatch: {info['tokenization_mismatch']}"
    )
    console.print("legend: [bold green]trained[/] [dim]masked[/] [bold magenta]<image xN>[/]\n")
    console.print(render_text(info, ids.image_token_id))
    return 0 if image_error is None else 1
