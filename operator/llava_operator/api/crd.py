"""Generate the LlavaRun CustomResourceDefinition from the pydantic models.

pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 subset: no $ref,
no anyOf-with-null, no titles, a type on every node, booleans for exclusive bounds. This module
is that translation and nothing else, so the models stay the single source of truth.
"""

from __future__ import annotations

from typing import Any

from .llavarun import CATEGORIES, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from .spec import DNS1035, MAX_RUN_NAME_LENGTH, LlavaRunSpec
from .status import LlavaRunStatus

_KEEP = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "enum",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "format",
    "additionalProperties",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage", "description": "Current stage"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Run phase"},
    {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent", "description": "Percent"},
    {
        # A time, not "in 3h": a printer column cannot compute, and a date column prints a time in
        # the future as <invalid>.
        "name": "ETA",
        "type": "string",
        "jsonPath": ".status.eta",
        "description": "When the run is expected to end (UTC)",
    },
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": ".status.reason",
        "description": "Why the current stage waits, or why the run failed",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {
        "name": "Loss",
        "type": "number",
        "jsonPath": ".status.progress.loss",
        "description": "Latest loss",
        "priority": 1,
    },
    {
        "name": "MMMU",
        "type": "number",
        "jsonPath": ".status.results.evaluate.overall",
        "description": "MMMU accuracy (percent)",
        "priority": 1,
    },
    {"name": "Job", "type": "string", "jsonPath": ".status.currentJob", "priority": 1},
    {"name": "Samples/s", "type": "number", "jsonPath": ".status.progress.samplesPerSecond", "priority": 1},
    {"name": "MFU%", "type": "number", "jsonPath": ".status.progress.mfu", "priority": 1},
]

NAME_RULES = [
    {
        "rule": f"size(self.metadata.name) <= {MAX_RUN_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_RUN_NAME_LENGTH} characters, so that "
        "<name>-<stage>-r<attempt>-worker-<index> pod and service names fit 63",
    },
    {
        "rule": f"self.metadata.name.matches('{DNS1035}')",
        "message": "metadata.name must be a DNS-1035 label (lower-case letters, digits and '-', "
        "starting with a letter): pod and service names are derived from it",
    },
]


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Translate one pydantic JSON-Schema node into a structural OpenAPI v3 node."""
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**target, **node}
    if "anyOf" in node:  # Optional[X] -> X; the null branch only means "may be omitted"
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"unsupported union in schema: {branches}")
        inner = _structural(branches[0], defs)
        outer = {k: v for k, v in node.items() if k in _KEEP}
        node = {**inner, **outer}
        if node.get("default", 0) is None:
            node.pop("default")
        return _finish(node, defs)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    return _finish(node, defs)


def _finish(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if not isinstance(node.get(exclusive, True), bool):  # 2020-12 number -> OpenAPI v3 boolean
            node[bound], node[exclusive] = node.pop(exclusive), True
    out: dict[str, Any] = {
        k: v for k, v in node.items() if k in _KEEP or k in ("exclusiveMinimum", "exclusiveMaximum")
    }
    if "properties" in out:
        out["type"] = "object"
        required = set(out.get("required", ()))
        raw_props = out["properties"]
        out["properties"] = {k: _structural(v, defs) for k, v in raw_props.items()}
        for key, prop in out["properties"].items():
            # A nested object that is always present (default_factory) gets its defaults spelled
            # out in full: the apiserver validates a default (CEL rules included) as written,
            # without filling nested defaults into it first, so `default: {}` would be refused.
            always_present = "$ref" in raw_props[key] and key not in required
            if "properties" in prop and (always_present or isinstance(prop.get("default"), dict)):
                prop["default"] = materialized_default(prop)
        out.pop("additionalProperties", None)
    elif isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(out["additionalProperties"], defs)
        out["type"] = "object"
    elif out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
    if "items" in out:
        out["items"] = _structural(out["items"], defs)
    if out.get("default") is None:
        out.pop("default", None)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "string" and "enum" in out:
        # Bounded strings keep CEL's cost estimate low enough for rules over them.
        out.setdefault("maxLength", max(len(str(v)) for v in out["enum"]))
    return dict(sorted(out.items()))


def materialized_default(node: dict[str, Any]) -> dict[str, Any]:
    """The object an empty `{}` becomes after the apiserver applies every nested default."""
    value: dict[str, Any] = {}
    for key, child in node.get("properties", {}).items():
        if "default" in child:
            value[key] = child["default"]
    return value


def running_stage_rules() -> list[dict[str, Any]]:
    """Transition rules: the running stage's section of the spec is immutable.

    Stages not yet started may still change (their PyTorchJobs are rendered when they start);
    the running stage's job already exists, so an edit there would silently not apply.
    """
    active = "['Pending', 'Running', 'Queued', 'Suspended']"
    rules = []
    for stage in ("prepare", "pretrain", "finetune", "evaluate"):
        rules.append(
            {
                "rule": (
                    f"!has(oldSelf.status) || !has(oldSelf.status.stage) || oldSelf.status.stage != '{stage}'"
                    f" || !has(oldSelf.status.phase) || !(oldSelf.status.phase in {active})"
                    f" || (has(self.spec.{stage}) ? has(oldSelf.spec.{stage}) && self.spec.{stage} == "
                    f"oldSelf.spec.{stage} : !has(oldSelf.spec.{stage}))"
                ),
                "message": f"spec.{stage} cannot change while the {stage} stage is running; "
                "edit a stage before it starts, or suspend and recreate the run",
                "fieldPath": f".spec.{stage}",
                "reason": "FieldValueForbidden",
            }
        )
    return rules


def openapi_schema(model: type) -> dict[str, Any]:
    """The structural schema of one pydantic model (spec or status)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def generate_crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition for LlavaRun."""
    spec = openapi_schema(LlavaRunSpec)
    status = openapi_schema(LlavaRunStatus)
    status["description"] = "Observed state; the operator and the trainer write disjoint parts of it."
    root = {
        "type": "object",
        "description": "LlavaRun runs the LLaVA-1.5 recipe (prepare, pretrain, finetune, evaluate) as "
        "one Kubeflow PyTorchJob per stage.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": NAME_RULES + running_stage_rules(),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "llavarun", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }
