"""Reads the MMMU parquet files of a local copy of the Hugging Face dataset `MMMU/MMMU`.

Layout: `<mmmu_dir>/<Subject>/<split>-*.parquet`, one directory per subject (the dataset's configs).
Questions are read in two passes so that memory stays small: `load_questions` reads the text columns
of every file (cheap; enough for scoring a responses file), `load_images` then reads the image
columns only for the questions a rank will actually ask. Nothing is dropped silently: every
missing subject or split, unreadable file, malformed row or unanswered question is listed in a
`Problems`, which ends up in results.json.
"""

from __future__ import annotations

import ast
import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_operator.api.mmmu import SUBJECTS

SPLITS = ("dev", "validation", "test")
MAX_IMAGES = 7
"""MMMU questions carry image_1 … image_7."""
REQUIRED_COLUMNS = ("id", "question", "options", "answer", "question_type")
OPTIONAL_COLUMNS = ("explanation", "img_type", "topic_difficulty", "subfield")
MULTIPLE_CHOICE = "multiple-choice"
NO_ANSWER = ("", "?")
"""Answer values that mean "withheld" (the test split), besides null."""


@dataclass
class Question:
    """One MMMU question, as in the parquet row (options already parsed into a list)."""

    id: str
    subject: str
    question: str
    options: list[str]
    answer: str | None
    question_type: str
    explanation: str | None = None
    img_type: str | None = None
    topic_difficulty: str | None = None
    subfield: str | None = None
    source: Path | None = None
    """The parquet file and row this came from, so images can be read later."""
    row: int = 0
    images: dict[int, bytes] = field(default_factory=dict, repr=False)
    """image index (1-based) -> encoded image bytes, filled by `load_images`."""

    @property
    def is_multiple_choice(self) -> bool:
        # Like the original, everything that is not multiple choice is judged as open.
        return self.question_type == MULTIPLE_CHOICE

    @property
    def gold(self) -> str | list[str] | None:
        """The answer to judge against: a letter, a text, a list of accepted texts, or None if withheld.

        Some open answers are stored as a Python list in a string ("['24/7', '3.429']"); the official
        answer dictionary has them as lists, any of which is accepted.
        """
        answer = self.answer
        if answer is None or answer.strip() in NO_ANSWER:
            return None
        if answer.startswith("[") and answer.endswith("]"):
            try:
                parsed = ast.literal_eval(answer)
            except (ValueError, SyntaxError):
                return answer
            if isinstance(parsed, list) and parsed:
                return [str(a) for a in parsed]
        return answer


@dataclass
class Problems:
    """Everything that is not as expected (data, images, responses); serialised into results.json."""

    missing_subjects: list[str] = field(default_factory=list)
    """Subjects with no directory under the MMMU root."""
    missing_splits: dict[str, list[str]] = field(default_factory=dict)
    """Subject -> the splits it does have, for subjects lacking the requested split."""
    unreadable_files: dict[str, str] = field(default_factory=dict)
    """File -> error."""
    invalid_options: list[str] = field(default_factory=list)
    """Question ids whose options are not a Python list literal (asked with no options)."""
    unknown_question_types: list[str] = field(default_factory=list)
    """Question ids whose question_type is neither multiple-choice nor open (judged as open)."""
    duplicate_ids: list[str] = field(default_factory=list)
    """Ids seen more than once; only the first is kept."""
    unanswered: list[str] = field(default_factory=list)
    """Question ids without an answer (the test split): generated, but not scored."""
    image_errors: dict[str, str] = field(default_factory=dict)
    """Question id -> why an image could not be read or decoded (the question is asked without it)."""
    generation_errors: dict[str, str] = field(default_factory=dict)
    """Question id -> why the model failed on it (empty response, judged wrong)."""
    missing_responses: list[str] = field(default_factory=list)
    """Questions the responses file has no answer for (not scored, as in the official eval)."""
    unknown_response_ids: list[str] = field(default_factory=list)
    """Ids in the responses file that are not among the loaded questions (ignored)."""
    invalid_responses: list[str] = field(default_factory=list)
    """Ids in the responses file whose value is not a string (not scored)."""

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def summary_lines(self) -> list[str]:
        """One human line per kind of problem, for the log and summary.md."""
        lines = []
        if self.missing_subjects:
            lines.append(f"{len(self.missing_subjects)} subjects missing: {', '.join(self.missing_subjects)}")
        for subject, present in self.missing_splits.items():
            lines.append(
                f"{subject}: no split files for this split (present: {', '.join(present) or 'none'})"
            )
        for path, error in self.unreadable_files.items():
            lines.append(f"unreadable parquet file {path}: {error}")
        named = {
            "invalid_options": "questions with options that are not a list (asked without options)",
            "unknown_question_types": "questions of an unknown type (judged as open)",
            "duplicate_ids": "duplicate question ids (first kept)",
            "unanswered": "questions without an answer (not scored)",
            "missing_responses": "questions without a response in the responses file (not scored)",
            "unknown_response_ids": "response ids that match no loaded question (ignored)",
            "invalid_responses": "responses that are not strings (not scored)",
        }
        for attr, text in named.items():
            ids = getattr(self, attr)
            if ids:
                lines.append(f"{len(ids)} {text}: {_preview(ids)}")
        if self.image_errors:
            lines.append(
                f"{len(self.image_errors)} questions asked without (some of) their images: "
                + _preview([f"{qid} ({why})" for qid, why in self.image_errors.items()], 3)
            )
        if self.generation_errors:
            lines.append(
                f"{len(self.generation_errors)} questions the model failed on (empty response): "
                + _preview([f"{qid} ({why})" for qid, why in self.generation_errors.items()], 3)
            )
        return lines


