"""Shared pytest configuration."""

# The real control plane (etcd, kube-apiserver, ...): fixtures `cluster`, `full_cluster`,
# `cluster_namespace`; see tests/cluster/README.md.
pytest_plugins = ["tests.cluster.fixtures"]
