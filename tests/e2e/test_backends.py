"""Choosing the backend: an operator on a cluster with Kubeflow Trainer v2 only (TrainJob its
default and only backend) runs a run that names no backend as TrainJobs, records that, and
refuses a run asking for PyTorchJobs, naming spec.backend, without creating anything. A TrainJob
the apiserver refuses (its runtime does not exist) is said in the status until it is accepted."""

from __future__ import annotations

import json
import time

import pytest

from tests.cluster import Cluster

from .childkinds import PYTORCHJOB, TRAINJOB
from .support import (
    Kube,
    OperatorProcess,
    condition,
    job_name,
    llavarun,
    operator_running,
    wait_events,
    wait_run,
)

pytestmark = pytest.mark.e2e


def test_an_operator_serving_trainjobs_only_runs_them_and_refuses_pytorchjob_runs(
    e2e_cluster: Cluster,
    kube: Kube,
    operator: OperatorProcess,
    cluster_namespace: str,
    tmp_path,
    request: pytest.FixtureRequest,
) -> None:
    ns = cluster_namespace
    operator.stop()  # the shared operator serves both backends; this one serves TrainJob alone
    try:
        with operator_running(
            e2e_cluster, tmp_path / "operator.log", request.session, backends="TrainJob", backend="TrainJob"
        ) as only:
            kube.create_run(llavarun("v2", ns, ["prepare", "pretrain"]))
            kube.create_run(llavarun("v1", ns, ["prepare"], backend="PyTorchJob"))
            st = wait_run(kube, ns, "v2", "succeeded", timeout=90, phase="Succeeded")
            assert st["backend"] == "TrainJob"
            assert sorted(TRAINJOB.jobs(kube, ns)) == [job_name("v2", "prepare"), job_name("v2", "pretrain")]

            st = wait_run(kube, ns, "v1", "refused", phase="Failed", reason="InvalidSpec")
            assert condition(st, "Failed")["message"].startswith(
                "spec is invalid: spec.backend: PyTorchJob is not served by this operator (it serves TrainJob)"
            )
            assert PYTORCHJOB.jobs(kube, ns) == {} and "backend" not in st
            assert only.errors() == []
    finally:
        operator.start()


def test_a_trainjob_the_webhook_refuses_is_said_in_the_status_and_starts_once_its_runtime_exists(
    e2e_cluster: Cluster, kube: Kube, running_operator: OperatorProcess, cluster_namespace: str
) -> None:
    """spec.trainingRuntime names a runtime that does not exist: Trainer's webhook denies the
    TrainJob; the stage waits with reason JobRejected quoting it (one Warning), and starts as soon
    as the runtime is created."""
    ns, run, runtime = cluster_namespace, "typo", f"missing-{cluster_namespace}"
    kube.create_run(llavarun(run, ns, ["prepare"], backend="TrainJob", trainingRuntime=runtime))
    st = wait_run(kube, ns, run, "rejected", phase="Pending", reason="JobRejected")
    message = st["stages"]["prepare"]["message"]
    assert message.startswith(f"the apiserver refused to create TrainJob {job_name(run, 'prepare')}: ")
    assert runtime in message and "denied the request" in message
    assert TRAINJOB.jobs(kube, ns) == {} and st["backend"] == "TrainJob"
    assert condition(st, "Succeeded")["message"] == f"stage prepare waits: {message}"
    time.sleep(2.5 * running_operator.resync_seconds)  # tried again at every resync, said once
    assert kube.events(ns, run).count("StageWaiting") == 1 and "StageStarted" not in kube.events(ns, run)

    chart_runtime = e2e_cluster.kubectl(
        "get", "clustertrainingruntime", "llavarun-torch", "-o", "json"
    ).stdout
    copy = json.loads(chart_runtime)
    copy["metadata"] = {"name": runtime}
    e2e_cluster.apply(copy)
    try:
        st = wait_run(kube, ns, run, "succeeded once the runtime exists", timeout=90, phase="Succeeded")
        assert st["backend"] == "TrainJob" and list(TRAINJOB.jobs(kube, ns)) == [job_name(run, "prepare")]
        assert "StageStarted" in wait_events(kube, ns, run, "RunSucceeded")
    finally:
        e2e_cluster.kubectl("delete", "clustertrainingruntime", runtime, "--wait=false", check=False)
