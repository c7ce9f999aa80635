"""Rendered manifests are valid Kubernetes objects with the stage's settings in them."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from llava_operator.api import LlavaRun, Stage
from llava_operator.backends import render_run
from llava_operator.backends.pytorchjob import PYTORCHJOB
from llava_operator.render import render_rbac, render_stage_job

from tests.helpers import EXAMPLES, PYTORCHJOB_CRD, load_yaml

K8S_VERSION = "1.35.0"


@cache
def pytorchjob_schema() -> dict[str, Any]:
    return load_yaml(PYTORCHJOB_CRD)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@cache
def pytorchjob_validator() -> jsonschema.protocols.Validator:
    schema = pytorchjob_schema()
    return jsonschema.validators.validator_for(schema)(schema)


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare (the apiserver would prune or, strictly, reject them)."""
    found: list[str] = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            found += unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(obj):
            found += unknown_fields(value, schema["items"], f"{path}[{i}]")
    return found


def assert_valid_pytorchjob(job: dict[str, Any]) -> None:
    pytorchjob_validator().validate(job)
    assert unknown_fields(job, pytorchjob_schema()) == []
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p"},
            "spec": replica["template"]["spec"],
        }
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def run_from(path) -> LlavaRun:
    return LlavaRun.model_validate(load_yaml(path))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_renders_valid_objects(path):
    run = run_from(path)
    objects = render_run(PYTORCHJOB, run)
    jobs = [o for o in objects if o["kind"] == "PyTorchJob"]
    assert [j["metadata"]["labels"]["llavarun.io/stage"] for j in jobs] == [s.value for s in run.spec.stages]
    for job in jobs:
        assert_valid_pytorchjob(job)
    for obj in objects:
        if obj["kind"] != "PyTorchJob":
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_multinode_stage_has_master_and_workers():
    run = run_from(next(p for p in EXAMPLES if "multinode" in p.name))
    job = render_stage_job(run, Stage.PRETRAIN)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team-a"
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NCCL_IB_HCA"] == "mlx5" and env["LLAVARUN_NAME"] == "llava13b-4x8"


def test_single_node_stage_has_only_a_master():
    run = run_from(EXAMPLES[0])
    assert list(render_stage_job(run, Stage.FINETUNE)["spec"]["pytorchReplicaSpecs"]) == ["Master"]


def test_pod_is_restricted_and_tolerates_the_gpu_taint():
    run = run_from(EXAMPLES[0])
    spec = render_stage_job(run, Stage.PRETRAIN)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = spec["containers"][0]["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"] == {"drop": ["ALL"]}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"]


def test_vendor_profiles_render_their_resource_and_taint():
    doc = load_yaml(EXAMPLES[0])
    for profile, resource in (("amd", "amd.com/gpu"), ("ascend", "huawei.com/Ascend910")):
        doc["spec"]["accelerator"] = {"profile": profile}
        job = render_stage_job(LlavaRun.model_validate(doc), Stage.PRETRAIN)
        assert_valid_pytorchjob(job)
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"][resource] == "8"
        assert pod["tolerations"][0]["key"] == resource


def test_cpu_profile_requests_no_accelerator():
    run = run_from(next(p for p in EXAMPLES if "tiny" in p.name))
    container = render_stage_job(run, Stage.PRETRAIN)["spec"]["pytorchReplicaSpecs"]["Master"]["template"][
        "spec"
    ]["containers"][0]
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}
    assert {"name": "LLAVARUN_DIST_BACKEND", "value": "gloo"} in container["env"]


def test_rbac_grants_only_patching_this_runs_status():
    run = run_from(EXAMPLES[0])
    sa, role, binding = render_rbac(run)
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["name"] == "llava13b-trainer"
    assert role["rules"] == [
        {
            "apiGroups": ["llavarun.io"],
            "resources": ["llavaruns/status"],
            "resourceNames": ["llava13b"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "llava13b-trainer", "namespace": "default"}
    ]


def test_owner_references_point_at_the_run_once_it_has_a_uid():
    doc = copy.deepcopy(load_yaml(EXAMPLES[0]))
    doc["metadata"].update(uid="1234", namespace="team-a")
    run = LlavaRun.model_validate(doc)
    for obj in render_run(PYTORCHJOB, run):
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["uid"] == "1234" and owner["controller"] is True and owner["kind"] == "LlavaRun"
        assert obj["metadata"]["namespace"] == "team-a"


def test_retry_attempts_get_their_own_names():
    run = run_from(EXAMPLES[0])
    assert render_stage_job(run, Stage.PRETRAIN, 0)["metadata"]["name"] == "llava13b-pretrain"
    assert render_stage_job(run, Stage.PRETRAIN, 2)["metadata"]["name"] == "llava13b-pretrain-r2"


def test_suspended_run_renders_a_suspended_job():
    doc = load_yaml(EXAMPLES[0])
    doc["spec"]["suspend"] = True
    assert (
        render_stage_job(LlavaRun.model_validate(doc), Stage.PREPARE)["spec"]["runPolicy"]["suspend"] is True
    )
