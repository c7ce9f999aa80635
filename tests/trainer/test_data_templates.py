"""Templates and label masking: exactly what LLaVA-1.5 trains on (LLaVA's preprocess_plain / preprocess_v1)."""

from __future__ import annotations

import numpy as np
import pytest
from llava_trainer.data.templates import (
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    Prompt,
    SkipSample,
    fit_to_length,
    prepare_turns,
    render,
    render_plain,
    render_vicuna_v1,
    tokenize_prompt,
)
from llava_trainer.tokenizer import SentencePieceReference, encode_chunks, image_token_count

from tests.llava_reference import expand_images, llava_labels

N_IMAGE = 5  # image tokens per image in these tests (576 for CLIP-L/336)

MULTI_TURN = [
    ("human", "<image>\nWhat is in the image?"),
    ("gpt", "A red bus."),
    ("human", "How many dogs?"),
    ("gpt", "2"),
]


def piece_text(tokenizer, ids) -> str:
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    return "".join(p.replace("▁", " ").replace("<0x0A>", "\n") for p in pieces)


def trained_runs(tokenizer, sample) -> list[str]:
    """The trained text, one string per contiguous run of trained tokens."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # a trained position predicts its own token (shifted by the model)
            current.append(token)
        elif current:
            runs.append(piece_text(tokenizer, current))
            current = []
    if current:
        runs.append(piece_text(tokenizer, current))
    return runs


def tokenize(tokenizer, template, turns, images=1):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    return tokenize_prompt(
        render(template, turns, images), tokenizer, image_token_id=image_id, num_image_tokens=N_IMAGE
    )


def test_vicuna_v1_prompt_is_llavas_conversation_text():
    prompt = render("vicuna_v1", MULTI_TURN, 1)
    assert prompt.text == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is in the image? ASSISTANT: A red bus.</s>"
        "USER: How many dogs? ASSISTANT: 2</s>"
    )
    # Each answer is trained from the space after "ASSISTANT:" through its "</s>".
    assert [prompt.text[a:b] for a, b in prompt.trained] == [" A red bus.</s>", " 2</s>"]


def test_plain_prompt_replaces_the_instruction_by_the_image():
    prompt = render("plain", [("human", "Describe the image concisely.\n<image>"), ("gpt", "a cat")], 1)
    assert prompt.text == "<image>a cat\n"
    assert [prompt.text[a:b] for a, b in prompt.trained] == ["a cat\n"]


def test_image_tag_moves_to_the_start_of_its_turn():
    turns = prepare_turns([("human", "What is this?\n<image>"), ("gpt", "A cat.")], 1)
    assert turns[0] == ("human", "<image>\nWhat is this?")


def test_image_sample_without_a_tag_is_malformed():
    with pytest.raises(SkipSample, match="0 <image> tags for 1 images"):
        prepare_turns([("human", "What is this?"), ("gpt", "A cat.")], 1)


@pytest.mark.parametrize(
    ("turns", "images"),
    [
        ([("human", "<image>\nhi"), ("gpt", "yo")], 0),  # the tag in a text-only sample
        ([("human", "<image>\nhi"), ("gpt", "yo"), ("human", "<image>\nand?"), ("gpt", "no")], 1),
        ([("human", "hi"), ("human", "again"), ("gpt", "yo")], 0),  # roles must alternate
    ],
)
def test_malformed_conversations_are_skipped_with_a_reason(turns, images):
    with pytest.raises(SkipSample) as err:
        render("vicuna_v1", turns, images)
    assert err.value.reason == "malformed"


def test_a_leading_gpt_turn_is_dropped_as_llava_does():
    prompt = render_vicuna_v1([("gpt", "Hello!"), ("human", "Hi"), ("gpt", "Yes")])
    assert prompt.text == f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Yes</s>"


def test_plain_needs_an_image_caption_pair():
    with pytest.raises(SkipSample):
        render_plain([("human", "no image here"), ("gpt", "caption")])


def test_multi_turn_trains_only_the_assistant_answers(tokenizer):
    sample = tokenize(tokenizer, "vicuna_v1", MULTI_TURN)
    assert trained_runs(tokenizer, sample) == [" A red bus.</s>", " 2</s>"]
    assert sample.labels[0] == IGNORE_INDEX  # BOS
    assert not sample.mismatch


def test_image_placeholder_expands_to_the_vision_token_count_and_is_masked(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    sample = tokenize(tokenizer, "vicuna_v1", MULTI_TURN)
    positions = np.flatnonzero(sample.input_ids == image_id)
    assert len(positions) == N_IMAGE and np.all(np.diff(positions) == 1)
    assert np.all(sample.labels[positions] == IGNORE_INDEX)
    assert sample.image_end == positions[-1] + 1


def test_text_only_sample_has_no_image_tokens(tokenizer):
    turns = [
        ("human", "Write a poem about cats."),
        ("gpt", "Cats sleep."),
        ("human", "More?"),
        ("gpt", "No."),
    ]
    sample = tokenize(tokenizer, "vicuna_v1", turns, images=0)
    assert tokenizer.convert_tokens_to_ids("<image>") not in sample.input_ids
    assert sample.num_images == 0 and sample.image_end == 0
    assert trained_runs(tokenizer, sample) == [" Cats sleep.</s>", " No.</s>"]


def test_plain_trains_the_caption_and_its_newline(tokenizer):
    sample = tokenize(tokenizer, "plain", [("human", "<image>\nDescribe."), ("gpt", "a cat on a table")])
    assert trained_runs(tokenizer, sample) == [" a cat on a table\n"]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert sample.input_ids[: 1 + N_IMAGE].tolist() == [tokenizer.bos_token_id] + [image_id] * N_IMAGE


def test_truncation_counts_image_tokens_and_cuts_text(tokenizer):
    sample = tokenize(tokenizer, "vicuna_v1", MULTI_TURN)
    cut = fit_to_length(sample, len(sample.input_ids) - 1)
    assert cut.truncated and len(cut.input_ids) == len(sample.input_ids) - 1
    assert trained_runs(tokenizer, cut) == [" A red bus.</s>", " 2"]
    assert fit_to_length(sample, len(sample.input_ids)) is sample


def test_a_sample_whose_image_block_would_be_cut_is_skipped(tokenizer):
    sample = tokenize(tokenizer, "vicuna_v1", MULTI_TURN)
    with pytest.raises(SkipSample) as err:
        fit_to_length(sample, sample.image_end - 1)
    assert err.value.reason == "image_truncated"
    assert len(fit_to_length(sample, sample.image_end).input_ids) == sample.image_end


def test_a_template_boundary_inside_a_token_masks_the_whole_sample(tokenizer):
    text = "USER: hi ASSISTANT: assistant</s>"
    inside_a_token = text.index("assistant</s>") + 3  # "▁assistant" is one token in this vocabulary
    sample = tokenize_prompt(
        Prompt(text, ((inside_a_token, len(text)),)), tokenizer, image_token_id=0, num_image_tokens=0
    )
    assert sample.mismatch
    assert np.all(sample.labels == IGNORE_INDEX)


def test_image_token_count_of_clip_l_336():
    assert image_token_count(336, 14) == 576
    assert image_token_count(56, 14) == 16


# --- LLaVA's own arithmetic as an oracle ------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "turns"),
    [
        ("plain", [("human", "Describe.\n<image>"), ("gpt", "a red bus near the station")]),
        (
            "vicuna_v1",
            [("human", "<image>\nWhat is in the image?"), ("gpt", "A red bus parked near the station.")],
        ),
        (
            "vicuna_v1",
            [
                ("human", "<image>\nHow many dogs?\nAnswer the question using a single word or phrase."),
                ("gpt", "2"),
            ],
        ),
    ],
)
def test_masks_equal_llavas_length_arithmetic(tokenizer, tokenizer_dir, template, turns):
    reference = SentencePieceReference.from_tokenizer(tokenizer_dir / "tokenizer.model", tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    prompt = render(template, turns, 1)
    expected_ids, expected_labels = expand_images(
        *llava_labels(reference.encode, template, prompt.text), image_id, N_IMAGE
    )
    assert set(expected_labels) != {IGNORE_INDEX}, "LLaVA would report a tokenization mismatch here"
    sample = tokenize_prompt(prompt, tokenizer, image_token_id=image_id, num_image_tokens=N_IMAGE)
    assert sample.input_ids.tolist() == expected_ids
    assert sample.labels.tolist() == expected_labels


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\nWhat is in the image? ASSISTANT: 2</s>USER: and 13?",
        " leading space and  double  spaces",
        "digits 12345 and newline\nthen café ☕ 你好",
        "</s>starts with a special token",
        "A chat between a curious user and an artificial intelligence assistant. USER: ",
        "a </s> b </s>",
        "   three leading spaces",
        "x\n\n  y\t z ",
    ],
)
def test_fast_tokenizer_equals_the_sentencepiece_slow_path(tokenizer, tokenizer_dir, text):
    reference = SentencePieceReference.from_tokenizer(tokenizer_dir / "tokenizer.model", tokenizer)
    ids, offsets = encode_chunks(tokenizer, [text])
    assert ids[0] == reference.encode(text)
    assert all(0 <= a <= b <= len(text) for a, b in offsets[0])
    if not text.startswith(" "):  # the same as the HF tokenizer call it short-cuts
        called = tokenizer([text], add_special_tokens=True, return_offsets_mapping=True)
        assert (
            called["input_ids"] == ids and [list(map(tuple, o)) for o in called["offset_mapping"]] == offsets
        )
