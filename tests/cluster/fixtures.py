"""Pytest fixtures for the real control plane.

Register once in ``tests/conftest.py``::

    pytest_plugins = ["tests.cluster.fixtures"]

Fixtures (all share ONE control plane per session, upgraded lazily):

- ``cluster``: etcd + kube-apiserver (seconds to start). ``cluster.ensure("kwok", ...)`` adds more.
- ``full_cluster``: + kube-scheduler, kube-controller-manager, kwok with GPU nodes and the
  training-operator (PyTorchJob CRD installed).
- ``trainer_cluster``: + kube-scheduler, kube-controller-manager, kwok with GPU nodes, the JobSet
  controller and the Kubeflow Trainer v2 controller manager (CRDs and webhooks registered).
- ``cluster_namespace``: a fresh namespace per test (deleted afterwards).

Tests using them are marked ``cluster`` automatically; a failing one gets the component log
paths and tails appended to its report. Environment: ``LLAVARUN_TEST_GPU_NODES`` (default 2),
``LLAVARUN_KEEP_CLUSTER=1`` keeps the workdir, ``LLAVARUN_CLUSTER_BIN`` uses prebuilt binaries.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest

from .controlplane import FULL, TRAINER_STACK, BuildError, Cluster, build, wait_for

_FIXTURES = {"cluster", "full_cluster", "trainer_cluster", "cluster_namespace", "_cluster_session"}
_session_cluster: Cluster | None = None


@pytest.fixture(scope="session")
def _cluster_session(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The session's single control plane (etcd + apiserver to begin with)."""
    global _session_cluster
    try:
        bin_dir = build(quiet=True)
    except BuildError as exc:
        if shutil.which("go") is None:
            pytest.skip(f"no cached control-plane binaries and no Go toolchain to build them: {exc}")
        pytest.fail(str(exc), pytrace=False)
    cluster = Cluster(bin_dir=bin_dir, gpu_nodes=int(os.environ.get("LLAVARUN_TEST_GPU_NODES", "2")))
    _session_cluster = cluster
    try:
        cluster.start()
        yield cluster
    finally:
        keep = request.session.testsfailed > 0 or os.environ.get("LLAVARUN_KEEP_CLUSTER") == "1"
        cluster.stop(remove_workdir=not keep)
        if keep:
            print(f"\ncontrol plane logs kept in {cluster.logs_dir}")
        _session_cluster = None


@pytest.fixture(scope="session")
def cluster(_cluster_session: Cluster) -> Cluster:
    """etcd + kube-apiserver (plus whatever earlier tests already added)."""
    return _cluster_session


@pytest.fixture(scope="session")
def full_cluster(_cluster_session: Cluster) -> Cluster:
    """The control plane with scheduler, controller-manager, kwok GPU nodes and training-operator."""
    return _cluster_session.ensure(*FULL)


@pytest.fixture(scope="session")
def trainer_cluster(_cluster_session: Cluster) -> Cluster:
    """The control plane with scheduler, controller-manager, kwok GPU nodes, JobSet and Trainer v2."""
    return _cluster_session.ensure(*TRAINER_STACK)


@pytest.fixture
def cluster_namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one test; deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    if cluster.service_account_admission:
        # Pods are refused until the controller-manager has made the namespace's default
        # ServiceAccount, which takes a moment on a loaded machine.
        wait_for(
            lambda: (
                cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0
            ),
            timeout=60,
            interval=0.2,
            what=f"the default ServiceAccount of {name}",
        )
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselection looks at the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the control plane with ``cluster`` (for ``-m 'not cluster'``)."""
    for item in items:
        if _FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    """Attach component log paths and tails to the report of a failed control-plane test."""
    report: pytest.TestReport = yield
    if report.failed and _session_cluster is not None and _FIXTURES & set(getattr(item, "fixturenames", ())):
        report.sections.append(("control plane logs", _session_cluster.describe_logs()))
    return report
