"""The generated LlavaRun CRD on a real kube-apiserver: it installs, defaults the recipe, refuses
every invalid object of the shared data set with a message naming the field, accepts every
example, keeps every status field, shows our printer columns and locks the running stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llava_operator.api.crd import generate_crd
from llava_operator.api.status import LlavaRunStatus
from llava_operator.render import render_stage_job
from llava_operator.validate import load_run

from tests.cluster import Cluster
from tests.helpers import EXAMPLES, INVALID_RUNS, PYTORCHJOB_CRD, ROOT, expected_field, load_yaml

CRD_NAME = "llavaruns.llavarun.io"


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> Cluster:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds" / "llavarun.yaml"))
    cluster.wait_crd_established(CRD_NAME)
    return cluster


def create(cluster: Cluster, namespace: str, doc: dict, *, dry_run: bool = False, check: bool = True):
    args = ["create", "-n", namespace, "-f", "-", "-o", "json"]
    if dry_run:
        args.append("--dry-run=server")
    return cluster.kubectl(*args, input=json.dumps(doc), check=check)


def test_crd_is_established_with_our_names(crd: Cluster):
    out = json.loads(crd.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    assert out["spec"]["names"]["shortNames"] == ["lrun"]
    assert out["spec"]["names"]["categories"] == ["llava"]


@pytest.mark.parametrize("path", INVALID_RUNS, ids=lambda p: p.stem)
def test_apiserver_rejects_invalid_run_naming_the_field(crd: Cluster, cluster_namespace: str, path: Path):
    result = create(crd, cluster_namespace, load_yaml(path), dry_run=True, check=False)
    assert result.returncode != 0, f"{path.name} was accepted by the apiserver"
    assert expected_field(path) in result.stderr, result.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_apiserver_accepts_every_example(crd: Cluster, cluster_namespace: str, path: Path):
    create(crd, cluster_namespace, load_yaml(path), dry_run=True)


def test_apiserver_fills_the_recipe_defaults(crd: Cluster, cluster_namespace: str):
    minimal = {
        "apiVersion": "llavarun.io/v1alpha1",
        "kind": "LlavaRun",
        "metadata": {"name": "minimal"},
        "spec": {"image": "trainer:1", "storage": {"data": {"source": {"emptyDir": {}}}}},
    }
    spec = json.loads(create(crd, cluster_namespace, minimal).stdout)["spec"]
    assert spec["stages"] == ["prepare", "pretrain", "finetune", "evaluate"]
    assert spec["pretrain"]["learningRate"] == 0.001 and spec["pretrain"]["zeroStage"] == 2
    assert spec["finetune"]["globalBatchSize"] == 128 and spec["finetune"]["imageAspectRatio"] == "pad"
    assert spec["pretrain"]["resources"]["gpusPerNode"] == 8
    # What the apiserver stored is a LlavaRun our models (and so the operator) accept unchanged.
    stored = json.loads(
        crd.kubectl("get", "llavarun", "minimal", "-n", cluster_namespace, "-o", "json").stdout
    )
    assert load_run(stored).spec.pretrain.global_batch_size == 256


def full_status() -> dict:
    """A status with every declared field set, as the operator and the trainer write it."""
    return LlavaRunStatus.model_validate(
        {
            "observedGeneration": 1,
            "phase": "Running",
            "reason": "Unschedulable",
            "eta": "2026-11-26T11:07:00Z",
            "stage": "evaluate",
            "currentJob": "run-evaluate",
            "stages": {
                "pretrain": {"phase": "Succeeded", "job": "run-pretrain", "attempts": 2},
                "evaluate": {"phase": "Running", "job": "run-evaluate", "attempts": 1,
                             "reason": "Unschedulable", "message": "pod run-evaluate-worker-0 cannot be scheduled"},
            },
            "plan": {
                "generation": 1, "model": "vicuna-13b-v1.5 + clip-vit-large-patch14-336", "device": "H100 SXM 80GB",
                "deviceSource": "the nvidia profile's default device", "fits": False, "seconds": 23364,
                "gpuHours": 51.9,
                "stages": {
                    "pretrain": {"seconds": 6444, "gpuHours": 14.3, "devices": 8, "fits": True, "memoryGib": 43.84,
                                 "deviceMemoryGib": 79.1, "mfu": 35.0},
                    "finetune": {"seconds": 16920, "gpuHours": 37.6, "devices": 8, "fits": False,
                                 "memoryGib": 328.51, "deviceMemoryGib": 79.1, "mfu": 35.0,
                                 "fix": "spec.finetune.gradientCheckpointing: true (55.8 GiB per device on 8 devices)"},
                },
                "unavailable": "not used with stages, set here to prove the field is kept",
            },
            "conditions": [
                {
                    "type": "Succeeded",
                    "status": "Unknown",
                    "reason": "Running",
                    "message": "",
                    "lastTransitionTime": "2026-11-26T10:00:00Z",
                }
            ],
            "progress": {"stage": "evaluate", "step": 10, "totalSteps": 40, "percent": 25, "loss": 1.25,
                         "samplesPerSecond": 3.5, "mfu": 41.5, "mfuFlagperf": 20.5, "etaSeconds": 30},
            "results": {
                "prepare": {"samples": {"coco": 3}, "missingImages": 1},
                "pretrain": {"checkpoint": "/data/Output/checkpoints_pretrain/model", "finalLoss": 2.1},
                "evaluate": {"overall": 36.2, "disciplines": {"Science": 29.3}, "questions": 900},
            },
        }
    ).to_k8s()  # fmt: skip


def test_every_status_field_survives_the_apiserver(crd: Cluster, cluster_namespace: str):
    doc = load_yaml(EXAMPLES[0]) | {"metadata": {"name": "status-run"}}
    create(crd, cluster_namespace, doc)
    status = full_status()
    crd.kubectl(
        "patch", "llavarun", "status-run", "-n", cluster_namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": status}),
    )  # fmt: skip
    stored = json.loads(
        crd.kubectl("get", "llavarun", "status-run", "-n", cluster_namespace, "-o", "json").stdout
    )
    assert (
        LlavaRunStatus.model_validate(stored["status"]).to_k8s()
        == LlavaRunStatus.model_validate(status).to_k8s()
    )

    table = crd.kubectl("get", "llavaruns", "-n", cluster_namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "STAGE", "PHASE", "PROGRESS", "ETA", "REASON", "AGE"]
    row = next(line.split() for line in table if line.startswith("status-run"))
    assert row[1:6] == ["evaluate", "Running", "25", "2026-11-26T11:07:00Z", "Unschedulable"]
    wide = crd.kubectl("get", "lrun", "-n", cluster_namespace, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[7:] == ["LOSS", "MMMU", "JOB", "SAMPLES/S", "MFU%"]
    assert next(line.split() for line in wide if line.startswith("status-run"))[7:] == [
        "1.25", "36.2", "run-evaluate", "3.5", "41.5",
    ]  # fmt: skip
    assert "status-run" in crd.kubectl("get", "llava", "-n", cluster_namespace).stdout  # category


def test_running_stage_is_immutable_other_stages_are_not(crd: Cluster, cluster_namespace: str):
    doc = load_yaml(EXAMPLES[0]) | {"metadata": {"name": "locked"}}
    create(crd, cluster_namespace, doc)
    status = {"status": {"phase": "Running", "stage": "pretrain"}}
    crd.kubectl("patch", "llavarun", "locked", "-n", cluster_namespace, "--subresource=status",
                "--type=merge", "-p", json.dumps(status))  # fmt: skip
    refused = crd.kubectl(
        "patch", "llavarun", "locked", "-n", cluster_namespace, "--type=merge",
        "-p", json.dumps({"spec": {"pretrain": {"learningRate": 0.002}}}), check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "spec.pretrain cannot change while the pretrain stage is running" in (
        refused.stderr
    )
    crd.kubectl("patch", "llavarun", "locked", "-n", cluster_namespace, "--type=merge",
                "-p", json.dumps({"spec": {"finetune": {"learningRate": 1e-5}, "suspend": True}}))  # fmt: skip


def test_rendered_pytorchjob_is_accepted(crd: Cluster, cluster_namespace: str):
    crd.kubectl("apply", "--server-side", "-f", str(PYTORCHJOB_CRD))
    crd.wait_crd_established("pytorchjobs.kubeflow.org")
    run = load_run(load_yaml(next(p for p in EXAMPLES if "multinode" in p.name)))
    job = render_stage_job(run, run.spec.stages[1])
    job["metadata"]["namespace"] = cluster_namespace
    create(crd, cluster_namespace, job, dry_run=True)


def test_committed_crd_is_what_was_installed(crd: Cluster):
    served = json.loads(crd.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    assert served["spec"]["versions"][0]["schema"] == generate_crd()["spec"]["versions"][0]["schema"]
