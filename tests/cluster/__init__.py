"""A real Kubernetes control plane (etcd, kube-apiserver, scheduler, controller-manager, kwok,
Kubeflow training-operator, JobSet and Kubeflow Trainer v2 controllers) built from Go modules and
run on loopback for tests.

See tests/cluster/README.md. Pytest fixtures live in :mod:`tests.cluster.fixtures`.
"""

from .controlplane import (
    CONTROLLER_MANAGER,
    EXIT_CODE_ANNOTATION,
    FULL,
    GPU_RESOURCE,
    JOBSET,
    KWOK,
    OPTIONAL_COMPONENTS,
    OUTCOME_LABEL,
    RUN_DURATION_ANNOTATION,
    SCHEDULER,
    TRAINER,
    TRAINER_STACK,
    TRAINER_STATUS_PORT,
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
    "JOBSET",
    "KWOK",
    "OPTIONAL_COMPONENTS",
    "OUTCOME_LABEL",
    "RUN_DURATION_ANNOTATION",
    "SCHEDULER",
    "TRAINER",
    "TRAINER_STACK",
    "TRAINER_STATUS_PORT",
    "TRAINING_OPERATOR",
    "BuildError",
    "Cluster",
    "CommandError",
    "ComponentError",
    "build",
    "read_versions",
    "wait_for",
]
