"""The official MMMU answer-parsing rules, one rule per test (pure functions, no torch)."""

from __future__ import annotations

import random

import pytest
from llava_trainer.evaluate.parse import (
    eval_multi_choice,
    eval_open,
    extract_numbers,
    normalize_str,
    parse_multi_choice,
    parse_multi_choice_response,
    parse_open_response,
)

FOUR = {"A": "Paris", "B": "London", "C": "Berlin", "D": "Madrid"}


def choose(response: str, options: dict[str, str] = FOUR) -> tuple[str, str]:
    letter, rule = parse_multi_choice(response, options, random.Random(0))
    return letter, rule


# --- multiple choice ------------------------------------------------------------------------------


def test_bracketed_letter_is_the_answer():
    assert choose("(B)") == ("B", "bracket")
    assert choose("I am fairly sure it is (C) here") == ("C", "bracket")


def test_bracketed_letter_wins_over_a_spaced_letter_anywhere():
    assert choose("A is tempting, but (D) is right") == ("D", "bracket")


def test_last_bracketed_letter_wins_when_several():
    assert choose("(A) looks plausible, (B) too, but finally (C)") == ("C", "bracket")
    assert choose("(C) or (A)") == ("A", "bracket")


def test_bare_letter_is_the_answer():
    assert choose("B") == ("B", "letter")
    assert choose("The answer is C") == ("C", "letter")


def test_surrounding_punctuation_is_stripped_before_matching():
    assert choose("B.") == ("B", "letter")
    assert choose("'D'") == ("D", "letter")


def test_punctuation_is_stripped_one_mark_at_a_time_in_the_original_order():
    # , . ! ? ; : ' in turn: "C?!" loses "!" then "?", but "C!?" keeps "!" (already past it).
    assert choose("C?!") == ("C", "letter")
    assert choose("C!?")[1] == "random"


def test_last_bare_letter_wins_when_several():
    assert choose("A or B") == ("B", "letter")
    assert choose("between B and A, A") == ("A", "letter")


def test_letters_inside_words_and_lowercase_letters_do_not_count():
    rule = choose("Absolutely")[1]
    assert rule == "random"
    assert choose("b")[1] == "random"  # the official parser is case-sensitive


def test_option_text_counts_only_in_responses_longer_than_five_words():
    assert choose("I think it must be London") == ("B", "text")  # 6 words
    assert choose("it must be London")[1] == "random"  # 4 words
    assert choose("London")[1] == "random"


def test_option_text_matches_case_insensitively_and_the_last_quoted_option_wins():
    assert choose("not madrid and not berlin, it is PARIS surely") == ("A", "text")
    assert choose("Paris is wrong here, I would answer Berlin") == ("C", "text")


def test_a_letter_wins_over_quoted_option_text():
    options = {"A": "mitochondria", "B": "nucleus"}
    assert choose("The nucleus is not it, the answer is A", options) == ("A", "letter")


def test_tied_text_positions_go_to_the_earlier_option():
    options = {"A": "5", "B": "5 kg", "C": "10 kg"}
    # "5" and "5 kg" both start at the same last position; numpy's argmax in the original keeps the first.
    assert choose("the weight of the box is 5 kg", options) == ("A", "text")


def test_empty_response_falls_back_to_a_seeded_random_choice():
    first = parse_multi_choice("", FOUR, random.Random(7))
    again = parse_multi_choice("", FOUR, random.Random(7))
    assert first.rule == "random"
    assert first.letter in FOUR
    assert first == again


def test_random_fallback_draws_from_the_given_generator():
    rng = random.Random(3)
    expected = random.Random(3).choice(list(FOUR))
    assert parse_multi_choice("no idea", FOUR, rng).letter == expected


def test_question_without_options_parses_to_nothing():
    assert parse_multi_choice("(A)", {}) == ("", "none")


def test_official_signature_returns_only_the_letter():
    assert parse_multi_choice_response("(B) London", ["A", "B", "C", "D"], FOUR) == "B"


