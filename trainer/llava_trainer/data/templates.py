"""LLaVA-1.5 conversation templates and label masking, as LLaVA-1.5 trains them.

A template renders a conversation into one prompt string plus the character spans whose tokens
are trained. Tokenization then follows LLaVA's `tokenizer_image_token` exactly (the prompt is split
at each `<image>`, each chunk tokenized on its own, the BOS of later chunks dropped), with each
`<image>` expanded to the vision tower's token count of the image token id, as HF
`LlavaForConditionalGeneration` needs. A token is trained iff its characters lie inside a trained
span; offsets make this exact where LLaVA's length arithmetic can drift. A template boundary that
falls inside a token cannot be masked exactly: that is the *tokenization mismatch*, and the whole
sample is masked, as LLaVA does, but counted instead of printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..tokenizer import IMAGE_TOKEN, encode_chunks

IGNORE_INDEX = -100
ROLES: tuple[str, str] = ("human", "gpt")
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATE_NAMES: tuple[str, ...] = ("plain", "vicuna_v1")


class SkipSample(Exception):
    """A sample that cannot be trained on; `reason` is the counter it is reported under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Prompt:
    text: str
    trained: tuple[tuple[int, int], ...]
    """Character spans [start, end) of `text` whose tokens are trained."""


@dataclass(frozen=True)
class TokenizedSample:
    input_ids: np.ndarray
    """int64, with every image expanded to its block of image token ids."""
    labels: np.ndarray
    """int64, IGNORE_INDEX where not trained."""
    num_images: int
    image_end: int
    """Tokens up to the end of the last image block (0 without images): the least that must fit."""
    mismatch: bool = False
    truncated: bool = False

    @property
    def num_trained(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def move_image_to_front(text: str) -> str:
    """LLaVA's `preprocess_multimodal`: a turn's `<image>` goes first, followed by a newline."""
    if IMAGE_TOKEN not in text:
        return text
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


def prepare_turns(turns: Sequence[tuple[str, str]], num_images: int) -> list[tuple[str, str]]:
    """Move each `<image>` tag to the front of its turn, as LLaVA does, and check there is exactly
    one per image: a sample whose tags do not match its images (none at all included: LLaVA would
    silently train on text alone) is malformed, as the record reader already says of such records.
    """
    if num_images == 0:
        if any(IMAGE_TOKEN in text for _, text in turns):
            raise SkipSample("malformed", f"{IMAGE_TOKEN} in a text-only sample (no 'image' field)")
        return list(turns)
    turns = [(role, move_image_to_front(text)) for role, text in turns]
    tags = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if tags != num_images:
        raise SkipSample("malformed", f"{tags} {IMAGE_TOKEN} tags for {num_images} images")
    return turns


def render_plain(turns: Sequence[tuple[str, str]]) -> Prompt:
    """Pretrain (`preprocess_plain`): "<image>" + caption + "\\n"; only the caption and "\\n" train."""
    if len(turns) != 2 or IMAGE_TOKEN not in turns[0][1] or [r for r, _ in turns] != list(ROLES):
        raise SkipSample(
            "malformed", "the plain template needs exactly a human turn with <image> and a gpt turn"
        )
    text = IMAGE_TOKEN + turns[1][1] + "\n"
    return Prompt(text, ((len(IMAGE_TOKEN), len(text)),))


def render_vicuna_v1(turns: Sequence[tuple[str, str]]) -> Prompt:
    """Finetune (`conv_vicuna_v1`, SeparatorStyle.TWO): system, then `USER: q ASSISTANT: a</s>` per round.

    Trained: each answer from the space after "ASSISTANT:" through its "</s>" (LLaVA's
    `instruction_len = len(tokens(prefix)) - 2` leaves that space's token to the answer).
    """
    turns = list(turns)
    if turns and turns[0][0] != "human":
        turns = turns[1:]  # LLaVA drops a leading gpt turn
    if not turns:
        raise SkipSample("malformed", "no human turn in the conversation")
    for j, (role, _) in enumerate(turns):
        if role != ROLES[j % 2]:
            raise SkipSample("malformed", f"turn {j} is from {role!r}; human and gpt must alternate")
    text = VICUNA_SYSTEM + " "
    trained = []
    for role, message in turns:
        name = "USER" if role == "human" else "ASSISTANT"
        if not message:
            text += name + ":"
        elif role == "human":
            text += f"{name}: {message} "
        else:
            text += name + ":"
            start = len(text)
            text += f" {message}</s>"
            trained.append((start, len(text)))
    return Prompt(text, tuple(trained))


TEMPLATES = {"plain": render_plain, "vicuna_v1": render_vicuna_v1}


def render(template: str, turns: Sequence[tuple[str, str]], num_images: int) -> Prompt:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {list(TEMPLATES)}")
    return TEMPLATES[template](prepare_turns(turns, num_images))


def tokenize_prompt(
    prompt: Prompt, tokenizer: Any, *, image_token_id: int, num_image_tokens: int
) -> TokenizedSample:
    """Token ids and labels of a rendered prompt (untruncated), LLaVA's way, with exact masks."""
    chunks = prompt.text.split(IMAGE_TOKEN)
    chunk_ids, chunk_offsets = encode_chunks(tokenizer, chunks)
    bos = tokenizer.bos_token_id
    first = chunk_ids[0]
    strip = 1 if first and first[0] == bos else 0
    ids: list[np.ndarray] = [np.array([bos] if strip else [], dtype=np.int64)]
    starts: list[np.ndarray] = [np.full(strip, -1, dtype=np.int64)]
    ends: list[np.ndarray] = [np.full(strip, -1, dtype=np.int64)]
    position, length, image_end = 0, strip, 0
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(np.full(num_image_tokens, image_token_id, dtype=np.int64))
            starts.append(np.full(num_image_tokens, -1, dtype=np.int64))
            ends.append(np.full(num_image_tokens, -1, dtype=np.int64))
            length += num_image_tokens
            image_end = length
            position += len(IMAGE_TOKEN)
        offsets = np.asarray(chunk_offsets[i][strip:], dtype=np.int64).reshape(-1, 2)
        ids.append(np.asarray(chunk_ids[i][strip:], dtype=np.int64))
        starts.append(offsets[:, 0] + position)
        ends.append(offsets[:, 1] + position)
        length += len(offsets)
        position += len(chunk)
    input_ids, start, end = np.concatenate(ids), np.concatenate(starts), np.concatenate(ends)
    labels, mismatch = _labels(input_ids, start, end, prompt)
    return TokenizedSample(input_ids, labels, len(chunks) - 1, image_end, mismatch)


def _labels(
    input_ids: np.ndarray, start: np.ndarray, end: np.ndarray, prompt: Prompt
) -> tuple[np.ndarray, bool]:
    """Trained where a token's characters all lie in a trained span; a token across a span edge
    is a mismatch (everything masked). Zero-width tokens (a dummy-prefix "▁") follow their position."""
    in_span = np.zeros(len(prompt.text) + 1, dtype=bool)
    for a, b in prompt.trained:
        in_span[a:b] = True
    counts = np.concatenate([[0], np.cumsum(in_span[:-1])])
    text = start >= 0
    s, e = np.where(text, start, 0), np.where(text, end, 0)
    width = e - s
    covered = counts[e] - counts[s]
    trained = text & (((width > 0) & (covered == width)) | ((width == 0) & in_span[s]))
    straddles = text & (width > 0) & (covered > 0) & (covered < width)
    if straddles.any():
        return np.full_like(input_ids, IGNORE_INDEX), True
    return np.where(trained, input_ids, IGNORE_INDEX), False


def fit_to_length(sample: TokenizedSample, max_length: int) -> TokenizedSample:
    """Truncate to `max_length` tokens (image tokens count, as LLaVA truncates after splicing).

    Never cuts inside an image block: HF needs every image's full block of ids, so a sample whose
    image would not fit is skipped (reason "image_truncated") rather than silently losing its image.
    """
    if sample.image_end > max_length:
        raise SkipSample(
            "image_truncated",
            f"the image block ends at token {sample.image_end}, beyond max_length {max_length}",
        )
    if len(sample.input_ids) <= max_length:
        return sample
    return replace(
        sample,
        input_ids=sample.input_ids[:max_length],
        labels=sample.labels[:max_length],
        truncated=True,
    )
