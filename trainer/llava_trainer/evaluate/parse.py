"""MMMU answer parsing and per-question judging, with the official rules (MMMU-Benchmark/MMMU `eval_utils`).

Re-implemented from the rules, quirks included, so that our accuracies equal the official ones:

- multiple choice (`parse_multi_choice`): "(B)" wins over " B " which wins over option text (the latter
  only in responses of more than 5 words); when several options match, the one found last in the
  response wins; nothing found -> a seeded random letter (reported as such);
- open (`parse_open_response`): the shortest tail after an indicator word per line, plus every
  number in it, normalised (numbers -> float rounded to 2 places, text lower-cased);
- judging (`eval_multi_choice`, `eval_open`): letter equality; for open answers any parsed number
  equal to a gold number, or a gold string contained in a parsed string.

Pure functions, no I/O: the scorer and the tests call them directly.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

OpenPrediction = str | float
"""One normalised open-answer candidate: lower-cased text or a number rounded to 2 places."""

# Stripped from both ends of a multiple-choice response, one mark after the other, as the original does
# (so "B." and "B!" become "B", but whitespace is not stripped first: "B. " keeps its dot).
_EDGE_MARKS = (",", ".", "!", "?", ";", ":", "'")
_MIN_WORDS_FOR_TEXT_MATCH = 6
"""Option text is looked for only in responses of more than 5 words (short ones are letters or noise)."""

# Words after which the answer usually follows ("... the answer is 42"); "=" only on the last line.
_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL_TAILS = frozenset({":", ",", ".", "!", "?", ";", "'"})

# Numbers as the original finds them: three independent scans whose hits are all kept.
_THOUSANDS = re.compile(
    r"""-? \b \d{1,3} (?: ,\d{3} )+ \b""",  # 1,234 or -12,345,678
    re.VERBOSE,
)
_SCIENTIFIC = re.compile(
    r"""-? \d+ (?: \.\d+ )? [eE] [+-]? \d+""",  # 6.02e23, -1E-5
    re.VERBOSE,
)
_PLAIN = re.compile(
    r"""-? (?: \d+\.\d+ | \.\d+ | \d+\b )  # 3.14, .5, 42
        (?! [eE][+-]?\d+ )                  # not the mantissa of a scientific number
        (?! [,\d] )                         # not the head of a grouped number
    """,
    re.VERBOSE,
)


class ParsedChoice(NamedTuple):
    letter: str
    """The chosen option letter; "" only when the question has no options."""
    rule: str
    """Which rule decided: "bracket", "letter", "text", "random" or "none"."""


def parse_multi_choice(
    response: str, index2ans: Mapping[str, str], rng: random.Random | None = None
) -> ParsedChoice:
    """The option letter a free-form response picks (official `parse_multi_choice_response`).

    `index2ans` maps letters to option texts in order ({"A": "$6", "B": "$7"}); `rng` draws the
    fallback letter when nothing matches (the original draws from `random` seeded with 42).
    """
    choices = list(index2ans)
    if not choices:
        return ParsedChoice("", "none")
    for mark in _EDGE_MARKS:
        response = response.strip(mark)
    padded = f" {response} "  # so " A " also matches at either end

    bracketed = [c for c in choices if f"({c})" in padded]
    if bracketed:
        return ParsedChoice(_found_last(bracketed, lambda c: padded.rfind(f"({c})")), "bracket")
    spaced = [c for c in choices if f" {c} " in padded]
    if spaced:
        return ParsedChoice(_found_last(spaced, lambda c: padded.rfind(f" {c} ")), "letter")
    if len(padded.split()) >= _MIN_WORDS_FOR_TEXT_MATCH:
        lowered = padded.lower()
        quoted = [c for c in choices if str(index2ans[c]).lower() in lowered]
        if quoted:
            return ParsedChoice(
                _found_last(quoted, lambda c: lowered.rfind(str(index2ans[c]).lower())), "text"
            )
    return ParsedChoice((rng or random.Random(42)).choice(choices), "random")


def _found_last(candidates: Sequence[str], position: Callable[[str], int]) -> str:
    """The candidate occurring last; on a tie the earlier option (as numpy's argmax does)."""
    return max(candidates, key=position)


def parse_multi_choice_response(
    response: str, all_choices: Sequence[str], index2ans: Mapping[str, str], rng: random.Random | None = None
) -> str:
    """The official signature: only the letter. `all_choices` must be the keys of `index2ans`."""
    return parse_multi_choice(response, {c: index2ans[c] for c in all_choices}, rng).letter


def is_number(text: str) -> bool:
    """Whether `text` reads as a float once thousands separators are removed."""
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_str(text: str) -> list[OpenPrediction]:
    """A candidate or gold answer in comparable form.

    Numbers become floats rounded to 2 places; text is lower-cased, and a single character is
    padded with a space on either side (two variants) so that "a" does not match inside any word.
    """
    text = text.strip()
    if is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    if len(text) == 1:
        return [" " + text, text + " "]
    return [text]


def extract_numbers(text: str) -> list[str]:
    """Every number in `text`: grouped with commas, scientific, then plain (overlaps are kept)."""
    return _THOUSANDS.findall(text) + _SCIENTIFIC.findall(text) + _PLAIN.findall(text)


def key_subresponses(response: str) -> list[str]:
    """The parts of a response that likely hold the answer: per line, the shortest tail after an
    indicator word ("... is 42" -> "42"); the whole response when no line has one.

    The original also splits at ". " before a capital letter, but only after lower-casing, so in
    effect only line breaks split; we keep that behaviour.
    """
    response = response.strip().strip(".").lower()
    lines = response.split("\n")
    keys = []
    for i, line in enumerate(lines):
        indicators = (*_INDICATORS, "=") if i == len(lines) - 1 else _INDICATORS
        shortest = ""
        for indicator in indicators:
            if indicator in line:
                tail = line.rpartition(indicator)[2].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest not in _TRIVIAL_TAILS:
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list[OpenPrediction]:
    """The normalised candidates of an open answer (official `parse_open_response`): the key
    sub-responses and all numbers in them, without duplicates, in order of discovery."""
    keys = key_subresponses(response)
    candidates = keys + [number for key in keys for number in extract_numbers(key)]
    normalized = [value for candidate in candidates for value in normalize_str(candidate)]
    return list(dict.fromkeys(normalized))  # the original dedupes through a set; order is ours


def eval_multi_choice(gold: str | Sequence[str], pred: str) -> bool:
    """Exact letter match; a list of gold letters accepts any of them."""
    if isinstance(gold, str):
        return gold == pred
    return pred in gold


def eval_open(gold: str | Sequence[str], preds: Sequence[OpenPrediction]) -> bool:
    """Correct when a parsed number equals a gold number, or a gold text is inside a parsed text."""
    golds = [g for answer in ([gold] if isinstance(gold, str) else gold) for g in normalize_str(answer)]
    gold_texts = [g for g in golds if isinstance(g, str)]
    for pred in preds:
        if isinstance(pred, str):
            if any(g in pred for g in gold_texts):
                return True
        elif pred in golds:
            return True
    return False
