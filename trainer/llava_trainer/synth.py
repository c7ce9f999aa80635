"""`llava-trainer synth`: a complete small data_dir in the exact layout and formats of the real one.

Everything a run touches exists, just tiny: LLaVA-Pretrain (558k-style JSON + JPEGs under
images/<dir>/<id>.jpg), LLaVA-Finetune (mix665k-style JSON with all five image sources, text-only
and multi-turn samples), MMMU parquet (real column schema, several subjects and disciplines,
validation and dev, multi-image and open questions) and random-init checkpoints: a Vicuna-style
Llama with a SentencePiece tokenizer trained here on the synthetic text, a CLIP vision tower at
56 px (16 image tokens) so CPU tests stay fast, and a whole LLaVA model made of the two in
llava-hf's format (what a task finetune starts from, as llava-hf/llava-1.5-7b-hf would).
Deterministic per --seed; runs in seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data.formats import FINETUNE_IMAGE_DIRS
from .synth_models import (
    LANGUAGE_MODEL,
    LLAVA_MODEL,
    write_base_models,
    write_llama_tokenizer,
    write_llava_model,
)

MMMU_SUBJECTS = ("Accounting", "Economics", "Art", "Math")
"""Business x2, Art and Design, Science."""
MMMU_QUESTIONS = {"validation": 6, "dev": 3}

COLOURS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange", "purple", "grey"]
THINGS = [
    "bus",
    "cat",
    "dog",
    "car",
    "tree",
    "house",
    "boat",
    "bird",
    "table",
    "chair",
    "sign",
    "book",
    "train",
    "horse",
    "clock",
    "kite",
]
PLACES = ["street", "park", "beach", "kitchen", "field", "river", "city", "garden", "station", "market"]
ACTIONS = ["parked near", "sitting on", "standing in", "next to", "in front of", "flying over"]
PRETRAIN_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Summarize the visual content of the image.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
)
SHORT_ANSWER = "Answer the question using a single word or phrase."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, required=True, help="the data_dir to create (files are overwritten)"
    )
    parser.add_argument(
        "--samples", type=int, default=48, help="pretrain and finetune samples each (default 48)"
    )
    parser.add_argument("--seed", type=int, default=42)


def main(args: argparse.Namespace) -> int:
    if args.samples < 6:
        raise SystemExit("llava-trainer synth: --samples must be at least 6 (one per finetune source)")
    counts = synthesize(args.out, samples=args.samples, seed=args.seed)
    print(f"synth: wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def synthesize(out: Path, *, samples: int = 48, seed: int = 42) -> dict[str, int]:
    """Write the whole data_dir; returns sample counts."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for directory in ("Output/checkpoints_pretrain", "Output/checkpoints_finetune"):
        (out / directory).mkdir(parents=True, exist_ok=True)
    pretrain = _pretrain(out / "LLaVA-Pretrain", samples, rng, np_rng)
    finetune = _finetune(out / "LLaVA-Finetune", samples, rng, np_rng)
    questions = _mmmu(out / "MMMU" / "MMMU", rng, np_rng)
    corpus = [_texts(r) for r in pretrain + finetune] + [
        q["question"] + " " + q["options"] for q in questions
    ]
    tokenizer = write_llama_tokenizer(corpus, out / LANGUAGE_MODEL, seed=seed)
    write_base_models(out, vocab_size=len(tokenizer), seed=seed)
    write_llava_model(out, out / LLAVA_MODEL, seed=seed)
    return {"pretrain": len(pretrain), "finetune": len(finetune), "mmmu": len(questions)}


def _texts(record: dict[str, Any]) -> str:
    return "\n".join(turn["value"] for turn in record["conversations"])


def _caption(rng: random.Random) -> str:
    return f"a {rng.choice(COLOURS)} {rng.choice(THINGS)} {rng.choice(ACTIONS)} the {rng.choice(PLACES)}"


