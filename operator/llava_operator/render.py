"""Render what the operator creates for a LlavaRun: per-run RBAC and one PyTorchJob per stage;
`stage_values` is the stage contract every cluster backend renders (backends/trainjob.py too).

Pure: (LlavaRun, stage, attempt) -> manifests as dicts. The Jinja2 templates only lay out
structure; every value goes through `tojson`, so user strings stay strings.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2

from . import yamlio
from .api import API_VERSION, KIND, LlavaRun, Stage
from .api.spec import PrepareResources, StageResources, Toleration
from .capacity.checkpoint import grace_period_seconds
from .naming import (
    KUEUE_QUEUE_LABEL,
    common_labels,
    job_name,
    stage_labels,
    status_role,
    trainer_service_account,
)
from .trainer_command import launcher_command, stage_env, trainer_args

RUN_AS_USER = 1000
POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_USER,
    "fsGroup": RUN_AS_USER,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("llava_operator", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )


def _render(template: str, **values: Any) -> list[dict[str, Any]]:
    text = _environment().get_template(template).render(**values)
    return [doc.data for doc in yamlio.parse_documents(text, template) if doc.data]


def owner_reference(run: LlavaRun) -> dict[str, Any] | None:
    """The controller owner reference to the run (None before the run exists on a cluster)."""
    if not run.metadata.uid:
        return None
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": run.name,
        "uid": run.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def service_account_name(run: LlavaRun) -> str:
    return run.spec.service_account_name or trainer_service_account(run.name)


def render_rbac(run: LlavaRun) -> list[dict[str, Any]]:
    """ServiceAccount (unless the spec names one), Role and RoleBinding for the trainer."""
    return _render(
        "rbac.yaml.j2",
        create_service_account=run.spec.service_account_name is None,
        service_account=service_account_name(run),
        role=status_role(run.name),
        run=run.name,
        namespace=run.namespace,
        labels=common_labels(run.name),
        owner=owner_reference(run),
    )


def _tolerations(run: LlavaRun, override: list[Toleration] | None) -> list[dict[str, Any]]:
    profile = run.spec.accelerator.resolved()
    rendered: list[dict[str, Any]] = []
    if profile.taint_key:
        rendered.append({"key": profile.taint_key, "operator": "Exists", "effect": "NoSchedule"})
    chosen = override if override is not None else run.spec.placement.tolerations
    rendered += [t.to_k8s() for t in chosen]
    return rendered


def _resources(run: LlavaRun, res: StageResources | PrepareResources, gpus: int) -> dict[str, Any]:
    profile = run.spec.accelerator.resolved()
    amounts: dict[str, str] = {}
    if res.cpu:
        amounts["cpu"] = res.cpu
    if res.memory:
        amounts["memory"] = res.memory
    if gpus and profile.resource_name:
        amounts[profile.resource_name] = str(gpus)
    if isinstance(res, StageResources):
        amounts.update(run.spec.placement.extra_resources)
    # Extended resources need requests == limits; equal CPU/memory also gives Guaranteed QoS.
    return {"limits": dict(amounts), "requests": dict(amounts)} if amounts else {}


def _env(run: LlavaRun, stage: Stage, attempt: int) -> list[dict[str, Any]]:
    env = {
        "LLAVARUN_NAME": run.name,
        "LLAVARUN_NAMESPACE": run.namespace,
        **stage_env(run.spec, run.name, stage, attempt),
        "HOME": "/tmp",
    }
    rendered = [{"name": k, "value": v} for k, v in env.items()]
    # User env comes last so it can override (e.g. NCCL_DEBUG), except the run identity above.
    identity = {k for k in env if k.startswith("LLAVARUN_")}
    rendered += [e.to_k8s() for e in run.spec.placement.env if e.name not in identity]
    return rendered


def _volumes(run: LlavaRun, shm_size: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    storage = run.spec.storage
    volumes = [{"name": "data", **storage.data.source}]
    mounts = [{"name": "data", "mountPath": storage.data.mount_path, "readOnly": storage.data.read_only}]
    if storage.output is not None:
        volumes.append({"name": "output", **storage.output.source})
        mounts.append({"name": "output", "mountPath": storage.output.mount_path, "readOnly": False})
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    if shm_size:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def stage_values(run: LlavaRun, stage: Stage, attempt: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """What every cluster backend renders for one attempt of one stage: the job-level values
    (name, labels, nodes, processes per node, suspension, deadline) and the pod's."""
    spec = run.spec
    config = spec.stage_config(stage)
    res = config.resources
    is_prepare = isinstance(res, PrepareResources)
    gpus = 0 if is_prepare else res.gpus_per_node
    labels = stage_labels(run.name, stage, attempt)
    job_labels = dict(labels)
    if spec.placement.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = spec.placement.queue_name
    volumes, mounts = _volumes(run, None if is_prepare else res.shm_size)
    node_selector = res.node_selector if res.node_selector is not None else spec.placement.node_selector
    pod = {
        "labels": labels,
        "annotations": {**spec.placement.pod_annotations, "sidecar.istio.io/inject": "false"},
        "service_account": service_account_name(run),
        "priority_class_name": spec.placement.priority_class_name,
        "scheduler_name": spec.placement.scheduler_name,
        "node_selector": node_selector,
        "tolerations": _tolerations(run, res.tolerations),
        "affinity": spec.placement.affinity,
        "image_pull_secrets": [s.to_k8s() for s in spec.image_pull_secrets],
        "pod_security_context": POD_SECURITY_CONTEXT,
        "container_security_context": CONTAINER_SECURITY_CONTEXT,
        "image": spec.image,
        "image_pull_policy": spec.image_pull_policy,
        "command": launcher_command(stage),
        "args": trainer_args(spec, stage),
        "env": _env(run, stage, attempt),
        "termination_grace_period_seconds": grace_period_seconds(spec, stage),
        "resources": _resources(run, res, gpus),
        "volume_mounts": mounts,
        "volumes": volumes,
    }
    job = {
        "name": job_name(run.name, stage, attempt),
        "namespace": run.namespace,
        "labels": job_labels,
        "annotations": {"llavarun.io/generation": str(run.metadata.generation or 0)},
        "nodes": 1 if is_prepare else res.nodes,
        "nproc_per_node": 1 if is_prepare else res.gpus_per_node,
        "suspend": spec.suspend,
        "active_deadline_seconds": res.active_deadline_seconds,
    }
    return job, pod


def render_stage_job(run: LlavaRun, stage: Stage, attempt: int = 0) -> dict[str, Any]:
    """The PyTorchJob for one attempt of one stage."""
    job, pod = stage_values(run, stage, attempt)
    replicas = [{"type": "Master", "count": 1}]
    if job["nodes"] > 1:
        replicas.append({"type": "Worker", "count": job["nodes"] - 1})
    job["replicas"] = replicas
    (manifest,) = _render("pytorchjob.yaml.j2", job=job, pod=pod, owner=owner_reference(run))
    return manifest
