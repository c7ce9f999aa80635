"""Test fixtures for the evaluate stage: MMMU parquet files in the real schema and a tiny random
LLaVA checkpoint with its processor, built on the fly (no model hub).

Not a conftest: tests import what they need, so the helpers stay explicit.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MMMU_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("options", pa.string()),
        ("explanation", pa.string()),
        *[(f"image_{i}", IMAGE) for i in range(1, 8)],
        ("img_type", pa.string()),
        ("answer", pa.string()),
        ("topic_difficulty", pa.string()),
        ("question_type", pa.string()),
        ("subfield", pa.string()),
    ]
)
"""The columns and types of the Hugging Face MMMU/MMMU parquet files."""


def image_bytes(
    color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 32), fmt: str = "PNG"
) -> bytes:
    """A small solid image, encoded as the dataset stores it."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def question_row(
    qid: str,
    question: str,
    answer: str,
    options: list[str] | None = None,
    images: dict[int, bytes | None] | None = None,
    options_raw: str | None = None,
) -> dict[str, Any]:
    """One MMMU row; multiple choice when `options` is given, else open (options "[]")."""
    row: dict[str, Any] = {
        "id": qid,
        "question": question,
        "options": options_raw if options_raw is not None else repr(options or []),
        "explanation": "",
        "img_type": "['Diagrams']",
        "answer": answer,
        "topic_difficulty": "Easy",
        "question_type": "multiple-choice" if options else "open",
        "subfield": "Testing",
    }
    images = {1: image_bytes()} if images is None else images
    for i in range(1, 8):
        data = images.get(i)
        row[f"image_{i}"] = None if data is None else {"bytes": data, "path": f"{qid}_{i}.png"}
    return row


def write_split(mmmu_dir: Path, subject: str, split: str, rows: list[dict[str, Any]]) -> Path:
    """`<mmmu_dir>/<subject>/<split>-00000-of-00001.parquet`, as the Hugging Face dataset lays it out."""
    path = mmmu_dir / subject / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MMMU_SCHEMA), path)
    return path


# --- a tiny LLaVA checkpoint --------------------------------------------------------------------

_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: Answer with the option's letter from the given choices directly.",
    "Answer the question using a single word or phrase.",
    "(A) (B) (C) (D) (E) What is shown in the image? Which option is correct?",
    "0 1 2 3 4 5 6 7 8 9 cat dog red blue area volume price cost meters",
]


def build_tiny_llava(out_dir: Path, image_size: int = 56, patch_size: int = 14) -> Path:
    """A random-init LlavaForConditionalGeneration with a SentencePiece tokenizer and a CLIP image
    processor, saved with save_pretrained like the finetune stage's exported model directory."""
    import sentencepiece as spm
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlamaTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    spm_dir = out_dir.parent / f"{out_dir.name}-spm"
    spm_dir.mkdir(exist_ok=True)
    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20),
        model_writer=model_proto,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    (spm_dir / "tokenizer.model").write_bytes(model_proto.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(spm_dir, legacy=False, add_bos_token=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
