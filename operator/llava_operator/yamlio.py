"""YAML in and out, typed the way kubectl types it, and safe on untrusted input.

`kubectl apply` turns YAML into JSON with sigs.k8s.io/yaml (go-yaml v2), so `2e-3` is a number
there while PyYAML's YAML 1.1 rules make it a string. Input is read with kubectl's rules for
unquoted scalars, so `llavarun validate` types every value as the apiserver will see it; output
is written with the same rules, so a string that kubectl would read as a number or boolean is
quoted. Input is also bounded: no aliases (an alias bomb of a few KB expands to gigabytes), no
duplicate keys, no nesting deeper than any LlavaRun needs, no file larger than the apiserver
accepts. Every refusal is a `YamlInputError` naming the file, line and column.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode
from yaml.parser import Parser
from yaml.reader import Reader, ReaderError
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

MAX_BYTES = 3 * 1024 * 1024
"""The kube-apiserver's request body limit: a larger LlavaRun file could never be applied."""
MAX_DEPTH = 64
"""Nesting limit; the deepest LlavaRun field (an affinity term's values) is about 10 levels down."""

_TAG = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL = (f"{_TAG}{t}" for t in ("str", "int", "float", "bool", "null"))
TIMESTAMP, MERGE, SEQ, MAP = (f"{_TAG}{t}" for t in ("timestamp", "merge", "seq", "map"))

