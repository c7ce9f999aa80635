"""Fixtures of the end-to-end tier: the full control plane, the chart, one shared operator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster import Cluster

from .support import Kube, OperatorProcess, install_chart, operator_running, prepare_cluster


@pytest.fixture(scope="package")
def e2e_cluster(full_cluster: Cluster) -> Cluster:
    """etcd, kube-apiserver, scheduler, controller-manager (GC), kwok GPU nodes, the
    training-operator (PyTorchJob scheme only) and our chart installed with replicas=0."""
    prepare_cluster(full_cluster)
    install_chart(full_cluster)
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
    """One `llavarun operator` process under the chart's ServiceAccount, shared by the scenarios
    (a scenario that kills it starts it again)."""
    with operator_running(
        e2e_cluster, tmp_path_factory.mktemp("operator") / "operator.log", request.session
    ) as proc:
        yield proc


@pytest.fixture
def running_operator(operator: OperatorProcess) -> OperatorProcess:
    """The shared operator, restarted first if an earlier scenario left it down."""
    if not operator.healthy():
        operator.start()
    return operator
