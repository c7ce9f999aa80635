"""LLaVA-1.5's own tokenization and label arithmetic, re-implemented as the oracle for ours.

LLaVA masks labels by counting tokens of re-tokenized pieces of the prompt
(`llava.mm_utils.tokenizer_image_token`, `llava.train.train.preprocess_plain` / `preprocess_v1`);
llavarun masks from token offsets instead. The tests (tests/trainer/test_data_templates.py) and
the data-loading benchmark (bench/dataloader.py) check that both give the same labels, so LLaVA's
way lives here once. `encode` is any tokenizer call that returns a text's ids with BOS first
(LLaVA's slow tokenizer, or `SentencePieceReference.encode`).
"""

from __future__ import annotations

from collections.abc import Callable

from llava_trainer.data.templates import IGNORE_INDEX

IMAGE_SENTINEL = -200
"""LLaVA's `IMAGE_TOKEN_INDEX`: the id standing for one image before its features are spliced in."""

Encode = Callable[[str], list[int]]


def tokenizer_image_token(encode: Encode, prompt: str) -> list[int]:
    """`tokenizer_image_token`: the chunks between `<image>` tokenized apart, one sentinel per image."""
    chunks = [encode(chunk) for chunk in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_SENTINEL)
        ids += chunk[1:]
    return ids


def llava_labels(encode: Encode, template: str, prompt: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a rendered prompt as `preprocess_plain` / `preprocess_v1` make them.

    Includes LLaVA's mismatch rule: when the round lengths do not add up to the prompt's, the whole
    sample is masked.
    """
    ids = tokenizer_image_token(encode, prompt)
    target = list(ids)
    if template == "plain":
        prefix = len(tokenizer_image_token(encode, "<image>"))
        target[:prefix] = [IGNORE_INDEX] * prefix
        return ids, target
    cur = 1
    target[0] = IGNORE_INDEX
    for round_text in prompt.split("</s>"):
        if not round_text:
            break
        parts = round_text.split(" ASSISTANT: ")
        round_len = len(tokenizer_image_token(encode, round_text))
        instruction_len = len(tokenizer_image_token(encode, parts[0] + " ASSISTANT: ")) - 2
        target[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    if cur != len(ids):
        target = [IGNORE_INDEX] * len(ids)
    return ids, target


def expand_images(
    ids: list[int], labels: list[int], image_token_id: int, image_tokens: int
) -> tuple[list[int], list[int]]:
    """Each sentinel as `image_tokens` untrained image tokens: the sequence the model sees."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    for token, label in zip(ids, labels, strict=True):
        if token == IMAGE_SENTINEL:
            out_ids += [image_token_id] * image_tokens
            out_labels += [IGNORE_INDEX] * image_tokens
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels
