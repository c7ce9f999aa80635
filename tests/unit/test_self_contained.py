"""The product cites only itself: code, docs, the chart and the CRD descriptions users read with
`kubectl explain` never send a reader to a document that is not in this repository."""

from __future__ import annotations

import re

from tests.helpers import ROOT

SHIPPED = ["operator", "trainer", "charts", "crds", "docs", "examples", "bench", "README.md", "Dockerfile"]
OUTSIDE = re.compile(
    r"DESIGN(\.md)?\s*§|\.\./shared|shared/reference|llava-recipe\.md|reference/performance\.md"
)


def shipped_files() -> list:
    files = []
    for entry in SHIPPED:
        path = ROOT / entry
        files += [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return [p for p in files if "__pycache__" not in p.parts and p.suffix not in (".png", ".pyc")]


def test_no_shipped_file_cites_a_document_outside_the_repository():
    cited = {
        str(path.relative_to(ROOT)): sorted(
            {m.group(0) for m in OUTSIDE.finditer(path.read_text(errors="replace"))}
        )
        for path in shipped_files()
    }
    assert {path: found for path, found in cited.items() if found} == {}, "state the fact here or in docs/"
