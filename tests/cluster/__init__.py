"""A real Kubernetes control plane (etcd, kube-apiserver, scheduler, controller-manager, kwok,
Kubeflow training-operator) built from Go modules and run on loopback for tests.

See tests/cluster/README.md. Pytest fixtures live in :mod:`tests.cluster.fixtures`.
"""

from .controlplane import (
    CONTROLLER_MANAGER,
    EXIT_CODE_ANNOTATION,
    FULL,
    GPU_RESOURCE,
    KWOK,
    OPTIONAL_COMPONENTS,
    OUTCOME_LABEL,
    RUN_DURATION_ANNOTATION,
    SCHEDULER,
    TRAINING_OPERATOR,
    BuildError,
    Cluster,
    CommandError,
    build,
    read_versions,
    wait_for,
)
from .processes import ComponentError

__all__ = [
    "CONTROLLER_MANAGER",
    "EXIT_CODE_ANNOTATION",
    "FULL",
    "GPU_RESOURCE",
    "KWOK",
    "OPTIONAL_COMPONENTS",
    "OUTCOME_LABEL",
    "RUN_DURATION_ANNOTATION",
    "SCHEDULER",
    "TRAINING_OPERATOR",
    "BuildError",
    "Cluster",
    "CommandError",
    "ComponentError",
    "build",
    "read_versions",
    "wait_for",
]