# go-yaml v2's resolve table (go.yaml.in/yaml/v2 resolve.go), as used by kubectl.
_BOOLS = {
    **dict.fromkeys(["y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"], True),
    **dict.fromkeys(["n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"], False),
}
_NULLS = {"", "~", "null", "Null", "NULL"}
_SPECIAL_FLOATS = {
    **dict.fromkeys((".nan", ".NaN", ".NAN"), math.nan),
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), math.inf),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), -math.inf),
}
# Go's ParseInt(s, 0, 64) syntax (after go-yaml drops every '_'): 0b, 0o, 0x and leading-0 octal.
_INT = re.compile(r"[-+]?(0[bB][01]+|0[oO][0-7]+|0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_DOT_FLOAT = re.compile(r"\.[0-9]+([eE][-+]?[0-9]+)?")
# Dates go-yaml turns into timestamps (kubectl then rewrites them as RFC 3339 strings).
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([Tt ][0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}.*)?")


def kubectl_tag(text: str) -> str:
    """The tag kubectl gives an unquoted scalar: YAML 1.2-style numbers, YAML 1.1 booleans."""
    if text in _BOOLS:
        return BOOL
    if text in _NULLS:
        return NULL
    if text in _SPECIAL_FLOATS:
        return FLOAT
    if text == "<<":
        return MERGE
    if text[0] == ".":
        return FLOAT if _DOT_FLOAT.fullmatch(text) else STR
    if text[0] in "+-0123456789":
        if _TIMESTAMP.fullmatch(text):
            return TIMESTAMP
        plain = text.replace("_", "")
        if _INT.fullmatch(plain):
            return INT
        if _FLOAT.fullmatch(plain) and math.isfinite(float(plain)):  # Go: out of range -> a string
            return FLOAT
    return STR


class _KubectlResolver(BaseResolver):
    def resolve(self, kind: type[Node], value: Any, implicit: tuple[bool, bool]) -> str:
        if kind is ScalarNode and implicit[0]:
            return kubectl_tag(value)
        return super().resolve(kind, value, implicit)


class YamlInputError(ValueError):
    """A file that is not acceptable LlavaRun YAML, located as precisely as is known."""

    def __init__(self, source: str, message: str, line: int | None = None, column: int | None = None):
        where = (
            source if line is None else f"{source}:{line}" if column is None else f"{source}:{line}:{column}"
        )
        super().__init__(f"{where}: {message}")
        self.source, self.line, self.column = source, line, column


def _refuse(node: Node, message: str) -> ConstructorError:
    return ConstructorError(None, None, message, node.start_mark)


class _BoundedComposer(Composer):
    """Refuses aliases before anything is expanded, and nesting deeper than MAX_DEPTH."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ComposerError(
                None, None, f"alias *{event.anchor} refused: YAML anchors and aliases are not accepted "
                "in LlavaRun files (write the value out)", event.start_mark,
            )  # fmt: skip
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _int(text: str) -> int:
    plain = text.replace("_", "")
    if not _INT.fullmatch(plain):
        raise ValueError(f"{text!r} is not an integer")
    sign, body = (-1, plain[1:]) if plain[0] == "-" else (1, plain.lstrip("+"))
    base = 0 if body[:2].lower() in ("0b", "0o", "0x") else 8 if len(body) > 1 and body[0] == "0" else 10
    try:
        return sign * int(body, base)
    except ValueError:  # only Python's digit limit remains (thousands of digits)
        raise ValueError(f"an integer of {len(body)} digits is too large") from None


def _bool(text: str) -> bool:
    if text not in _BOOLS:
        raise ValueError(f"{text!r} is not a boolean")
    return _BOOLS[text]


def _float(text: str) -> float:
    plain = text.replace("_", "")
    if text in _SPECIAL_FLOATS:
        value = _SPECIAL_FLOATS[text]
    elif _INT.fullmatch(plain):
        value = float(_int(text))
    elif _FLOAT.fullmatch(plain):
        value = float(plain)
    else:
        raise ValueError(f"{text!r} is not a number")
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number; JSON, and so kubectl, cannot carry it")
    return value


class _JsonConstructor(SafeConstructor):
    """Builds only what JSON can hold; duplicate keys and merge keys are refused."""

    yaml_constructors: dict[Any, Any] = {}

    def _scalar(self, node: Node, parse: Any) -> Any:
        try:
            return parse(self.construct_scalar(node))
        except ValueError as err:
            raise _refuse(node, str(err)) from None

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[str, Any]:
        if not isinstance(node, MappingNode):
            raise _refuse(node, "expected a mapping")
        mapping: dict[str, Any] = {}
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node)
            if key in mapping:
                raise _refuse(key_node, f"duplicate key {key!r} (first at line {lines[key]})")
            mapping[key] = self.construct_object(value_node, deep=deep)
            lines[key] = key_node.start_mark.line + 1
        return mapping

    def _key(self, node: Node) -> str:
        """A mapping key as the JSON key kubectl makes of it."""
        if node.tag == MERGE:
            raise _refuse(node, "merge keys (<<) are not accepted in LlavaRun files (write the keys out)")
        key = self.construct_object(node, deep=True) if isinstance(node, ScalarNode) else None
        if isinstance(key, bool):
            return "true" if key else "false"
        if isinstance(key, int | str):
            return str(key)
        raise _refuse(node, "mapping keys must be strings")

    def construct_other(self, node: Node) -> Any:
        raise _refuse(
            node, f"tag {node.tag.replace(_TAG, '!!')} is not accepted: a LlavaRun holds only strings, "
            "numbers, booleans, null, lists and mappings",
        )  # fmt: skip


_JsonConstructor.add_constructor(STR, SafeConstructor.construct_yaml_str)
_JsonConstructor.add_constructor(TIMESTAMP, SafeConstructor.construct_yaml_str)  # kept as written
_JsonConstructor.add_constructor(NULL, SafeConstructor.construct_yaml_null)
_JsonConstructor.add_constructor(BOOL, lambda c, n: c._scalar(n, _bool))
_JsonConstructor.add_constructor(INT, lambda c, n: c._scalar(n, _int))
_JsonConstructor.add_constructor(FLOAT, lambda c, n: c._scalar(n, _float))
_JsonConstructor.add_constructor(SEQ, SafeConstructor.construct_yaml_seq)
_JsonConstructor.add_constructor(MAP, SafeConstructor.construct_yaml_map)
_JsonConstructor.add_constructor(None, _JsonConstructor.construct_other)


class _Loader(Reader, Scanner, Parser, _BoundedComposer, _JsonConstructor, _KubectlResolver):
    def __init__(self, text: str) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        _BoundedComposer.__init__(self)
        _JsonConstructor.__init__(self)
        _KubectlResolver.__init__(self)


@dataclass(frozen=True)
class Document:
    """One YAML document of a file and where it starts."""

    data: Any
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _read_text(path: str | Path) -> tuple[str, str]:
    """(source name, text) of a file or '-' (stdin), refusing oversized and non-UTF-8 input."""
    source = "<stdin>" if str(path) == "-" else str(path)
    try:
        if source == "<stdin>":
            stream = getattr(sys.stdin, "buffer", None)
            data = stream.read(MAX_BYTES + 1) if stream else sys.stdin.read(MAX_BYTES + 1).encode()
        else:
            with open(path, "rb") as file:
                data = file.read(MAX_BYTES + 1)
    except OSError as err:
        raise YamlInputError(source, f"cannot read: {err.strerror or err}") from None
    if len(data) > MAX_BYTES:
        raise YamlInputError(
            source, f"larger than {MAX_BYTES // 2**20} MiB, the apiserver's request size limit"
        )
    try:
        return source, data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise YamlInputError(
            source, f"not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8", line, column
        ) from None


def _located(source: str, text: str, err: yaml.YAMLError) -> YamlInputError:
    if isinstance(err, ReaderError):
        before = text[: err.position]
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        return YamlInputError(source, f"not YAML: unacceptable character #x{err.character:04x}", line, column)
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        context = ""
        if err.context and err.context_mark is not None:
            context = f" ({err.context} at line {err.context_mark.line + 1})"
        prefix = "" if isinstance(err, ConstructorError | ComposerError) else "not YAML: "
        return YamlInputError(source, f"{prefix}{err.problem}{context}", mark.line + 1, mark.column + 1)
    return YamlInputError(source, f"not YAML: {err}")


def parse_documents(text: str, source: str = "<string>") -> list[Document]:
    """Every non-empty document of a YAML stream; YamlInputError for anything unacceptable."""
    documents = []
    try:
        loader = _Loader(text)
        while loader.check_node():
            line = loader.peek_event().start_mark.line + 1
            data = loader.get_data()
            if data is not None:
                documents.append(Document(data, source, line))
    except yaml.YAMLError as err:
        raise _located(source, text, err) from None
    return documents


def read_documents(path: str | Path) -> list[Document]:
    """All non-empty documents of a file ('-' reads stdin); a file without any is refused."""
    source, text = _read_text(path)
    documents = parse_documents(text, source)
    if not documents:
        raise YamlInputError(source, "no YAML documents (the file is empty or holds only comments)")
    return documents


def load_documents(path: str | Path) -> list[Any]:
    """The data of every document of a file, read as `read_documents` reads it."""
    return [document.data for document in read_documents(path)]


class _Dumper(_KubectlResolver, yaml.SafeDumper):
    """Block style, keys in insertion order, no anchors; strings kubectl would retype are quoted."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar(STR, data, style=style)


_Dumper.add_representer(str, _str_representer)


def dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def dump_all(objs: Iterable[Any]) -> str:
    return yaml.dump_all(list(objs), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)
