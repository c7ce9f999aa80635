"""Every LlavaRun spec field lands somewhere known: in the trainer's config, or on the cluster side.

The stage contract (`llava_operator.api.stage_params`) is defined once; the API's stage sections
and the trainer's configs both extend it. These tests walk the whole spec, so a new field fails
here until someone decides where it goes.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, get_args, get_origin

import pytest
from llava_operator.api import LlavaRun, LlavaRunSpec, Stage
from llava_operator.api.base import ApiModel
from llava_operator.api.stage_params import STAGE_PARAMS
from llava_operator.trainer_command import stage_config, stage_env
from llava_trainer.config import CONFIGS
from pydantic import BaseModel

from tests.helpers import EXAMPLES, load_yaml

# Spec fields that reach the trainer outside the stage contract: spec path -> (stage, config field).
DERIVED: dict[str, list[tuple[str, str]]] = {
    "stages": [("prepare", "stages")],
    "paths.languageModel": [(s, "language_model") for s in ("prepare", "pretrain", "finetune")],
    "paths.visionTower": [(s, "vision_tower") for s in ("prepare", "pretrain", "finetune")],
    "paths.pretrainData": [("prepare", "pretrain_data"), ("pretrain", "data_path")],
    "paths.pretrainImages": [("prepare", "pretrain_images"), ("pretrain", "image_folder")],
    "paths.finetuneData": [("prepare", "finetune_data"), ("finetune", "data_path")],
    "paths.finetuneImages": [("prepare", "finetune_images"), ("finetune", "image_folder")],
    "paths.mmmu": [("prepare", "mmmu_dir"), ("evaluate", "mmmu_dir")],
    "paths.output": [(s, "output_dir") for s in ("prepare", "pretrain", "finetune", "evaluate")],
    "storage.data.mountPath": [(s, "data_dir") for s in ("prepare", "pretrain", "finetune", "evaluate")],
    "storage.output.mountPath": [(s, "output_dir") for s in ("prepare", "pretrain", "finetune", "evaluate")],
    "accelerator.profile": [("pretrain", "accelerator"), ("finetune", "accelerator")],
    "accelerator.peakTflops": [("pretrain", "peak_tflops"), ("finetune", "peak_tflops")],
    "pretrain.badImages": [("prepare", "pretrain_bad_images")],
    "finetune.badImages": [("prepare", "finetune_bad_images")],
    "pretrain.maxLength": [("prepare", "max_length")],
    "finetune.maxLength": [("prepare", "max_length")],
    "finetune.modelPath": [("prepare", "finetune_model_path")],
}
# A field whose other values are valid only with another change (a task finetune runs without pretrain).
REQUIRES = {"finetune.modelPath": {"stages": ["prepare", "finetune", "evaluate"]}}
# Spec fields that reach the trainer's processes as environment, not flags.
ENVIRONMENT = {"accelerator.backend": "LLAVARUN_DIST_BACKEND"}
# Spec fields only the cluster uses (pods, jobs, RBAC), with why the trainer does not need them.
CLUSTER_ONLY = {
    "image": "the container image",
    "imagePullPolicy": "the container's pull policy",
    "imagePullSecrets": "the pod's pull secrets",
    "suspend": "the operator suspends and resumes the stage's job",
    "retries": "the operator creates further attempts",
    "serviceAccountName": "the pod's identity",
    "backend": "which kind of job the operator creates per stage (PyTorchJob or TrainJob)",
    "trainingRuntime": "the ClusterTrainingRuntime a TrainJob runs on",
    "accelerator.resourceName": "the extended resource each pod requests",
    "accelerator.taintKey": "the toleration every pod gets",
    "placement": "node selection, tolerations, queue, annotations and env of the pods",
    "storage.data.source": "the volume mounted at storage.data.mountPath",
    "storage.data.readOnly": "the volume mount",
    "storage.output.source": "the volume mounted at storage.output.mountPath",
    "storage.output.readOnly": "the volume mount",
    "prepare.resources": "the pod's CPU and memory, placement overrides, deadline",
    "pretrain.resources": "the node pool: pods x processes (the launcher's world size), pod resources",
    "finetune.resources": "the node pool: pods x processes (the launcher's world size), pod resources",
    "evaluate.resources": "the node pool: pods x processes (the launcher's world size), pod resources",
}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `X`, `X | None`, or None for a leaf."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for m in map(_model_of, get_args(annotation)) if m]
        return models[0] if models else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, ApiModel) else None


def leaf_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field path of `model` in camelCase, stopping at the prefixes the tables name whole."""
    paths = []
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)
        nested = _model_of(field.annotation)
        if nested is None or path in CLUSTER_ONLY:
            paths.append(path)
        else:
            paths += leaf_fields(nested, path + ".")
    return paths


def contract_paths() -> dict[str, tuple[str, str]]:
    """spec path -> (stage, trainer field) for every stage-contract field; a nested section's
    fields (finetune.lora.r) by dotted name (lora.r)."""
    paths = {}
    for stage, params in STAGE_PARAMS.items():
        for name, field in params.model_fields.items():
            nested = _model_of(field.annotation)
            inner = nested.model_fields.items() if nested else [(None, None)]
            for sub, sub_field in inner:
                path = f"{stage}.{field.alias}" + (f".{sub_field.alias}" if sub_field else "")
                paths[path] = (stage, f"{name}.{sub}" if sub else name)
    return paths


