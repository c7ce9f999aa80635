"""The evaluate stage's outputs: results.json, predictions.jsonl, responses.json and summary.md.

Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .score import Prediction, official_output

RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.jsonl"
RESPONSES_FILE = "responses.json"
"""{question_id: answer} in the official MMMU output format (MC letters parsed, open answers raw)."""
SUMMARY_FILE = "summary.md"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_outputs(
    output_dir: Path, results: dict[str, Any], predictions: Sequence[Prediction]
) -> dict[str, Path]:
    """Write all four files; returns their paths by name."""
    paths = {
        "results": output_dir / RESULTS_FILE,
        "predictions": output_dir / PREDICTIONS_FILE,
        "responses": output_dir / RESPONSES_FILE,
        "summary": output_dir / SUMMARY_FILE,
    }
    _write_atomic(paths["results"], json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    lines = [json.dumps(_prediction_line(p), ensure_ascii=False) for p in predictions]
    _write_atomic(paths["predictions"], "".join(line + "\n" for line in lines))
    _write_atomic(
        paths["responses"], json.dumps(official_output(predictions), indent=2, ensure_ascii=False) + "\n"
    )
    _write_atomic(paths["summary"], summary_markdown(results))
    return paths


def _prediction_line(p: Prediction) -> dict[str, Any]:
    line = p.as_dict()
    if p.parse_rule is None:
        del line["parse_rule"]
    return line


def _percent(group: dict[str, Any]) -> str:
    return "n/a" if group["percent"] is None else f"{group['percent']:.2f}"


def summary_markdown(results: dict[str, Any]) -> str:
    """A human summary in the shape of the official `print_results.py` table, plus any problems."""
    overall = results["overall"]
    lines = [
        f"# MMMU {results['split']}: {_percent(overall)}% ({overall['correct']}/{overall['questions']})",
        "",
    ]
    source = results.get("model") or results.get("responses_file")
    if source:
        lines += [f"Source: `{source}`", ""]
    lines += ["| discipline / subject | questions | accuracy (%) |", "|---|---:|---:|"]
    for name, group in results["disciplines"].items():
        lines.append(f"| **{name}** | **{group['questions']}** | **{_percent(group)}** |")
        for subject in group["subjects"]:
            sub = results["subjects"][subject]
            lines.append(f"| {subject} | {sub['questions']} | {_percent(sub)} |")
    lines.append(f"| **Overall** | **{overall['questions']}** | **{_percent(overall)}** |")
    counts = results["counts"]
    lines += [
        "",
        f"Questions: {counts['questions']} ({counts['multiple_choice']} multiple choice, {counts['open']} open); "
        f"scored {counts['scored']}; multiple-choice answers guessed by the random fallback: "
        f"{counts['random_fallbacks']}.",
    ]
    settings = results.get("settings") or {}
    if settings:
        lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + "."]
    problems = results.get("problem_summary") or []
    if problems:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"
