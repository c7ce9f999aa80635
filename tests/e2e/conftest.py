"""Fixtures of the end-to-end tier: the full control plane with both Kubeflow stacks, the chart
with both backends, one shared operator serving both, and `backend` to run a scenario on each."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster import Cluster

from .childkinds import KINDS, ChildKind
from .support import Kube, OperatorProcess, install_chart, operator_running, prepare_cluster


@pytest.fixture(scope="package")
def e2e_cluster(full_cluster: Cluster) -> Cluster:
    """etcd, kube-apiserver, scheduler, controller-manager (GC), kwok GPU nodes, the
    training-operator (PyTorchJob scheme only), JobSet and Kubeflow Trainer v2, and our chart
    installed with replicas=0 and the TrainJob backend enabled (its ClusterTrainingRuntime)."""
    prepare_cluster(full_cluster, trainer=True)
    install_chart(full_cluster, trainjob=True)
    return full_cluster


@pytest.fixture(scope="package")
def kube(e2e_cluster: Cluster) -> Iterator[Kube]:
    """Admin access through the python client."""
    k = Kube.for_cluster(e2e_cluster)
    try:
        yield k
    finally:
        k.api.close()


@pytest.fixture(scope="package")
def operator(
    e2e_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    """One `llavarun operator` process under the chart's ServiceAccount serving both backends
    (PyTorchJob the default), shared by the scenarios (a scenario that kills it starts it again)."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with operator_running(e2e_cluster, log, request.session, backends="PyTorchJob,TrainJob") as proc:
        yield proc


@pytest.fixture
def running_operator(operator: OperatorProcess) -> OperatorProcess:
    """The shared operator, restarted first if an earlier scenario left it down."""
    if not operator.healthy():
        operator.start()
    return operator


@pytest.fixture(params=sorted(KINDS))
def backend(request: pytest.FixtureRequest) -> ChildKind:
    """The scenario runs once per backend; its runs set spec.backend to `backend.kind`."""
    return KINDS[request.param]
