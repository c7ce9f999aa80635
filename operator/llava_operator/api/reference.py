"""The configuration reference (docs/CONFIGURATION.md), generated from the CRD schema so the
documentation can never disagree with what the apiserver accepts."""

from __future__ import annotations

import json
from typing import Any

from .crd import generate_crd

HEADER = """# LlavaRun configuration reference

Generated from the API models by `llavarun crd --reference` (a test fails when this file is
stale). Every field of `spec`; defaults are the LLaVA-1.5 recipe. Paths are relative to the
data_dir on the data volume.
"""


def _type(node: dict[str, Any]) -> str:
    kind = node.get("type", "object")
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (free-form)"
    if kind == "array":
        return f"list of {_type(node['items'])}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {_type(node['additionalProperties'])}"
    return kind


def _allowed(node: dict[str, Any]) -> str:
    parts = []
    target = node.get("items", node)
    if "enum" in target:
        parts.append(", ".join(f"`{v}`" for v in target["enum"]))
    if "minimum" in node:
        parts.append(("> " if node.get("exclusiveMinimum") else "≥ ") + str(node["minimum"]))
    if "maximum" in node:
        parts.append(("< " if node.get("exclusiveMaximum") else "≤ ") + str(node["maximum"]))
    if "maxLength" in node and "enum" not in node:
        parts.append(f"≤ {node['maxLength']} chars")
    for rule in node.get("x-kubernetes-validations", []):
        if "oldSelf" not in rule["rule"]:
            parts.append(rule["message"])
    return "; ".join(parts)


def _default(node: dict[str, Any]) -> str:
    if "default" not in node or isinstance(node["default"], dict):
        return ""
    return f"`{json.dumps(node['default'])}`"


def _rows(node: dict[str, Any], path: str, required: set[str]) -> list[str]:
    rows = []
    for key, child in node.get("properties", {}).items():
        child_path = f"{path}.{key}"
        desc = (child.get("description") or "").replace("\n", " ").replace("|", "\\|")
        if key in required:
            desc = f"**required.** {desc}"
        rows.append(f"| `{child_path}` | {_type(child)} | {_default(child)} | {_allowed(child)} | {desc} |")
        inner = child.get("items", child)
        if "properties" in inner:
            suffix = "[]" if "items" in child else ""
            rows += _rows(inner, child_path + suffix, set(inner.get("required", ())))
    return rows


def render_reference() -> str:
    schema = generate_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    lines = [HEADER, "| field | type | default | allowed | description |", "|---|---|---|---|---|"]
    lines += _rows(spec, "spec", set(spec.get("required", ())))
    lines += ["", "## Rules across fields", ""]
    for rule in schema.get("x-kubernetes-validations", []):
        lines.append(f"- {rule['message']}")
    lines.append("")
    return "\n".join(lines)
