"""Data-loading throughput per CPU core: llavarun's path vs LLaVA's `LazySupervisedDataset` path.

Both paths turn the same records into the same training inputs (checked here on every sample):

- baseline (what LLaVA does per sample, `llava/train/train.py`): the whole JSON parsed up front;
  PIL decode → expand2square (finetune) → `CLIPImageProcessor.preprocess` → conversation template →
  the slow tokenizer (`use_fast=False`: transformers' Python SentencePiece tokenizer with the
  LLaMA non-legacy rules), once for the prompt and twice per round for the masks;
- llavarun (`LlavaDataset`): the record read by offset, the JPEG decoded by libjpeg-turbo into
  numpy (`decode_rgb`: Pillow's pixels), torch's uint8 resize where one is needed, one multiply-add
  for rescale+normalise; tokens from prepare's index ("indexed": the token table, as training
  reads it after the prepare stage) or the Rust tokenizer once per `<image>` chunk with masks
  from token offsets ("tokenizing", no index);
- "decode": reading and decoding each image exactly, nothing else. Baseline time over it is the
  ceiling for any loader that decodes every image as LLaVA does.

Everything runs in one process with one thread and is timed in CPU seconds, so samples/s is per
CPU core. The paths run in interleaved passes (pass r of each under the same background load):
rates are the best pass, speed-ups the median [min-max] of the per-pass ratios. Images are JPEGs
with the short side at 336 px (CLIP-L/336 preprocessing values); `--size 640x480` gives COCO-sized
ones instead. The tokenizer is a 16K-piece LLaMA-style SentencePiece model trained here on
Python's docstrings (English text), since no model hub is reachable. Finetune samples come in
mix665k's three shapes: LLaVA-Instruct conversations (1-4 rounds, long answers), packed VQA
(3-10 short question/answer rounds per image: VQAv2, GQA, OCR-VQA, ...) and text-only ShareGPT;
the "mix665k" row weights them as the real file does (about 158K / 467K / 40K samples).

    .venv/bin/python bench/dataloader.py [--samples 300] [--size 336] [--repeats 7] [--kinds pretrain]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(ROOT))

from llava_trainer.data.templates import IGNORE_INDEX  # noqa: E402

from tests.llava_reference import expand_images, llava_labels  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DOC_MODULES = [
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "configparser",
    "csv",
    "datetime",
    "decimal",
    "email",
    "enum",
    "functools",
    "http.client",
    "inspect",
    "json",
    "logging",
    "multiprocessing",
    "os",
    "pathlib",
    "pydoc",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "ssl",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.request",
    "zipfile",
]


def english_corpus() -> list[str]:
    """Sentences from the standard library's docstrings: real English without a download."""
    import importlib
    import inspect

    sentences: list[str] = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(getattr(module, a, None) for a in dir(module))]:
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc:
                text = re.sub(r"\s+", " ", doc)
                sentences += [s.strip() for s in re.split(r"(?<=[.!?]) ", text) if len(s.split()) > 3]
    return sorted(set(sentences))


KINDS = ("pretrain", "instruct", "vqa", "text")
MIX665K = {"instruct": 158_000, "vqa": 467_000, "text": 40_000}
"""Approximate mix665k composition: LLaVA-Instruct, packed short-answer sets, ShareGPT."""