def _jpeg(
    path: Path, rng: random.Random, np_rng: np.random.Generator, size: tuple[int, int] | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _picture(rng, np_rng, size).save(path, "JPEG", quality=85)


def _picture(
    rng: random.Random, np_rng: np.random.Generator, size: tuple[int, int] | None = None
) -> Image.Image:
    """A small image with structure (gradient, block, noise), often not square (pad matters)."""
    width, height = size or (rng.randint(24, 96), rng.choice([rng.randint(24, 96), 0]))
    height = height or width
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    colour = np_rng.integers(0, 256, 3)[None, None, :]
    pixels = colour * (0.5 + 0.5 * x) * (1 - 0.4 * y) + np_rng.normal(0, 12, (height, width, 3))
    top, left = rng.randrange(height // 2 + 1), rng.randrange(width // 2 + 1)
    pixels[top : top + height // 3, left : left + width // 3] = np_rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_json(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Non-ASCII kept as UTF-8 (as in ShareGPT text), so byte offsets are exercised.
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")


def _pretrain(
    root: Path, samples: int, rng: random.Random, np_rng: np.random.Generator
) -> list[dict[str, Any]]:
    records = []
    for i in range(samples):
        sample_id = f"{4539375 + 7919 * i:09d}"
        image = f"{sample_id[:5]}/{sample_id}.jpg"
        _jpeg(root / "images" / image, rng, np_rng)
        prompt = rng.choice(PRETRAIN_PROMPTS)
        human = f"<image>\n{prompt}" if i % 2 else f"{prompt}\n<image>"
        conversations = [{"from": "human", "value": human}, {"from": "gpt", "value": _caption(rng)}]
        records.append({"id": sample_id, "image": image, "conversations": conversations})
    _write_json(root / "blip_laion_cc_sbu_558k.json", records)
    return records


def _rounds(rng: random.Random, count: int, short: bool) -> list[dict[str, str]]:
    turns = []
    for _ in range(count):
        thing = rng.choice(THINGS)
        if short:
            question, answer = f"What color is the {thing}?\n{SHORT_ANSWER}", rng.choice(COLOURS).capitalize()
        else:
            question = f"What is the {thing} doing in the {rng.choice(PLACES)}?"
            answer = f"The {thing} is {rng.choice(ACTIONS)} {_caption(rng)}. It looks {rng.choice(COLOURS)}."
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def _finetune(
    root: Path, samples: int, rng: random.Random, np_rng: np.random.Generator
) -> list[dict[str, Any]]:
    data = root / "data"
    pattern = [
        "coco",
        "gqa",
        "ocr_vqa",
        "textvqa",
        "vg",
        "text_only",
        "coco",
        "vg",
        "coco",
        "gqa",
        "text_only",
    ]
    records: list[dict[str, Any]] = []
    coco_images: list[str] = []
    for i in range(samples):
        source = pattern[i % len(pattern)]
        turns = _rounds(rng, rng.randint(1, 3), short=source in ("gqa", "textvqa"))
        if source == "coco" and coco_images and i % 3 == 0:
            image = rng.choice(coco_images)  # COCO images are shared by several instruction sets
            sample_id = Path(image).stem
        elif source == "coco":
            sample_id = f"{rng.randrange(1, 581929):012d}"
            image = f"coco/train2017/{sample_id}.jpg"
            coco_images.append(image)
        elif source == "gqa":
            sample_id = str(rng.randrange(1000000, 2417997))
            image = f"gqa/images/{sample_id}.jpg"
        elif source == "ocr_vqa":
            sample_id = str(rng.randrange(10**8, 10**10))
            image = f"ocr_vqa/images/{sample_id}.jpg"
            turns = [
                {"from": "human", "value": "Who wrote this book?"},
                {
                    "from": "gpt",
                    "value": f"{rng.choice(COLOURS).capitalize()} {rng.choice(THINGS).capitalize()}",
                },
                {"from": "human", "value": "Is this a comedy book?"},
                {"from": "gpt", "value": rng.choice(["Yes", "No"])},
            ]
        elif source == "textvqa":
            sample_id = f"{rng.getrandbits(64):016x}"
            image = f"textvqa/train_images/{sample_id}.jpg"
        elif source == "vg":
            sample_id = str(rng.randrange(1, 2417997))
            image = f"vg/{rng.choice(['VG_100K', 'VG_100K_2'])}/{sample_id}.jpg"
            turns = [
                {
                    "from": "human",
                    "value": f"Please provide the bounding box coordinate of the region this "
                    f"sentence describes: {_caption(rng)}.",
                },
                {"from": "gpt", "value": "[" + ", ".join(f"{rng.random():.2f}" for _ in range(4)) + "]"},
            ]
        else:
            sample_id = f"{rng.getrandbits(32):08x}_{rng.randrange(4)}"
            turns = _rounds(rng, rng.randint(1, 3), short=False)
            turns[0]["value"] += " Réponds en français, s'il te plaît: café ☕, 你好."
            if i % 2:
                turns.insert(
                    0, {"from": "gpt", "value": "Hello! How can I help you today?"}
                )  # dropped by LLaVA
            records.append({"id": sample_id, "model": "", "conversations": turns})
            continue
        if not (data / image).exists():
            _jpeg(data / image, rng, np_rng)
        turns[0]["value"] = f"<image>\n{turns[0]['value']}" if i % 4 else f"{turns[0]['value']}\n<image>"
        records.append({"id": sample_id, "image": image, "conversations": turns})
    for directory in FINETUNE_IMAGE_DIRS:
        (data / directory).mkdir(parents=True, exist_ok=True)
    _write_json(root / "llava_v1_5_mix665k.json", records)
    return records


def _png(rng: random.Random, np_rng: np.random.Generator) -> dict[str, Any]:
    buffer = io.BytesIO()
    _picture(rng, np_rng, (rng.randint(32, 80), rng.randint(32, 80))).save(buffer, "PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _mmmu(root: Path, rng: random.Random, np_rng: np.random.Generator) -> list[dict[str, Any]]:
    """Subject parquet files with MMMU's columns: options as a Python-list string, image_1..7 structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("question", pa.string()),
            ("options", pa.string()),
            ("explanation", pa.string()),
        ]
        + [(f"image_{k}", image_type) for k in range(1, 8)]
        + [
            (name, pa.string())
            for name in ("img_type", "answer", "topic_difficulty", "question_type", "subfield")
        ]
    )
    everything = []
    for subject in MMMU_SUBJECTS:
        for split, count in MMMU_QUESTIONS.items():
            rows = []
            for n in range(1, count + 1):
                kind = ("multiple-choice", "open", "multi-image")[n % 3]
                images = 2 if kind == "multi-image" else 1
                question = f"<image 1> What is the {rng.choice(THINGS)} in the {rng.choice(PLACES)} worth?"
                options = [f"${rng.randint(1, 99)}" for _ in range(4)]
                if kind == "multi-image":
                    question = f"Which of <image 1> and <image 2> shows a {rng.choice(COLOURS)} {rng.choice(THINGS)}?"
                    options = ["<image 1>", "<image 2>", "both", "neither"]
                row = {
                    "id": f"{split}_{subject}_{n}",
                    "question": question,
                    "options": "[]" if kind == "open" else repr(options),
                    "explanation": "",
                    "img_type": repr([rng.choice(["Photographs", "Diagrams", "Tables", "Paintings"])]),
                    "answer": str(rng.randint(1, 99)) if kind == "open" else "ABCD"[rng.randrange(4)],
                    "topic_difficulty": rng.choice(["Easy", "Medium", "Hard"]),
                    "question_type": "open" if kind == "open" else "multiple-choice",
                    "subfield": f"{subject} basics",
                }
                for k in range(1, 8):
                    row[f"image_{k}"] = _png(rng, np_rng) if k <= images else None
                rows.append(row)
            directory = root / subject
            directory.mkdir(parents=True, exist_ok=True)
            pq.write_table(
                pa.Table.from_pylist(rows, schema=schema), directory / f"{split}-00000-of-00001.parquet"
            )
            everything += rows
    return everything
