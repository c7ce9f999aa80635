"""Choosing the backend: an operator on a cluster with Kubeflow Trainer v2 only (TrainJob its
default and only backend) runs a run that names no backend as TrainJobs, records that, and
refuses a run asking for PyTorchJobs, naming spec.backend, without creating anything."""

from __future__ import annotations

import pytest

from tests.cluster import Cluster

from .childkinds import PYTORCHJOB, TRAINJOB
from .support import Kube, OperatorProcess, condition, job_name, llavarun, operator_running, wait_run

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