def build_fixture(root: Path, samples: int, size: str, seed: int) -> dict:
    """Tokenizer, CLIP-L/336 processor config, JPEGs and one JSON per sample kind under `root`."""
    from llava_trainer.synth_models import write_llama_tokenizer
    from transformers import CLIPImageProcessor

    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    sentences = english_corpus()
    write_llama_tokenizer(sentences, root / "vicuna", vocab_size=16000, seed=seed)
    CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
    ).save_pretrained(str(root / "clip"))
    images = root / "images"
    images.mkdir()
    shapes = [(448, 336), (336, 448), (336, 336), (597, 336), (336, 504)]
    if size != "336":
        shapes = [tuple(int(v) for v in size.split("x"))]
    for i in range(samples):
        width, height = shapes[i % len(shapes)]
        x = np.linspace(0, 255, width)[None, :, None]
        y = np.linspace(0, 255, height)[:, None, None]
        noise = np_rng.normal(0, 18, (height, width, 3))
        pixels = 0.5 * x + 0.3 * y + np_rng.integers(0, 255, 3) * 0.3 + noise
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(images / f"{i:06d}.jpg", quality=90)

    def words(low: int, high: int) -> str:
        text, target = "", rng.randint(low, high)
        while len(text.split()) < target:
            text += rng.choice(sentences) + " "
        return text.strip()

    def rounds(
        count: int, question: tuple[int, int], answer: tuple[int, int], suffix: str = ""
    ) -> list[dict]:
        turns = []
        for _ in range(count):
            turns += [
                {"from": "human", "value": words(*question) + suffix},
                {"from": "gpt", "value": words(*answer)},
            ]
        return turns

    short = "\nAnswer the question using a single word or phrase."
    for kind in KINDS:
        records = []
        for i in range(samples):
            if kind == "pretrain":
                turns = [
                    {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                    {"from": "gpt", "value": words(8, 20)},
                ]
            elif kind == "instruct":
                turns = rounds(rng.randint(1, 4), (8, 25), (40, 120))
            elif kind == "vqa":
                turns = rounds(rng.randint(3, 10), (5, 12), (1, 3), short)
            else:
                turns = rounds(rng.randint(2, 6), (10, 40), (60, 200))
            record = {"id": f"{kind}-{i}", "conversations": turns}
            if kind != "text":
                record["image"] = f"{i:06d}.jpg"
                if kind != "pretrain":
                    turns[0]["value"] = "<image>\n" + turns[0]["value"]
            records.append(record)
        (root / f"{kind}.json").write_text(json.dumps(records))
    return {"tokens_per_word": _tokens_per_word(root, sentences)}


def _tokens_per_word(root: Path, sentences: list[str]) -> float:
    from llava_trainer.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(root / "vicuna")
    sample = sentences[:2000]
    return sum(len(ids) - 1 for ids in tokenizer(sample).input_ids) / sum(len(s.split()) for s in sample)


# --- the baseline: LLaVA's per-sample path ----------------------------------------------------


def slow_llama_tokenizer(model_file: Path):
    """transformers 4.37's `LlamaTokenizer` (legacy=False) rebuilt on v5's Python SentencePiece
    backend: the dummy prefix only at the start of the text, BOS prepended."""
    from transformers.tokenization_utils_sentencepiece import SPIECE_UNDERLINE, SentencePieceBackend

    class SlowLlamaTokenizer(SentencePieceBackend):
        def tokenize(self, text, **kwargs):
            if not text:
                return super().tokenize(text, **kwargs)
            tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
            if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
                tokens = tokens[1:]
            return tokens

        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            return [self.bos_token_id, *token_ids_0]

    return SlowLlamaTokenizer(
        vocab_file=str(model_file), legacy=False, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def llava_preprocess(slow, conversations: list[dict], template: str) -> tuple[list[int], list[int]]:
    """`preprocess_multimodal` + `preprocess_plain` / `preprocess_v1`, including its mismatch rule
    (lengths that do not add up mask the whole sample)."""
    from llava_trainer.data.templates import render

    turns = [(t["from"], t["value"]) for t in conversations]
    prompt = render(template, turns, sum("<image>" in v for _, v in turns)).text  # = conv.get_prompt()
    return llava_labels(lambda chunk: slow(chunk).input_ids, template, prompt)


class LazySupervisedBaseline:
    """LLaVA's `LazySupervisedDataset.__getitem__`, minus the torch tensor wrapping."""

    def __init__(self, data_path: Path, image_folder: Path, processor, slow, template: str) -> None:
        self.records = json.loads(data_path.read_text())
        self.image_folder, self.processor, self.slow, self.template = image_folder, processor, slow, template

    def __getitem__(self, i: int):
        from llava_trainer.data.images import expand2square

        record = self.records[i]
        if "image" in record:
            image = Image.open(self.image_folder / record["image"]).convert("RGB")
            if self.template == "vicuna_v1":  # finetune: image_aspect_ratio pad
                image = expand2square(image, tuple(int(x * 255) for x in self.processor.image_mean))
            pixels = self.processor.preprocess(image, return_tensors="np")["pixel_values"][0]
        else:
            pixels = np.zeros((3, 336, 336), np.float32)  # LLaVA's stand-in for text-only samples
        conversations = copy.deepcopy(record["conversations"])
        return llava_preprocess(self.slow, conversations, self.template), pixels


# --- measurement -------------------------------------------------------------------------------


def timed_passes(paths: dict, count: int, repeats: int) -> dict[str, list[float]]:
    """CPU seconds of each pass of each path over `count` samples, `repeats` passes, interleaved.

    CPU time of this (single-threaded) process, not wall time: the machine is shared, and
    samples/s per core is exactly samples per CPU-second. Interleaving puts pass r of every path
    under the same background load, so per-pass ratios can be compared.
    """
    for get in paths.values():
        for i in range(min(8, count)):
            get(i)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, get in paths.items():
            start = time.process_time()
            for i in range(count):
                get(i)
            seconds[name].append(time.process_time() - start)
    return seconds


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    import torch
    from llava_trainer.data.dataset import LlavaDataset
    from llava_trainer.data.formats import JsonRecords
    from llava_trainer.data.images import CLIP_STD, ImagePipeline, decode_rgb
    from llava_trainer.tokenizer import LlavaTokens, extend_tokenizer, image_token_count, load_tokenizer
    from transformers import CLIPImageProcessor

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="llavarun-bench-"))
    info = build_fixture(root, args.samples, args.size, args.seed)
    tokenizer = load_tokenizer(root / "vicuna")
    ids = LlavaTokens(*extend_tokenizer(tokenizer), image_token_count(336, 14))  # CLIP-L/336: 576
    processor = CLIPImageProcessor.from_pretrained(str(root / "clip"))
    slow = slow_llama_tokenizer(root / "vicuna" / "tokenizer.model")
    slow.add_tokens(["<image>"], special_tokens=True)  # LLaVA splits on it before tokenizing anyway
    rows = []
    for kind in args.kinds:
        template, aspect = ("plain", "square") if kind == "pretrain" else ("vicuna_v1", "pad")
        data_path = root / f"{kind}.json"
        baseline = LazySupervisedBaseline(data_path, root / "images", processor, slow, template)
        records = JsonRecords.scan(data_path)
        is_image = np.array([kind != "text"] * len(records))
        index = prepare_index(root, data_path, kind, template, tokenizer)
        datasets = {
            name: LlavaDataset(
                records,
                template=template,
                tokenizer=tokenizer,
                images=ImagePipeline(processor, aspect),
                image_folder=root / "images",
                image_token_id=ids.image_token_id,
                num_image_tokens=ids.num_image_tokens,
                max_length=1 << 20,
                bad_images="error",
                is_image=is_image,
                excluded=np.zeros(len(records), bool),
                tokens=index.tokens if name == "indexed" else None,
            )
            for name in OURS
        }
        llava_mismatches, worst = 0, 0.0
        for i in range(args.samples):  # same inputs, or the comparison means nothing
            (base_ids, base_labels), base_pixels = baseline[i]
            expected_ids, expected_labels = expand_images(
                base_ids, base_labels, ids.image_token_id, ids.num_image_tokens
            )
            masked = all(label == IGNORE_INDEX for label in expected_labels)
            llava_mismatches += masked  # LLaVA's arithmetic gave up on this sample; ours did not
            for name, dataset in datasets.items():
                sample = dataset[i]
                assert sample.input_ids.tolist() == expected_ids, f"{kind} sample {i} ({name}): tokens differ"
                assert masked or sample.labels.tolist() == expected_labels, f"{kind} {i} ({name}): labels"
                if sample.pixel_values is not None:  # torch resize: within two 8-bit levels of PIL
                    levels = (
                        np.abs(sample.pixel_values[0] - base_pixels) * 255 * np.array(CLIP_STD)[:, None, None]
                    )
                    worst = max(worst, float(levels.max()))
        ours = datasets["indexed"]
        tokens = np.mean([len(ours[i].input_ids) for i in range(args.samples)])
        rounds = np.mean([len(records[i]["conversations"]) / 2 for i in range(args.samples)])
        images = (
            [root / "images" / records[i]["image"] for i in range(args.samples)] if kind != "text" else []
        )
        passes = timed_passes(
            {
                "base": baseline.__getitem__,
                **{name: d.__getitem__ for name, d in datasets.items()},
                "decode": (lambda i, images=images: decode_rgb(images[i])) if images else (lambda i: None),
            },
            args.samples,
            args.repeats,
        )
        rows.append(
            {
                "kind": kind,
                "template": template,
                "aspect": aspect,
                **summary(passes, args.samples),
                "tokens": tokens,
                "rounds": rounds,
                "llava_mismatches": llava_mismatches,
                "max_level_diff": round(worst, 2),
            }
        )
    weights = {row["kind"]: MIX665K[row["kind"]] for row in rows if row["kind"] in MIX665K}
    if len(weights) == len(MIX665K):
        rows.append(mix_row(rows, weights, args.samples))
    return rows, info


