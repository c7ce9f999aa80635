"""YAML in and out. Output is always produced by a YAML emitter from data, never from text."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


class _Dumper(yaml.SafeDumper):
    """Block style, keys in insertion order, no anchors (kubectl and diffs read it plainly)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_representer)


def dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def dump_all(objs: Iterable[Any]) -> str:
    return yaml.dump_all(list(objs), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """All non-empty YAML documents in a file ('-' reads stdin)."""
    import sys

    text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
    return [d for d in yaml.safe_load_all(text) if d is not None]
