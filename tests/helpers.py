"""Paths and loaders shared by the test tiers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llava_operator import yamlio

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("llavarun-*.yaml"))
INVALID_RUNS = sorted((ROOT / "tests" / "data" / "invalid-llavaruns").glob("*.yaml"))
SHARED = ROOT.parent / "shared"
PYTORCHJOB_CRD = SHARED / "crds" / "kubeflow.org_pytorchjobs.yaml"


def load_yaml(path: Path) -> Any:
    """The one document of a YAML file, read as `llavarun` reads user files."""
    (document,) = yamlio.load_documents(path)
    return document


def expected_field(path: Path) -> str:
    """The field an invalid-run case must name, from its `# expect:` header."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path} lacks an '# expect:' header"
    return first.removeprefix("# expect: ").strip()