OURS = ("indexed", "tokenizing")
"""llavarun with prepare's index (the loader reads token ids from it: what training does after the
prepare stage) and without one (the loader tokenizes each record)."""


def prepare_index(root: Path, data_path: Path, kind: str, template: str, tokenizer):
    """prepare's index of one JSON (tokens included), written and loaded back as training loads it."""
    from llava_trainer.data.index import file_signature, load_index, write_index
    from llava_trainer.data.survey import survey_dataset, use_tokenizer
    from llava_trainer.tokenizer import tokenizer_fingerprint

    use_tokenizer(tokenizer, root / "vicuna", "none")
    survey = survey_dataset(
        data_path, root / "images", "pretrain" if kind == "pretrain" else "finetune", template, workers=1
    )
    fingerprint = tokenizer_fingerprint(tokenizer)
    info = {
        "path": str(data_path.resolve()),
        "signature": file_signature(data_path),
        "template": template,
        "tokenizer": fingerprint,
    }
    write_index(root / "index" / f"{kind}.json", {kind: (survey.index, info)}, {})
    index, why = load_index(
        root / "index" / f"{kind}.json", data_path, template=template, tokenizer_fingerprint=fingerprint
    )
    assert index is not None and index.tokens is not None, why
    return index


def summary(passes: dict[str, list[float]], count: int) -> dict:
    """Best-pass rates and the median [min, max] of the per-pass speed-ups over the baseline."""
    out: dict = {"passes": passes, "baseline": count / min(passes["base"])}
    for name in OURS:
        ratios = sorted(b / o for b, o in zip(passes["base"], passes[name], strict=True))
        out[name] = count / min(passes[name])
        out[f"{name}_ratio"] = (float(np.median(ratios)), ratios[0], ratios[-1])
    # The ceiling: the baseline over reading and decoding each image exactly, and nothing else.
    out["ceiling"] = float(
        np.median([b / max(d, 1e-9) for b, d in zip(passes["base"], passes["decode"], strict=True)])
    )
    return out


