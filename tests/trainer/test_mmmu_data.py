"""Reading MMMU parquet files and building the official prompts (no torch)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from llava_trainer.evaluate.data import Question, decode_image, load_images, load_questions
from llava_trainer.evaluate.prompts import (
    conversation_prompt,
    images_to_pass,
    question_prompt,
    referenced_images,
)

sys.path.insert(0, str(Path(__file__).parent))
from mmmu_fixtures import image_bytes, question_row, write_split


@pytest.fixture
def mmmu_dir(tmp_path: Path) -> Path:
    root = tmp_path / "MMMU" / "MMMU"
    write_split(
        root,
        "Art",
        "validation",
        [
            question_row("validation_Art_1", "<image 1> Which city?", "B", ["Paris", "London"]),
            question_row("validation_Art_2", "How many?", "['24/7', '3.429']", images={1: None}),
        ],
    )
    write_split(root, "Art", "dev", [question_row("dev_Art_1", "Q?", "A", ["x", "y"])])
    write_split(root, "Music", "dev", [question_row("dev_Music_1", "Q?", "A", ["x", "y"])])
    write_split(
        root,
        "Accounting",
        "validation",
        [
            question_row("validation_Accounting_1", "Cost?", "A", options_raw="not a list"),
            question_row("validation_Accounting_1", "Duplicate", "A", ["x", "y"]),
        ],
    )
    (root / "Biology").mkdir()
    (root / "Biology" / "validation-00000-of-00001.parquet").write_bytes(b"not parquet")
    return root


def test_questions_are_read_with_options_parsed_and_in_subject_order(mmmu_dir: Path):
    questions, _ = load_questions(mmmu_dir, "validation", ["Accounting", "Art"])
    assert [q.id for q in questions] == ["validation_Art_1", "validation_Art_2", "validation_Accounting_1"]
    art = questions[0]
    assert art.subject == "Art"
    assert art.options == ["Paris", "London"]
    assert art.is_multiple_choice and art.gold == "B"
    assert art.question == "<image 1> Which city?"
    assert art.subfield == "Testing"


def test_open_answers_stored_as_a_list_literal_accept_each_item(mmmu_dir: Path):
    questions, _ = load_questions(mmmu_dir, "validation", ["Art"])
    assert not questions[1].is_multiple_choice
    assert questions[1].gold == ["24/7", "3.429"]


def test_missing_subjects_splits_bad_files_and_rows_are_reported(mmmu_dir: Path):
    questions, problems = load_questions(mmmu_dir, "validation")
    assert len(questions) == 3
    assert "Physics" in problems.missing_subjects and len(problems.missing_subjects) == 26
    assert problems.missing_splits == {"Music": ["dev"]}
    assert list(problems.unreadable_files) == [
        str(mmmu_dir / "Biology" / "validation-00000-of-00001.parquet")
    ]
    assert problems.invalid_options == ["validation_Accounting_1"]
    assert problems.duplicate_ids == ["validation_Accounting_1"]
    lines = "\n".join(problems.summary_lines())
    assert "Music: no split files for this split (present: dev)" in lines
    assert "26 subjects missing" in lines


def test_withheld_answers_are_reported_as_unanswered(tmp_path: Path):
    root = tmp_path / "MMMU"
    write_split(root, "Art", "test", [question_row("test_Art_1", "Q?", "?", ["x", "y"])])
    questions, problems = load_questions(root, "test", ["Art"])
    assert questions[0].gold is None
    assert problems.unanswered == ["test_Art_1"]


def test_a_missing_mmmu_directory_is_an_error_naming_the_expected_layout(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"<Subject>/validation-\*\.parquet"):
        load_questions(tmp_path / "nowhere", "validation")


def test_images_are_loaded_only_when_wanted_and_gaps_are_reported(mmmu_dir: Path):
    questions, problems = load_questions(mmmu_dir, "validation", ["Art"])
    load_images(questions, {"validation_Art_1": [1], "validation_Art_2": [1]}, problems)
    assert decode_image(questions[0].images[1]).size == (48, 32)
    assert questions[1].images == {}
    assert problems.image_errors == {"validation_Art_2": "image_1 is empty (null or no bytes)"}


def test_undecodable_image_bytes_raise():
    with pytest.raises(ValueError, match="not a recognised image format"):
        decode_image(b"\x89PNG garbage")
    assert decode_image(image_bytes(fmt="JPEG")).mode == "RGB"


# --- prompts ---------------------------------------------------------------------------------------


def _question(question: str, options: list[str], answer: str = "A") -> Question:
    kind = "multiple-choice" if options else "open"
    return Question(
        id="validation_Art_1",
        subject="Art",
        question=question,
        options=options,
        answer=answer,
        question_type=kind,
    )


def test_multiple_choice_prompt_is_the_official_one():
    q = _question("<image 1> What is the price?", ["$6", "$7"])
    assert question_prompt(q) == (
        "<image 1> What is the price?\n(A) $6\n(B) $7\n\n"
        "Answer with the option's letter from the given choices directly."
    )


def test_open_prompt_is_the_official_one():
    q = _question("How long is it?", [])
    assert question_prompt(q) == "How long is it?\nAnswer the question using a single word or phrase."


def test_conversation_is_vicuna_v1_with_the_image_token_first():
    system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    assert conversation_prompt("Q", 1) == f"{system} USER: <image>\nQ ASSISTANT:"
    assert conversation_prompt("Q", 2) == f"{system} USER: <image> <image>\nQ ASSISTANT:"
    assert conversation_prompt("Q", 0) == f"{system} USER: Q ASSISTANT:"


def test_official_mode_passes_image_1_only_even_when_more_are_referenced():
    q = _question("Compare <image 2> and <image 1>", ["<image 3>", "<image 4>"])
    assert referenced_images(q) == [1, 2, 3, 4]
    assert images_to_pass(q, "first") == [1]
    assert images_to_pass(q, "referenced") == [1, 2, 3, 4]


def test_referenced_mode_falls_back_to_image_1_when_nothing_is_referenced():
    assert images_to_pass(_question("What is shown?", []), "referenced") == [1]
