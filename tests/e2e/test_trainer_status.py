"""The real trainer reporting into a LlavaRun on this apiserver with its per-run token.

The pretrain stage's pod is played by a local process: the same `llava-trainer pretrain` flags
the operator renders (`trainer_args` with the data_dir moved to a local tiny one made by
`llava-trainer synth`), under `torchrun --standalone`, with the environment of the PyTorchJob the
operator created, and `LLAVARUN_KUBECONFIG` holding a token of the run's own ServiceAccount. The
job's real pod meanwhile "trains" under kwok for 10 minutes, so the run stays Running.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster import Cluster, wait_for

from .support import (
    GROUP,
    PLURAL,
    VERSION,
    Kube,
    OperatorProcess,
    job_name,
    play_trainer_pod,
    run_token_kubeconfig,
    synth_data_dir,
    tiny_pretrain,
    wait_job,
    wait_run,
)

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
RUN = "reporter"


def pod_env(job: dict[str, Any]) -> dict[str, str]:
    """The literal env of the Master's trainer container, as the operator rendered it."""
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


@pytest.fixture(scope="module")
def namespace(e2e_cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    e2e_cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        e2e_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_data_dir(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def trainer_kubeconfig(e2e_cluster: Cluster, namespace: str, kube: Kube, operator: OperatorProcess) -> Path:
    """The run exists and its operator-made ServiceAccount has a token, as a kubeconfig."""
    if not operator.healthy():
        operator.start()
    kube.create_run(tiny_pretrain(namespace, RUN))
    wait_job(kube, namespace, job_name(RUN, "pretrain"))
    kubeconfig = run_token_kubeconfig(e2e_cluster, namespace, RUN)
    return kubeconfig


@pytest.fixture(scope="module")
def trained(
    kube: Kube,
    namespace: str,
    data_dir: Path,
    trainer_kubeconfig: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Run the pretrain stage as its pod would; the run's status afterwards."""
    log = tmp_path_factory.mktemp("trainer") / "pretrain.log"
    env = {
        **pod_env(kube.jobs(namespace)[job_name(RUN, "pretrain")]),
        "LLAVARUN_KUBECONFIG": str(trainer_kubeconfig),
    }
    env = play_trainer_pod(kube.run(namespace, RUN), "pretrain", data_dir, env, log)
    return {"status": kube.status(namespace, RUN), "env": env, "log": log}


def test_pod_env_tells_the_trainer_which_run_stage_and_attempt_it_reports_to(trained: dict[str, Any]) -> None:
    env = trained["env"]
    assert (env["LLAVARUN_NAME"], env["LLAVARUN_STAGE"], env["LLAVARUN_ATTEMPT"]) == (RUN, "pretrain", "0")
    assert env["LLAVARUN_JOB"] == job_name(RUN, "pretrain")


def test_trainer_writes_progress_into_the_run_status(trained: dict[str, Any]) -> None:
    progress = trained["status"]["progress"]
    assert (progress["stage"], progress["attempt"]) == ("pretrain", 0)
    assert progress["step"] == progress["totalSteps"] == 2 and progress["percent"] == 100
    assert progress["loss"] > 0 and progress["samplesPerSecond"] > 0 and progress["tokensPerSecond"] > 0
    assert progress["lastUpdate"].endswith("Z")


def test_trainer_writes_the_pretrain_results(trained: dict[str, Any], data_dir: Path) -> None:
    results = trained["status"]["results"]["pretrain"]
    out = data_dir / "Output" / "checkpoints_pretrain"
    assert results["checkpoint"] == str(out / "model") and Path(results["checkpoint"], "config.json").exists()
    assert results["projector"] == str(out / "mm_projector.bin")
    assert (results["steps"], results["samples"]) == (2, 8)
    assert results["finalLoss"] > 0


def test_trainer_writes_leave_the_operators_fields_alone(
    trained: dict[str, Any], kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    st = wait_run(kube, namespace, RUN, "running (kwok's pod runs for 10 min)", phase="Running")
    assert (st["stage"], st["currentJob"]) == ("pretrain", job_name(RUN, "pretrain"))
    assert st["stages"]["pretrain"]["phase"] == "Running"
    assert st["progress"] == trained["status"]["progress"]  # and the operator never touched progress


def test_the_runs_token_cannot_patch_another_runs_status(
    e2e_cluster: Cluster, kube: Kube, namespace: str, trainer_kubeconfig: Path
) -> None:
    kube.create_run(tiny_pretrain(namespace, "neighbour"))
    with e2e_cluster.api_client(trainer_kubeconfig) as api:
        custom = client.CustomObjectsApi(api)
        custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, RUN, {"status": {}})
        with pytest.raises(ApiException) as denied:
            custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, "neighbour", {"status": {"progress": {"step": 1}}}
            )
    assert denied.value.status == 403
    assert "progress" not in wait_for(lambda: kube.run(namespace, "neighbour"), timeout=10).get("status", {})