def mix_row(rows: list[dict], weights: dict[str, int], count: int) -> dict:
    """The mix665k-weighted finetune: weighted mean time per sample, pass by pass."""
    total = sum(weights.values())
    parts = [r for r in rows if r["kind"] in weights]
    passes = {
        path: [
            count * sum(weights[r["kind"]] * r["passes"][path][k] / count for r in parts) / total
            for k in range(len(parts[0]["passes"][path]))
        ]
        for path in parts[0]["passes"]
    }
    return {
        "kind": "mix665k",
        "template": "vicuna_v1",
        "aspect": "pad",
        "llava_mismatches": "",
        "max_level_diff": max(r["max_level_diff"] for r in parts),
        "tokens": sum(r["tokens"] * weights[r["kind"]] for r in parts) / total,
        "rounds": sum(r["rounds"] * weights[r["kind"]] for r in parts) / total,
        **summary(passes, count),
    }


def speedup(ratio: tuple[float, float, float]) -> str:
    return f"{ratio[0]:.2f}x [{ratio[1]:.2f}-{ratio[2]:.2f}]"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--size", default="336", help="'336' (short side 336, mixed aspect) or WxH")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}"
    )
    parser.add_argument("--json", type=Path, help="also write the rows (with every pass's CPU seconds) here")
    args = parser.parse_args()
    args.kinds = [k for k in KINDS if k in args.kinds.split(",")]
    rows, info = run(args)
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; one process, one thread; images {args.size}; "
        f"{args.samples} samples per kind, {args.repeats} interleaved passes (CPU time): rates are the best "
        f"pass, the speed-up the median [min-max] of the per-pass ratios; "
        f"tokenizer {info['tokens_per_word']:.2f} tokens/word\n"
    )
    print(
        "| samples (template, aspect) | rounds | tokens/sample | LLaVA path samples/s/core "
        "| llavarun samples/s/core (prepare index) | speed-up [range] "
        "| llavarun without index | speed-up [range] | ceiling (decode only) | max pixel diff (8-bit levels) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{row[name]:.1f} | {speedup(row[f'{name}_ratio'])}" for name in OURS]
        ceiling = f"{row['ceiling']:.2f}x" if row["kind"] != "text" else "-"
        print(
            f"| {row['kind']} ({row['template']}, {row['aspect']}) | {row['rounds']:.1f} | {row['tokens']:.0f} "
            f"| {row['baseline']:.1f} | {' | '.join(cells)} "
            f"| {ceiling} | {row['max_level_diff']} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"info": info, "args": vars(args) | {"json": str(args.json)}, "rows": rows})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
