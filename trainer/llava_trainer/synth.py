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
from .data.images import CLIP_MEAN, CLIP_STD
from .data.templates import VICUNA_SYSTEM

LANGUAGE_MODEL = "LLaVA-Pretrain/checkpoints/vicuna-13b-v1.5"
VISION_TOWER = "LLaVA-Pretrain/checkpoints/clip-vit-large-patch14-336"
LLAVA_MODEL = "LLaVA-Finetune/checkpoints/llava-1.5-7b-hf"
"""Where a released LLaVA-1.5 in Hugging Face format goes for a task finetune (the examples' path)."""
VISION_IMAGE_SIZE, VISION_PATCH_SIZE = 56, 14
TOKENIZER_VOCAB = 600
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
    _write_models(out, vocab_size=len(tokenizer), seed=seed)
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


def write_llama_tokenizer(
    texts: list[str],
    out_dir: Path,
    *,
    vocab_size: int = TOKENIZER_VOCAB,
    seed: int = 42,
    save_pretrained: bool = False,
) -> Any:
    """Train a LLaMA-style SentencePiece BPE model on `texts` and save it in HF format.

    Same trainer settings as LLaMA-2's tokenizer (BPE, byte fallback, split digits, dummy prefix,
    identity normalisation, unk=0 bos=1 eos=2, no pad), so boundaries behave like the real one.
    Written as the Vicuna checkpoint has it (tokenizer.model + tokenizer_config.json, converted to
    a fast tokenizer on load); `save_pretrained` adds the fast tokenizer's own files instead.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer  # not AutoTokenizer: that imports the modelling stack (torch)

    out_dir.mkdir(parents=True, exist_ok=True)
    ascii_line = "".join(chr(c) for c in range(32, 127))
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([*texts, VICUNA_SYSTEM, "USER: ASSISTANT:", ascii_line]),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "padding_side": "right",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tokenizer = LlamaTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    if save_pretrained:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _write_models(out: Path, *, vocab_size: int, seed: int) -> None:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    )
    llama.generation_config = GenerationConfig(
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        max_length=4096,
        do_sample=True,
        temperature=0.9,
        top_p=0.6,
    )
    llama.save_pretrained(str(out / LANGUAGE_MODEL))
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=VISION_IMAGE_SIZE,
            patch_size=VISION_PATCH_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
        )
    )
    clip.save_pretrained(str(out / VISION_TOWER))
    CLIPImageProcessor(
        size={"shortest_edge": VISION_IMAGE_SIZE},
        crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=3,
        do_convert_rgb=True,
    ).save_pretrained(str(out / VISION_TOWER))


def write_llava_model(data_dir: Path, out: Path, *, seed: int = 42) -> Path:
    """A whole LLaVA-1.5 in llava-hf's format (LlavaForConditionalGeneration weights, the tokenizer
    with <image> and <pad>, the CLIP image processor) assembled from `data_dir`'s synthetic Vicuna
    and CLIP with a random projector: a stand-in for a released checkpoint."""
    import torch
    from transformers import CLIPImageProcessor

    from . import model as llava_model
    from .tokenizer import llava_tokens, load_tokenizer

    tokenizer = load_tokenizer(data_dir / LANGUAGE_MODEL)
    tokens = llava_tokens(tokenizer, data_dir / VISION_TOWER)
    torch.manual_seed(seed + 1)
    model = llava_model.build_llava(
        language_model=data_dir / LANGUAGE_MODEL,
        vision_tower=data_dir / VISION_TOWER,
        vocab_size=len(tokenizer),
        image_token_id=tokens.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        precision="fp32",
        device=torch.device("cpu"),
    )
    for part in (model.config.text_config, model.config.vision_config):
        part._name_or_path = ""  # no trace of where this data_dir was written: same bytes per seed
    image_processor = CLIPImageProcessor.from_pretrained(data_dir / VISION_TOWER)
    processor = llava_model.build_processor(tokenizer, image_processor, model.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    llava_model.export_model(model, model.state_dict(), processor, out)
    return out
