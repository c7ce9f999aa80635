"""Judges responses against the MMMU answers and aggregates accuracy like the official evaluation.

Accuracy of a group (discipline, overall) is instance-level: correct answers over scored
questions, i.e. per-subject accuracies weighted by their question counts (`calculate_ins_level_acc`).
Pure functions over `Question`s and response strings: no model, no files.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llava_operator.api.mmmu import DISCIPLINE_OF, DISCIPLINES

from .data import MULTIPLE_CHOICE, Question
from .parse import (
    OpenPrediction,
    eval_multi_choice,
    eval_open,
    parse_multi_choice,
    parse_open_response,
)
from .prompts import option_letters


@dataclass(frozen=True)
class Prediction:
    """One judged question: a line of predictions.jsonl."""

    id: str
    subject: str
    question_type: str
    response: str
    parsed_pred: str | list[OpenPrediction]
    """The option letter (multiple choice) or the normalised candidates (open)."""
    answer: str | list[str] | None
    correct: bool | None
    """None when the question has no answer (test split)."""
    parse_rule: str | None = None
    """Multiple choice only: bracket, letter, text, random (a guess) or none."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fallback_rng(seed: int, question_id: str) -> random.Random:
    """The random-letter fallback's generator, one per question.

    The original draws from one global stream seeded with 42, so a question's guess depends on
    every question parsed before it. Seeding per question keeps guesses identical whatever the
    subset, order or sharding; the expected accuracy is the same.
    """
    return random.Random(f"{seed}:{question_id}")


def judge(question: Question, response: str, seed: int = 42) -> Prediction:
    """Parse one response and compare it with the question's answer."""
    gold = question.gold
    if question.is_multiple_choice:
        choice = parse_multi_choice(
            response, option_letters(question.options), fallback_rng(seed, question.id)
        )
        parsed: str | list[OpenPrediction] = choice.letter
        rule: str | None = choice.rule
        correct = None if gold is None else eval_multi_choice(gold, choice.letter)
    else:
        parsed = parse_open_response(response)
        rule = None
        correct = None if gold is None else eval_open(gold, parsed)
    return Prediction(
        id=question.id,
        subject=question.subject,
        question_type=question.question_type,
        response=response,
        parsed_pred=parsed,
        answer=gold,
        correct=correct,
        parse_rule=rule,
    )


def judge_all(
    questions: Sequence[Question], responses: Mapping[str, str], seed: int = 42
) -> tuple[list[Prediction], list[str]]:
    """Judge every question that has a response; also return the ids of those without one.

    Like the official `main_eval_only.py`, questions without a response are not counted; the
    caller reports them.
    """
    predictions, missing = [], []
    for question in questions:
        if question.id in responses:
            predictions.append(judge(question, responses[question.id], seed))
        else:
            missing.append(question.id)
    return predictions, missing


def _group(correct: int, questions: int) -> dict[str, Any]:
    accuracy = correct / questions if questions else None
    return {
        "accuracy": accuracy,
        "percent": None if accuracy is None else round(100 * accuracy, 2),
        "correct": correct,
        "questions": questions,
    }


def accuracy_table(predictions: Iterable[Prediction]) -> dict[str, Any]:
    """Overall, per-discipline and per-subject accuracy over the scored predictions.

    Only subjects with at least one prediction appear; `questions` counts scored questions (those
    with an answer). Accuracy is None where nothing was scored.
    """
    counts: dict[str, list[int]] = {}  # subject -> [correct, scored]
    for p in predictions:
        tally = counts.setdefault(p.subject, [0, 0])
        if p.correct is not None:
            tally[0] += int(p.correct)
            tally[1] += 1
    subjects = {
        s: {**_group(*counts[s]), "discipline": DISCIPLINE_OF.get(s)}
        for discipline_subjects in DISCIPLINES.values()
        for s in discipline_subjects
        if s in counts
    }
    disciplines = {}
    for discipline, members in DISCIPLINES.items():
        present = [s for s in members if s in counts]
        if present:
            disciplines[discipline] = {
                **_group(sum(counts[s][0] for s in present), sum(counts[s][1] for s in present)),
                "subjects": present,
            }
    overall = _group(sum(c for c, _ in counts.values()), sum(n for _, n in counts.values()))
    return {"overall": overall, "disciplines": disciplines, "subjects": subjects}


def official_output(predictions: Iterable[Prediction]) -> dict[str, str]:
    """{id: answer} as the official `run_llava.py` saves it: the parsed letter for multiple choice,
    the raw response for open questions (accepted by the official `main_eval_only.py` and by us)."""
    return {p.id: p.parsed_pred if p.question_type == MULTIPLE_CHOICE else p.response for p in predictions}