# --- open questions -------------------------------------------------------------------------------


def test_plain_number_answer():
    assert parse_open_response("42") == [42.0]


def test_number_with_unit_keeps_the_text_and_the_number():
    assert parse_open_response("12 cm") == ["12 cm", 12.0]
    assert eval_open("12", parse_open_response("12 cm"))


def test_tail_after_an_indicator_word_is_the_key():
    assert parse_open_response("The answer is 3.5 meters.") == ["3.5 meters", 3.5]


def test_shortest_tail_over_all_indicators_wins():
    # "so " -> "the result is 9.81", "result " -> "is 9.81", "is " -> "9.81"
    assert parse_open_response("So the result is 9.81") == [9.81]


def test_each_line_contributes_its_key():
    response = "Step 1: compute the area.\nThus the value is 10\nSo the final answer is 12"
    assert parse_open_response(response) == [10.0, 12.0]


def test_equals_sign_is_an_indicator_on_the_last_line_only():
    assert parse_open_response("x = 7") == [7.0]
    assert parse_open_response("a = 5\nthe answer is 6") == [6.0]


def test_sentences_are_not_split_at_full_stops():
    # The original's ". X" split runs after lower-casing and so never fires; only lines split.
    assert parse_open_response("It is red. Then it is blue") == ["blue"]


def test_trivial_tails_are_not_keys():
    assert parse_open_response("the answer is :") == ["the answer is :"]


def test_comma_grouped_numbers():
    assert extract_numbers("a total of 1,234,567 dollars") == ["1,234,567", "567"]
    assert eval_open("1234567", parse_open_response("The total is 1,234,567 dollars"))


def test_scientific_notation():
    assert extract_numbers("6.02e23") == ["6.02e23", "6", "23"]  # the original's overlapping scans
    assert eval_open("6.02e23", parse_open_response("So the result is 6.02e23"))


def test_negative_and_decimal_numbers():
    assert extract_numbers("from -5.5 to .25 and 3") == ["-5.5", ".25", "3"]
    preds = parse_open_response("The temperature is -5.5 degrees")
    assert eval_open("-5.5", preds)
    assert not eval_open("5.5", preds)
    assert eval_open("0.5", parse_open_response("the answer is .5"))


def test_numbers_compare_after_rounding_to_two_places():
    assert normalize_str("3.14159") == [3.14]
    assert eval_open("3.14", parse_open_response("3.14159"))
    assert eval_open("3.50", parse_open_response("3.5"))
    assert not eval_open("3.51", parse_open_response("3.5"))


def test_text_answers_compare_lower_cased_by_containment():
    preds = parse_open_response("The answer is Photosynthesis.")
    assert preds == ["photosynthesis"]
    assert eval_open("Photosynthesis", preds)
    assert eval_open("synthesis", preds)  # a gold text contained in the prediction counts
    assert not eval_open("respiration", preds)


def test_single_character_gold_does_not_match_inside_words():
    assert normalize_str("A") == [" a", "a "]
    assert eval_open("a", parse_open_response("a"))
    assert not eval_open("a", parse_open_response("banana"))


def test_empty_response_is_wrong():
    assert parse_open_response("") == [""]
    assert not eval_open("5", parse_open_response(""))
    assert not eval_open("abc", parse_open_response(""))


def test_list_gold_accepts_any_of_its_answers():
    assert eval_open(["24/7", "3.429"], parse_open_response("3.429"))
    assert eval_open(["24/7", "3.429"], parse_open_response("the ratio is 24/7"))
    assert not eval_open(["24/7", "3.429"], parse_open_response("4"))


# --- multiple-choice judging ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gold", "pred", "correct"),
    [
        ("B", "B", True),
        ("B", "C", False),
        (["A", "C"], "C", True),
        (["A", "C"], "B", False),
        ("B", "", False),
    ],
)
def test_multiple_choice_is_judged_by_exact_letter(gold, pred, correct):
    assert eval_multi_choice(gold, pred) is correct
