"""The Vicuna/LLaMA tokenizer, extended exactly as the HF llava-1.5 checkpoints are.

HF `LlavaForConditionalGeneration` needs real ids in `input_ids` where image features go: the
conversion script (`convert_llava_weights_to_hf.py`) adds `<image>` as a special token and a
dedicated `<pad>`, so for Vicuna image_token_index = 32000 and pad = 32001.
Tokenization is always the fast (Rust) tokenizer; `SentencePieceReference` re-implements the slow
LLaMA path LLaVA trained with, so tests and `prepare` can prove both give identical ids.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
SPIECE_UNDERLINE = "▁"


@dataclass(frozen=True)
class LlavaTokens:
    """The ids the data pipeline and the model must agree on."""

    image_token_id: int
    pad_token_id: int
    num_image_tokens: int


def extend_tokenizer(tokenizer: Any) -> tuple[int, int]:
    """Add `<image>` then `<pad>` (unless present) and make `<pad>` the pad token.

    Returns (image_token_id, pad_token_id): the original vocabulary size and the next id for a
    plain Vicuna tokenizer. Vicuna's own pad (`<unk>`) is replaced, as the HF conversion does.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab:
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token != PAD_TOKEN:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return image_id, tokenizer.pad_token_id


def load_tokenizer(path: str | Path, *, max_length: int = 2048) -> Any:
    """The fast tokenizer of a local checkpoint, extended for LLaVA, right padding (as in training)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path} does not exist (expected a Vicuna/LLaMA checkpoint)"
        )
    try:
        declared = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class") or ""
    except (OSError, ValueError):
        declared = ""
    if declared.removesuffix("Fast") == "LlamaTokenizer":
        # Direct class: AutoTokenizer would read config.json and import the modelling stack (torch).
        from transformers import LlamaTokenizer as tokenizer_class
    else:
        from transformers import AutoTokenizer as tokenizer_class
    tokenizer = tokenizer_class.from_pretrained(str(path), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{path}: a fast tokenizer is required (token offsets drive the label masks)")
    extend_tokenizer(tokenizer)
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = max_length
    return tokenizer


def vision_geometry(vision_tower: str | Path) -> tuple[int, int]:
    """(image_size, patch_size) from a CLIP checkpoint's config.json (CLIPConfig or CLIPVisionConfig)."""
    config_file = Path(vision_tower) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_file} is missing (expected a CLIP vision checkpoint)") from None
    vision = config.get("vision_config", config)
    # CLIPVisionConfig defaults (transformers) when a key is absent.
    return int(vision.get("image_size", 224)), int(vision.get("patch_size", 32))


def image_token_count(image_size: int, patch_size: int) -> int:
    """Image tokens per image: one per patch, CLS dropped ('default' select strategy): 576 for CLIP-L/336."""
    return (image_size // patch_size) ** 2


def llava_tokens(tokenizer: Any, vision_tower: str | Path) -> LlavaTokens:
    image_id, pad_id = extend_tokenizer(tokenizer)
    return LlavaTokens(image_id, pad_id, image_token_count(*vision_geometry(vision_tower)))


def _prefix_skips_leading_space(tokenizer: Any) -> bool:
    """True for a Metaspace pre-tokenizer that adds the dummy prefix ("▁") only when the text does
    not already start with a space: SentencePiece always adds it, so " x" differs by one "▁"."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    return type(pre).__name__ == "Metaspace" and getattr(pre, "prepend_scheme", None) in ("first", "always")


def encode_chunks(tokenizer: Any, chunks: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Ids (with BOS) and character offsets of each text, as the SentencePiece slow path tokenizes it.

    The one place the Rust LLaMA tokenizer differs from SentencePiece is a text that starts with a
    space: it then skips the dummy prefix. Such a text is encoded with one more leading space (which
    is what SentencePiece sees after adding the prefix) and the offsets are shifted back.
    """
    shift = _prefix_skips_leading_space(tokenizer)
    shifted = [shift and chunk.startswith(" ") for chunk in chunks]
    texts = [" " + chunk if moved else chunk for chunk, moved in zip(chunks, shifted, strict=True)]
    # The Rust tokenizer directly: the HF call wrapper would double the cost for short texts.
    encodings = [tokenizer.backend_tokenizer.encode(text, add_special_tokens=True) for text in texts]
    offsets = [
        [(max(0, a - 1), max(0, b - 1)) for a, b in e.offsets] if moved else list(e.offsets)
        for e, moved in zip(encodings, shifted, strict=True)
    ]
    return [e.ids for e in encodings], offsets


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that changes token ids, so a stale prepare index is detected."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([tokenizer.bos_token_id, len(tokenizer)]).encode())
    return digest.hexdigest()[:16]


class SentencePieceReference:
    """The slow LLaMA tokenizer LLaVA-1.5 trained with (transformers 4.37 `LlamaTokenizer`,
    `use_fast=False`, `legacy=False`), re-implemented on sentencepiece.

    Used as ground truth for the fast tokenizer and as the benchmark's baseline; deliberately
    mirrors the slow path's per-piece Python work. Special tokens split the text; only the start
    of the text gets the dummy prefix (non-legacy), chunks after a special token do not.
    """

    def __init__(self, model_file: str | Path, special_tokens: dict[str, int], bos_id: int = 1) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(model_file).read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.special = dict(special_tokens)
        self.bos_id = bos_id
        self.unk = self.sp.id_to_piece(self.sp.unk_id())
        self.unk_length = len(self.sp.encode(self.unk, out_type=str))
        names = sorted(self.special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    @classmethod
    def from_tokenizer(cls, model_file: str | Path, tokenizer: Any) -> SentencePieceReference:
        """With the same added/special tokens as a loaded HF tokenizer."""
        special = {t: i for t, i in tokenizer.get_vocab().items() if t in tokenizer.all_special_tokens}
        return cls(model_file, special, tokenizer.bos_token_id)

    def _encode_chunk(self, text: str) -> list[str]:
        if not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp.encode(text, out_type=str)
        # Leading spaces survive only behind another piece (the slow tokenizer's <unk> trick).
        pieces = self.sp.encode(self.unk + text, out_type=str)
        return pieces[self.unk_length :]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not text:
            return [self.bos_id] if add_bos else []
        text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        parts = [p for p in self._split.split(text) if p]
        if len(parts) > 1 and parts[0] == SPIECE_UNDERLINE and parts[1] in self.special:
            parts = parts[1:]
        ids = [self.bos_id] if add_bos else []
        for part in parts:
            if part in self.special:
                ids.append(self.special[part])
            else:
                ids.extend(self.sp.piece_to_id(p) for p in self._encode_chunk(part))
        return ids