def _field(stage: str, dotted: str) -> Any:
    """The contract field named `lora.r` or `learning_rate` of a stage."""
    model, *rest = STAGE_PARAMS[stage], *dotted.split(".")
    for name in rest[:-1]:
        model = _model_of(model.model_fields[name].annotation)
    return model.model_fields[rest[-1]]


def _get(config: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


def test_every_spec_field_has_a_known_destination():
    known = set(contract_paths()) | set(DERIVED) | set(ENVIRONMENT) | set(CLUSTER_ONLY)
    fields = set(leaf_fields(LlavaRunSpec))
    assert fields - known == set(), "spec fields nobody routes: add them to the contract or a table here"
    assert known - fields == set(), "tables name fields the spec no longer has"


def _different_value(field: Any) -> Any:
    """A valid value other than the field's default (the batch rule holds on a 1x1 node pool)."""
    annotation, default = field.annotation, field.get_default(call_default_factory=True)
    if get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if annotation is bool:
        return not default
    if get_origin(annotation) is Literal:
        return next(v for v in get_args(annotation) if v != default)
    if get_origin(annotation) is list:
        return [get_args(get_args(annotation)[0])[0]]
    if annotation is str:
        return "some/where"
    upper = next((m.le for m in field.metadata if getattr(m, "le", None) is not None), None)
    candidate = default * 2 if default else 1
    if annotation is float:
        candidate = default / 2 if default else 0.01
    return candidate if upper is None or candidate <= upper else default - 1


@pytest.fixture
def base_spec() -> dict[str, Any]:
    doc = load_yaml(next(p for p in EXAMPLES if "13b" in p.name))
    for stage in ("pretrain", "finetune", "evaluate"):
        doc["spec"].setdefault(stage, {})["resources"] = {"nodes": 1, "gpusPerNode": 1}
    return doc


@pytest.mark.parametrize("path", sorted(contract_paths()))
def test_a_contract_field_reaches_the_trainer_unchanged(path: str, base_spec: dict[str, Any]):
    stage, name = contract_paths()[path]
    value = _different_value(_field(stage, name))
    *parents, leaf = path.split(".")
    target = base_spec["spec"]
    for key in parents:
        target = target.setdefault(key, {})
    target[leaf] = value
    base_spec["spec"].update(REQUIRES.get(path, {}))
    spec = LlavaRun.model_validate(base_spec).spec
    assert _get(stage_config(spec, Stage(stage)), name) == value


@pytest.mark.parametrize("path", sorted(DERIVED))
def test_a_derived_field_reaches_the_trainer(path: str, base_spec: dict[str, Any]):
    values = {
        "stages": ["prepare", "finetune"],
        "accelerator.profile": "amd",
        "accelerator.peakTflops": 123.0,
        "pretrain.badImages": "skip",
        "finetune.badImages": "skip",
        "pretrain.maxLength": 4096,
        "finetune.maxLength": 4096,
        "storage.data.mountPath": "/mnt/llava",
        "storage.output.mountPath": "/mnt/out",
    }
    value = values.get(path, "some/where")
    target = base_spec["spec"]
    *parents, leaf = path.split(".")
    for key in parents:
        target = target.setdefault(key, {"source": {"emptyDir": {}}} if key == "output" else {})
    target[leaf] = value
    base_spec["spec"].update(REQUIRES.get(path, {}))
    spec = LlavaRun.model_validate(base_spec).spec
    for stage, name in DERIVED[path]:
        if Stage(stage) not in spec.stages and stage != "prepare":
            continue
        got = getattr(stage_config(spec, Stage(stage)), name)
        expected = ["finetune"] if path == "stages" else value  # prepare checks the later stages' inputs
        assert str(expected) in str(got) if isinstance(value, str) else got == expected, (stage, name, got)


def test_the_backend_reaches_the_trainer_environment(base_spec: dict[str, Any]):
    base_spec["spec"]["accelerator"] = {"profile": "nvidia", "backend": "gloo"}
    spec = LlavaRun.model_validate(base_spec).spec
    assert stage_env(spec, "run", Stage.PRETRAIN, 0)[ENVIRONMENT["accelerator.backend"]] == "gloo"


@pytest.mark.parametrize("stage", list(STAGE_PARAMS))
def test_api_and_trainer_share_each_contract_field(stage: str):
    """Defaults and bounds are one definition: the API's and the trainer's fields agree."""
    api = LlavaRunSpec.model_fields[stage].annotation
    for name, field in STAGE_PARAMS[stage].model_fields.items():
        trainer = CONFIGS[stage].model_fields[name]
        assert trainer.get_default(call_default_factory=True) == field.get_default(call_default_factory=True)
        assert trainer.metadata == field.metadata == api.model_fields[name].metadata or name in (
            "model_path",
            "pretrained_projector",  # the API narrows these to paths relative to the volume
        ), name
