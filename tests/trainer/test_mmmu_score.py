"""Scoring a synthetic MMMU set with scripted responses against hand-computed accuracies, and the
`llava-trainer evaluate --responses` command that does it without a model (no torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from llava_operator.api.status import EvaluateResults
from llava_trainer.config import EvaluateConfig
from llava_trainer.evaluate.data import load_questions
from llava_trainer.evaluate.run import run, status_results
from llava_trainer.evaluate.score import accuracy_table, judge_all

sys.path.insert(0, str(Path(__file__).parent))
from mmmu_fixtures import question_row, write_split

CITIES = ["Paris", "London", "Berlin", "Madrid"]

# subject -> [(row, scripted response, correct?)]; the verdicts are worked out by hand from the rules.
SCRIPT = {
    "Art": [
        (question_row("validation_Art_1", "<image 1> Which city?", "B", CITIES), "(B)", True),
        (question_row("validation_Art_2", "Which city?", "A", CITIES), "The answer is C", False),
        (question_row("validation_Art_3", "How long is it?", "12"), "12 cm", True),
        (question_row("validation_Art_4", "Which city?", "D", CITIES), "D.", True),
    ],
    "Music": [
        (question_row("validation_Music_1", "Which city?", "A", CITIES), "B", False),
        (question_row("validation_Music_2", "Which process?", "photosynthesis"), "I do not know", False),
    ],
    "Accounting": [
        (question_row("validation_Accounting_1", "Which city?", "A", CITIES), "(A)", True),
        (
            question_row("validation_Accounting_2", "Which city?", "C", CITIES),
            "I would pick Berlin as the answer",
            True,
        ),
        (question_row("validation_Accounting_3", "Total?", "1234"), "The total is 1,234 dollars", True),
    ],
    "Physics": [
        (question_row("validation_Physics_1", "Which city?", "C", CITIES), "(C)", True),
        (
            question_row("validation_Physics_2", "Temperature?", "-5.5"),
            "The temperature is -5.5 degrees",
            True,
        ),
    ],
}
RESPONSES = {row["id"]: response for rows in SCRIPT.values() for row, response, _ in rows}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    for subject, rows in SCRIPT.items():
        write_split(tmp_path / "MMMU" / "MMMU", subject, "validation", [row for row, _, _ in rows])
    return tmp_path


def test_each_scripted_response_is_judged_as_worked_out_by_hand(data_dir: Path):
    questions, _ = load_questions(data_dir / "MMMU" / "MMMU", "validation")
    predictions, missing = judge_all(questions, RESPONSES)
    expected = {row["id"]: correct for rows in SCRIPT.values() for row, _, correct in rows}
    assert {p.id: p.correct for p in predictions} == expected
    assert missing == []


def test_accuracy_is_instance_weighted_per_discipline_and_overall(data_dir: Path):
    questions, _ = load_questions(data_dir / "MMMU" / "MMMU", "validation")
    table = accuracy_table(judge_all(questions, RESPONSES)[0])
    assert table["subjects"]["Art"]["percent"] == 75.0
    assert table["subjects"]["Music"]["percent"] == 0.0
    assert table["subjects"]["Accounting"]["percent"] == 100.0
    # Art and Design = (3 + 0) / (4 + 2) = 50%, not the mean of 75% and 0%.
    assert table["disciplines"]["Art and Design"] == {
        "accuracy": 0.5,
        "percent": 50.0,
        "correct": 3,
        "questions": 6,
        "subjects": ["Art", "Music"],
    }
    assert table["disciplines"]["Business"]["percent"] == 100.0
    assert table["disciplines"]["Science"]["percent"] == 100.0
    assert table["overall"] == {"accuracy": 8 / 11, "percent": 72.73, "correct": 8, "questions": 11}
    assert list(table["disciplines"]) == ["Art and Design", "Business", "Science"]


def _evaluate(data_dir: Path, responses: dict, **flags) -> dict:
    path = data_dir / "responses.json"
    path.write_text(json.dumps(responses))
    assert run(EvaluateConfig(data_dir=data_dir, responses=path, **flags)) == 0
    return json.loads((data_dir / "Output" / "evaluate" / "results.json").read_text())


def test_responses_file_is_scored_without_a_model_into_all_outputs(data_dir: Path):
    results = _evaluate(data_dir, RESPONSES, subjects=list(SCRIPT))
    out = data_dir / "Output" / "evaluate"
    assert results["overall"]["percent"] == 72.73
    assert results["disciplines"]["Art and Design"]["percent"] == 50.0
    assert results["subjects"]["Physics"] == {
        "accuracy": 1.0,
        "percent": 100.0,
        "correct": 2,
        "questions": 2,
        "discipline": "Science",
    }
    assert results["counts"]["questions"] == 11 and results["counts"]["open"] == 4
    assert results["responses_file"] == str(data_dir / "responses.json")
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert lines[0] == {
        "id": "validation_Art_1",
        "subject": "Art",
        "question_type": "multiple-choice",
        "response": "(B)",
        "parsed_pred": "B",
        "answer": "B",
        "correct": True,
        "parse_rule": "bracket",
    }
    assert lines[2]["parsed_pred"] == ["12 cm", 12.0] and "parse_rule" not in lines[2]
    official = json.loads((out / "responses.json").read_text())
    assert official["validation_Art_2"] == "C" and official["validation_Art_3"] == "12 cm"
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# MMMU validation: 72.73% (8/11)")
    assert "| **Art and Design** | **6** | **50.00** |" in summary


def test_the_official_output_file_scores_the_same_when_fed_back(data_dir: Path):
    first = _evaluate(data_dir, RESPONSES, subjects=list(SCRIPT))
    official = json.loads((data_dir / "Output" / "evaluate" / "responses.json").read_text())
    assert _evaluate(data_dir, official, subjects=list(SCRIPT))["overall"] == first["overall"]


def test_missing_unknown_and_invalid_responses_are_reported_not_scored(data_dir: Path):
    responses = {k: v for k, v in RESPONSES.items() if k != "validation_Physics_2"}
    responses["validation_Art_99"] = "(A)"
    responses["validation_Music_1"] = ["B"]
    results = _evaluate(data_dir, responses)
    problems = results["problems"]
    assert problems["missing_responses"] == ["validation_Music_1", "validation_Physics_2"]
    assert problems["unknown_response_ids"] == ["validation_Art_99"]
    assert problems["invalid_responses"] == ["validation_Music_1"]
    assert len(problems["missing_subjects"]) == 26
    assert results["overall"]["questions"] == 9  # like the official eval: only answered ones count
    summary = (data_dir / "Output" / "evaluate" / "summary.md").read_text()
    assert "2 questions without a response in the responses file (not scored)" in summary


def test_unmatched_responses_are_counted_and_the_matching_ones_scored(data_dir: Path):
    responses = {"validation_Art_1": "(B)", "dev_Art_1": "(A)", "validation_Art_99": "(C)"}
    results = _evaluate(data_dir, responses, subjects=["Art"])
    assert results["overall"] == {"accuracy": 1.0, "percent": 100.0, "correct": 1, "questions": 1}
    assert results["counts"]["unmatched_responses"] == 2 and results["counts"]["missing_responses"] == 3
    summary = (data_dir / "Output" / "evaluate" / "summary.md").read_text()
    assert "2 response ids that match no loaded question (ignored): dev_Art_1, validation_Art_99" in summary


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"dev_Art_1": "(A)", "dev_Art_2": "B"}',
            "none of its 2 ids matches a loaded question (e.g. 'dev_Art_1'",
        ),
        (
            '{"dev_Art_1": "(A)"}',
            "the questions' ids look like 'validation_Art_1'): check --split and --subjects",
        ),
        (
            '{"validation_Physics_1": "(C)"}',
            "none of its 1 ids matches a loaded question",
        ),  # not in --subjects
        ("{}", "it holds no responses ({}): nothing to score"),
        ('{"validation_Art_1": ["B"], "validation_Art_2": 3}', "none of the 2 responses whose ids match"),
        ('{"validation_Art_1": ["B"]}', "is a string (e.g. 'validation_Art_1': ['B'])"),
        ('["(A)"]', "expected a JSON object {question_id: response}, got a list"),
        ('{"validation_Art_1": "(A)"', "not valid JSON: Expecting"),
        (None, "no such file (relative paths are relative to --data-dir)"),
    ],
)
def test_a_responses_file_that_scores_nothing_is_refused(data_dir: Path, caplog, content, message):
    """Exit 2 naming the file and what is wrong; no results that look like a finished evaluation."""
    path = data_dir / "responses.json"
    if content is not None:
        path.write_text(content)
    assert run(EvaluateConfig(data_dir=data_dir, responses=path, subjects=["Art"])) == 2
    assert f"cannot score the responses file {path}: " in caplog.text and message in caplog.text
    assert not (data_dir / "Output" / "evaluate" / "results.json").exists()


def test_a_split_without_answers_is_answered_but_not_scored(tmp_path: Path):
    write_split(tmp_path / "MMMU" / "MMMU", "Art", "test", [question_row("test_Art_1", "Q?", "?", CITIES)])
    results = _evaluate(tmp_path, {"test_Art_1": "(A)"}, split="test", subjects=["Art"])
    assert results["overall"] == {"accuracy": None, "percent": None, "correct": 0, "questions": 0}
    assert results["problems"]["unanswered"] == ["test_Art_1"]
    official = json.loads((tmp_path / "Output" / "evaluate" / "responses.json").read_text())
    assert official == {"test_Art_1": "A"}  # the submission format


def test_nothing_to_evaluate_exits_with_2(tmp_path: Path):
    (tmp_path / "MMMU" / "MMMU").mkdir(parents=True)
    (tmp_path / "r.json").write_text("{}")
    assert run(EvaluateConfig(data_dir=tmp_path, responses=Path("r.json"))) == 2


def test_status_results_fit_the_llavarun_status_model(data_dir: Path):
    results = _evaluate(data_dir, RESPONSES, subjects=list(SCRIPT))
    fields = status_results(results, Path("/out/results.json"))
    status = EvaluateResults.model_validate(fields)
    assert status.overall == 72.73
    assert status.disciplines == {"Art and Design": 50.0, "Business": 100.0, "Science": 100.0}
    assert status.questions == 11 and status.split == "validation"


def test_cli_scores_a_responses_file_without_importing_torch(data_dir: Path):
    (data_dir / "responses.json").write_text(json.dumps(RESPONSES))
    code = (
        "import sys; from llava_trainer.cli import main; "
        f"rc = main(['evaluate', '--data-dir', {str(data_dir)!r}, '--responses', 'responses.json', "
        "'--subjects', 'Art,Music,Accounting,Physics']); "
        "assert 'torch' not in sys.modules, 'scoring imported torch'; sys.exit(rc)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LLAVARUN_STATUS_FILE")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "MMMU validation accuracy: 72.73% (8/11)" in done.stderr
    assert (data_dir / "Output" / "evaluate" / "summary.md").is_file()