def _preview(ids: Sequence[str], limit: int = 10) -> str:
    more = f" … (+{len(ids) - limit})" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def split_files(subject_dir: Path, split: str) -> list[Path]:
    """The parquet shards of one split (`validation-00000-of-00001.parquet`, …), in name order."""
    return sorted(subject_dir.glob(f"{split}-*.parquet"))


def load_questions(
    mmmu_dir: Path, split: str, subjects: Sequence[str] = ()
) -> tuple[list[Question], Problems]:
    """All questions of `split` for `subjects` (default: all 30), in MMMU subject order then file order.

    Raises FileNotFoundError only when `mmmu_dir` itself is missing; any other gap is recorded in
    the returned `Problems`.
    """
    import pyarrow.parquet as pq

    if not mmmu_dir.is_dir():
        raise FileNotFoundError(
            f"MMMU data not found: {mmmu_dir} is not a directory; expected <Subject>/{split}-*.parquet "
            "under it (a local copy of the Hugging Face dataset MMMU/MMMU; see --mmmu-dir)"
        )
    problems = Problems()
    questions: list[Question] = []
    seen: set[str] = set()
    wanted = set(subjects or SUBJECTS)
    for subject in (s for s in SUBJECTS if s in wanted):  # the canonical order, whatever the flag's
        subject_dir = mmmu_dir / subject
        if not subject_dir.is_dir():
            problems.missing_subjects.append(subject)
            continue
        files = split_files(subject_dir, split)
        if not files:
            present = [s for s in SPLITS if split_files(subject_dir, s)]
            problems.missing_splits[subject] = present
            continue
        for path in files:
            try:
                available = set(pq.read_schema(path).names)
                missing = [c for c in REQUIRED_COLUMNS if c not in available]
                if missing:
                    raise ValueError(f"missing columns {missing}")
                columns = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in available]
                rows = pq.read_table(path, columns=columns).to_pylist()
            except Exception as err:  # any unreadable file is reported, the rest still evaluated
                problems.unreadable_files[str(path)] = f"{type(err).__name__}: {err}"
                continue
            for index, row in enumerate(rows):
                question = _question(row, subject, path, index, problems)
                if question.id in seen:
                    problems.duplicate_ids.append(question.id)
                    continue
                seen.add(question.id)
                questions.append(question)
                if question.gold is None:
                    problems.unanswered.append(question.id)
    return questions, problems


def _question(row: dict[str, Any], subject: str, path: Path, index: int, problems: Problems) -> Question:
    qid = str(row["id"])
    options = _options(row.get("options"))
    if options is None:
        problems.invalid_options.append(qid)
        options = []
    question_type = str(row.get("question_type") or "")
    if question_type not in (MULTIPLE_CHOICE, "open"):
        problems.unknown_question_types.append(qid)
    return Question(
        id=qid,
        subject=subject,
        question=str(row.get("question") or ""),
        options=options,
        answer=None if row.get("answer") is None else str(row["answer"]),
        question_type=question_type,
        explanation=row.get("explanation"),
        img_type=row.get("img_type"),
        topic_difficulty=row.get("topic_difficulty"),
        subfield=row.get("subfield"),
        source=path,
        row=index,
    )


def _options(raw: Any) -> list[str] | None:
    """The options column is a string holding a Python list ("['$6', '$7']"); None if it is not."""
    if isinstance(raw, list):
        return [str(o) for o in raw]
    if raw is None:
        return []
    try:
        parsed = ast.literal_eval(str(raw))
    except (ValueError, SyntaxError):
        return None
    return [str(o) for o in parsed] if isinstance(parsed, list | tuple) else None


def load_images(questions: Iterable[Question], wanted: dict[str, list[int]], problems: Problems) -> None:
    """Fill `Question.images` with the encoded bytes of the wanted image indices (id -> [1, 3]).

    Reads only those image columns, one file at a time. A wanted image that is null, has no bytes
    or cannot be read is recorded in `problems.image_errors`.
    """
    import pyarrow.parquet as pq

    by_file: dict[Path, list[Question]] = defaultdict(list)
    for question in questions:
        if wanted.get(question.id) and question.source is not None:
            by_file[question.source].append(question)
    for path, file_questions in by_file.items():
        indices = sorted({i for q in file_questions for i in wanted[q.id]})
        try:
            available = set(pq.read_schema(path).names)
            columns = [f"image_{i}" for i in indices if f"image_{i}" in available]
            table = pq.read_table(path, columns=columns)
        except Exception as err:
            for q in file_questions:
                problems.image_errors[q.id] = f"cannot read images from {path}: {type(err).__name__}: {err}"
            continue
        for q in file_questions:
            for i in wanted[q.id]:
                name = f"image_{i}"
                cell = table.column(name)[q.row].as_py() if name in columns else None
                data = cell.get("bytes") if isinstance(cell, dict) else None
                if data:
                    q.images[i] = data
                else:
                    problems.image_errors.setdefault(q.id, f"{name} is empty (null or no bytes)")


def decode_image(data: bytes) -> Any:
    """An RGB PIL image from encoded bytes (PNG, JPEG, …); raises ValueError on undecodable data."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        # PIL's message names a BytesIO object's address; say what is wrong instead.
        raise ValueError(f"not a recognised image format ({len(data)} bytes starting {data[:8]!r})") from None
