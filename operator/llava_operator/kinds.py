"""The kinds of cluster child a stage attempt runs as, by name, and the ClusterTrainingRuntime the
chart ships for TrainJobs. Plain strings, importable without the API models, so the CLI starts
fast; the API's `BackendKind` and the backends take their names from here."""

PYTORCHJOB = "PyTorchJob"
"""Kubeflow training-operator v1 (the default)."""
TRAINJOB = "TrainJob"
"""Kubeflow Trainer v2, over JobSet."""
CLUSTER_KINDS = (PYTORCHJOB, TRAINJOB)
"""What `spec.backend`, `--backend` and the chart may name; the first is the default."""
DEFAULT_TRAINING_RUNTIME = "llavarun-torch"
"""The ClusterTrainingRuntime the chart installs when the TrainJob backend is enabled."""
