"""Trainer fixtures: a synthetic data_dir in the real layout and a tiny LLaMA-style tokenizer.

Both are built once per session (seconds) and must be treated as read-only by tests: a test that
writes (prepare, broken files) works on a copy or points its output elsewhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TOKENIZER_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A red bus parked near the station.",
    "USER: How many dogs are there? ASSISTANT: There are 2 dogs, 13 cats and 400 birds.",
    "a photo of a cat sitting on a table next to a blue book",
    "Answer the question using a single word or phrase.",
    "Who wrote this book? Is this a comedy book? Yes No",
    "Please provide the bounding box coordinate of the region this sentence describes.",
] * 8


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece BPE model trained here (LLaMA's settings), saved with save_pretrained."""
    from llava_trainer.synth_models import write_llama_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    write_llama_tokenizer(TOKENIZER_CORPUS, out, vocab_size=400, save_pretrained=True)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    """The tiny tokenizer, loaded and extended like Vicuna (<image> = vocab size, <pad> next)."""
    from llava_trainer.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`llava-trainer synth` output (24 pretrain + 24 finetune samples, seed 7); read-only for tests.

    The same directory, size and seed as the training tests' `synth_data_dir`, so a session that
    runs both builds it once.
    """
    from llava_trainer.synth import synthesize

    root = tmp_path_factory.getbasetemp() / "llava-train-synth"
    done = root / ".complete"
    if not done.exists():
        synthesize(root, samples=24, seed=7)
        done.write_text("ok")
    return root


@pytest.fixture
def data_dir_copy(synth_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic data_dir that a test may modify."""
    copy = tmp_path / "data"
    shutil.copytree(synth_dir, copy, ignore=shutil.ignore_patterns(".complete"))
    return copy
