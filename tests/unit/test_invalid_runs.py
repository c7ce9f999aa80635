"""Each invalid LlavaRun of the shared data set fails `llavarun validate`, naming its field.

The control-plane tests replay the same files against a real apiserver.
"""

from __future__ import annotations

import pytest
from llava_operator.cli import main
from llava_operator.validate import problems

from tests.helpers import EXAMPLES, INVALID_RUNS, expected_field, load_yaml


def test_data_set_is_large_enough():
    assert len(INVALID_RUNS) >= 20


@pytest.mark.parametrize("path", INVALID_RUNS, ids=lambda p: p.stem)
def test_invalid_run_is_rejected_naming_the_field(path):
    found = problems(load_yaml(path))
    assert found, f"{path.name} was accepted"
    field = expected_field(path)

    def names_field(p) -> bool:
        if p.path == field or p.path.startswith((f"{field}[", f"{field}.")):
            return True
        # A rule over several fields (as the CRD's CEL) is reported on their parent, naming the field first.
        return field.startswith(f"{p.path}.") and p.message.startswith(field.removeprefix(f"{p.path}."))

    named = [p for p in found if names_field(p)]
    assert named, f"expected {field}, got {[str(p) for p in found]}"


@pytest.mark.parametrize("path", INVALID_RUNS[:3], ids=lambda p: p.stem)
def test_cli_reports_field_and_fails(path, capsys):
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert expected_field(path) in err and "bad-run" in err


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_are_valid(path):
    assert problems(load_yaml(path)) == []


def test_quoted_number_is_not_an_integer():
    doc = load_yaml(EXAMPLES[0])
    doc["spec"]["retries"] = "3"
    assert [p.path for p in problems(doc)] == ["spec.retries"]


def test_longest_allowed_name_is_accepted():
    doc = load_yaml(EXAMPLES[0])
    doc["metadata"]["name"] = "a" * 39
    assert problems(doc) == []
