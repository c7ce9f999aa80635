"""Offline validation of LlavaRun manifests, with errors a person can act on.

The same rules the apiserver applies (schema bounds, enums, unknown fields, CEL rules) are
enforced by the pydantic models; this module only turns their findings into messages that
name the object, the field path, the offending value and what is allowed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .api import KIND, LlavaRun
from .yamlio import Document


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    value: Any = None

    def __str__(self) -> str:
        shown = "" if self.value is None else f" (got {self.value!r})"
        return f"{self.path}: {self.message}{shown}"


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(object)"


def _message(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field (not in the LlavaRun v1alpha1 schema)"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error" or kind == "enum":
        expected = error.get("ctx", {}).get("expected", "")
        return f"must be one of {expected}"
    msg = error["msg"]
    return msg.removeprefix("Value error, ")


def problems(document: dict[str, Any]) -> list[Problem]:
    """Everything wrong with one LlavaRun document (empty when it is valid)."""
    if not isinstance(document, dict):
        return [Problem("(document)", "must be a mapping (a Kubernetes object)")]
    try:
        # Strict JSON-mode validation gives the apiserver's typing: "3" is not an integer,
        # 3 is a valid number, enum values are plain strings.
        LlavaRun.model_validate_json(json.dumps(document), strict=True)
    except ValidationError as err:
        found = []
        for e in err.errors():
            value = None if e["type"] in ("missing", "extra_forbidden") else e.get("input")
            if isinstance(value, dict | list):
                value = None
            found.append(Problem(_path(e["loc"]), _message(e), value))
        return found
    return []


def describe(document: Any) -> str:
    if isinstance(document, dict):
        name = (document.get("metadata") or {}).get("name", "<unnamed>")
        return f"{document.get('kind', KIND)} {name}"
    return "document"


def name_clashes(documents: Sequence[Document]) -> dict[int, Problem]:
    """By index, the documents that reuse an earlier document's kind, namespace and name:
    kubectl would apply both to one object, so one of them would silently be lost."""
    first: dict[tuple[Any, ...], Document] = {}
    clashes = {}
    for index, document in enumerate(documents):
        data = document.data
        metadata = data.get("metadata") if isinstance(data, dict) else None
        if not isinstance(metadata, dict):
            continue
        key = (data.get("kind"), metadata.get("namespace"), metadata.get("name"))
        if not isinstance(key[2], str) or not all(isinstance(part, str | None) for part in key):
            continue
        if key in first:
            where = f" in namespace {key[1]}" if key[1] else ""
            clashes[index] = Problem(
                "metadata.name",
                f"{key[2]!r}{where} is already used by the document at line {first[key].line}; "
                "names must be unique (kubectl would apply both to the same object)",
            )
        else:
            first[key] = document
    return clashes


def check_documents(documents: Sequence[Document]) -> list[list[Problem]]:
    """Per document of one file: its own problems, then a clash with an earlier document's name."""
    clashes = name_clashes(documents)
    return [problems(d.data) + ([clashes[i]] if i in clashes else []) for i, d in enumerate(documents)]


def data_problems(document: dict[str, Any], data_dir: Path) -> list[Problem]:
    """What a valid run would miss in `data_dir`, as `llavarun local` checks before it starts: the
    layout, checkpoints, a task finetune's LLaVA model, inputs no stage of the run produces."""
    from .local.preflight import check_inputs  # the trainer's file checks: only with a data_dir

    found = check_inputs(load_run(document), data_dir)
    return [Problem("data_dir", message.replace("\n", "\n  ")) for message in found]


def _report(document: Any, found: Sequence[Problem]) -> str:
    return f"{describe(document)} is invalid:\n" + "\n".join(f"  {p}" for p in found)


def _parse(document: dict[str, Any]) -> LlavaRun:
    return LlavaRun.model_validate_json(json.dumps(document), strict=True)


def load_run(document: dict[str, Any]) -> LlavaRun:
    """Parse a LlavaRun or raise ValueError with every problem, one per line."""
    found = problems(document)
    if found:
        raise ValueError(_report(document, found))
    return _parse(document)


def load_runs(documents: Sequence[Document]) -> list[LlavaRun]:
    """Every document of one file as a LlavaRun, or ValueError with every problem of every document."""
    reports = [
        f"{d.where}: {_report(d.data, found)}"
        for d, found in zip(documents, check_documents(documents), strict=True)
        if found
    ]
    if reports:
        raise ValueError("\n".join(reports))
    return [_parse(d.data) for d in documents]
