"""User strings can never change the structure of a rendered manifest."""

from __future__ import annotations

import copy
from typing import Any

from llava_operator.api import LlavaRun
from llava_operator.backends import render_run
from llava_operator.backends.pytorchjob import PYTORCHJOB
from llava_operator.yamlio import dump_all, load_documents

from tests.helpers import EXAMPLES, load_yaml

EVIL = [
    "x\n  hostPath: {path: /}",
    "\"quoted\" 'single' {{ jinja }} {% raw %}",
    "---\napiVersion: v1\nkind: Secret",
    "key: value\nprivileged: true",
    "}}]] ]]} }",
]


def skeleton(obj: Any) -> Any:
    """The structure of a manifest with every string replaced by a placeholder."""
    if isinstance(obj, dict):
        return {k if k in SAFE_KEYS else "<key>": skeleton(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [skeleton(v) for v in obj]
    return "<str>" if isinstance(obj, str) else obj


SAFE_KEYS: set[str] = set()


def strings_of(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (k, *strings_of(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in strings_of(v)]
    return [obj] if isinstance(obj, str) else []


def with_strings(values: list[str]) -> dict[str, Any]:
    doc = copy.deepcopy(load_yaml(next(p for p in EXAMPLES if "multinode" in p.name)))
    spec = doc["spec"]
    spec["image"] = values[0]
    spec["placement"]["env"] = [{"name": "NCCL_DEBUG", "value": v} for v in values]
    spec["placement"]["nodeSelector"] = {"pool": values[1]}
    spec["placement"]["podAnnotations"] = {"note": values[2]}
    spec["placement"]["queueName"] = values[3]
    spec["placement"]["priorityClassName"] = values[4]
    spec["storage"]["data"]["source"] = {"persistentVolumeClaim": {"claimName": values[0]}}
    spec["paths"] = {"pretrainData": values[1], "languageModel": values[2]}
    spec["evaluate"]["subjects"] = ["Physics"]
    return doc


def test_hostile_strings_render_to_the_benign_structure():
    benign = render_run(PYTORCHJOB, LlavaRun.model_validate(with_strings([f"benign-{i}" for i in range(5)])))
    hostile_run = LlavaRun.model_validate(with_strings(EVIL))
    hostile = render_run(PYTORCHJOB, hostile_run)
    SAFE_KEYS.update(k for obj in benign for k in _keys(obj))
    assert skeleton(hostile) == skeleton(benign)
    rendered_strings = set(strings_of(hostile))
    for value in EVIL:
        assert value in rendered_strings, f"{value!r} was altered"
    # What `llavarun render` prints parses back to the same objects: no extra documents.
    assert load_documents_from_text(dump_all(hostile)) == hostile


def _keys(obj: Any):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _keys(v)


def load_documents_from_text(text: str) -> list[Any]:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return load_documents(f.name)
