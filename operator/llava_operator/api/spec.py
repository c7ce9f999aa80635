"""LlavaRun spec: what a user asks for. Defaults are the LLaVA-1.5 recipe (13B, 8 GPUs).

Every cross-field rule here is written twice on purpose: once as a pydantic validator (so
`llavarun validate` explains it offline) and once as a CEL rule in `x-kubernetes-validations`
(so `kubectl apply` refuses the object without a webhook). `tests/unit/test_invalid_runs.py`
and the control-plane tests replay the same invalid objects against both.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .. import kinds
from .base import ApiModel
from .profiles import PROFILES, AcceleratorProfile, AcceleratorProfileName
from .stage_params import (
    ONE_STARTING_POINT,
    EvaluateParams,
    FinetuneParams,
    PrepareParams,
    PretrainParams,
    TrainingParams,
)


class Stage(StrEnum):
    PREPARE = "prepare"
    PRETRAIN = "pretrain"
    FINETUNE = "finetune"
    EVALUATE = "evaluate"


STAGE_ORDER: tuple[Stage, ...] = tuple(Stage)
TRAINING_STAGES: tuple[Stage, ...] = (Stage.PRETRAIN, Stage.FINETUNE)

#: Longest LlavaRun name such that `<run>-<stage>-r<attempt>-worker-<index>` (pods, services)
#: stays a 63-character DNS-1035 label: 63 - len("-finetune-r10-worker-511").
MAX_RUN_NAME_LENGTH = 39
MAX_RETRIES = 10
MAX_NODES = 512
#: Durations in seconds: ten years, so seconds x 1e9 stays inside Go's int64 time.Duration.
MAX_DURATION_SECONDS = 10 * 365 * 24 * 3600
#: A pod's grace period: a day is more than any checkpoint needs.
MAX_GRACE_SECONDS = 24 * 3600
DNS1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Kubernetes resource.Quantity, as in the apimachinery OpenAPI schema.
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

Quantity = Annotated[str, Field(pattern=QUANTITY, max_length=64)]
RelativePath = Annotated[
    str,
    Field(
        min_length=1,
        max_length=512,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')",
                    "message": "must be a path relative to the data volume, without '..'",
                }
            ]
        },
    ),
]
_PARENT_SEGMENT = re.compile(r"(^|/)\.\.(/|$)")


def check_relative_path(value: str) -> str:
    if value.startswith("/") or _PARENT_SEGMENT.search(value):
        raise ValueError(f"{value!r} must be a path relative to the data volume, without '..'")
    return value


def _preserve_unknown(description: str) -> dict[str, Any]:
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "description": description}


class BackendKind(StrEnum):
    """What runs a stage attempt on a cluster."""

    PYTORCHJOB = kinds.PYTORCHJOB
    TRAINJOB = kinds.TRAINJOB


#: What a TrainJob's runtimePatches cannot carry, so a TrainJob run refuses it (field, reason).
_TRAINJOB_REFUSED = (
    ("priorityClassName", "a TrainJob's runtimePatches cannot set a pod's priorityClassName"),
    ("schedulerName", "a TrainJob's runtimePatches cannot set a pod's schedulerName"),
)
_TRAINJOB_RULES = [
    {
        "rule": f"!has(self.backend) || self.backend != 'TrainJob' || !has(self.placement) "
        f"|| !has(self.placement.{field})",
        "message": f"placement.{field} is not supported with backend TrainJob: {reason} "
        f"(use backend PyTorchJob, or set it in your own ClusterTrainingRuntime)",
        "fieldPath": f".placement.{field}",
    }
    for field, reason in _TRAINJOB_REFUSED
] + [
    {
        "rule": "!has(self.backend) || self.backend != 'TrainJob' || !has(self.imagePullPolicy) "
        "|| self.imagePullPolicy == 'IfNotPresent'",
        "message": "imagePullPolicy is not supported with backend TrainJob: the ClusterTrainingRuntime "
        "sets it (use backend PyTorchJob, or set it in your own ClusterTrainingRuntime)",
        "fieldPath": ".imagePullPolicy",
    }
]
_PYTORCHJOB_RULES = [
    {
        "rule": "!has(self.trainingRuntime) || !has(self.backend) || self.backend == 'TrainJob'",
        "message": "trainingRuntime is used only by backend TrainJob; this run's stages run as PyTorchJobs "
        "(set backend: TrainJob, or remove trainingRuntime)",
        "fieldPath": ".trainingRuntime",
    }
]


class Toleration(ApiModel):
    """A core/v1 Toleration."""

    key: str | None = Field(None, max_length=253)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0, le=MAX_DURATION_SECONDS)


class EnvVar(ApiModel):
    """An environment variable with a literal value (e.g. NCCL_IB_HCA)."""

    name: str = Field(pattern=ENV_NAME, max_length=253)
    value: str = Field("", max_length=32768)


class LocalObjectReference(ApiModel):
    name: str = Field(max_length=253)


class Accelerator(ApiModel):
    """The accelerator behind each process. A profile supplies vendor defaults; fields override them."""

    profile: AcceleratorProfileName = AcceleratorProfileName.NVIDIA
    """Vendor profile: resource name, taint, backend and peak FLOP/s come from it."""
    resource_name: str | None = Field(None, max_length=253)
    """Extended resource requested per process, e.g. nvidia.com/gpu, amd.com/gpu, huawei.com/Ascend910."""
    taint_key: str | None = Field(None, max_length=253)
    """Key of the NoSchedule taint on the accelerator nodes; a toleration for it is always rendered."""
    backend: Literal["nccl", "hccl", "cncl", "gloo"] | None = None
    """torch.distributed backend."""
    peak_tflops: float | None = Field(None, gt=0, le=100000)
    """Dense bf16 peak TFLOP/s per device, the MFU denominator; unset, the trainer takes its device's
    row of the accelerator table, else the profile's default."""

    def resolved(self) -> AcceleratorProfile:
        """The profile with this object's overrides applied."""
        base = PROFILES[self.profile]
        return AcceleratorProfile(
            resource_name=self.resource_name or base.resource_name,
            taint_key=self.taint_key or base.taint_key,
            backend=self.backend or base.backend,
            peak_tflops=self.peak_tflops or base.peak_tflops,
            env=base.env,
        )


class Placement(ApiModel):
    """Where stage pods run and what they carry, shared by every stage unless a stage overrides it."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels of the GPU pool, e.g. cloud.google.com/gke-accelerator: nvidia-h100-80gb."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Added to the accelerator-taint toleration that is always rendered."""
    affinity: dict[str, Any] | None = Field(None, json_schema_extra=_preserve_unknown("A core/v1 Affinity."))
    priority_class_name: str | None = Field(None, max_length=253)
    scheduler_name: str | None = Field(None, max_length=253)
    queue_name: str | None = Field(None, max_length=63)
    """Kueue LocalQueue; rendered as the kueue.x-k8s.io/queue-name label, jobs start suspended until admitted."""
    extra_resources: dict[str, Quantity] = Field(default_factory=dict)
    """Extra per-pod resources, e.g. rdma/rdma_shared_device_a: "1"."""
    env: list[EnvVar] = Field(default_factory=list, max_length=128)
    """Extra environment for the trainer container, e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA."""
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    """Pod-template annotations, e.g. k8s.v1.cni.cncf.io/networks for a secondary RDMA network."""


class StageResources(ApiModel):
    """A stage's share of a GPU node pool."""

    nodes: int = Field(1, ge=1, le=MAX_NODES)
    """Pods of the stage's PyTorchJob: one Master plus nodes-1 Workers."""
    gpus_per_node: int = Field(8, ge=1, le=64)
    """Accelerators per pod, and so processes per pod (nprocPerNode); processes per pod on the cpu profile."""
    cpu: Quantity | None = None
    """CPU request and limit per pod."""
    memory: Quantity | None = None
    """Memory request and limit per pod."""
    shm_size: Quantity = "32Gi"
    """Size of the memory-backed /dev/shm (DataLoader workers, NCCL); counts against the pod's memory."""
    node_selector: dict[str, str] | None = None
    """Replaces spec.placement.nodeSelector for this stage."""
    tolerations: list[Toleration] | None = Field(None, max_length=32)
    """Replaces spec.placement.tolerations for this stage."""
    active_deadline_seconds: int | None = Field(None, ge=1, le=MAX_DURATION_SECONDS)
    """Kills the stage's PyTorchJob after this many seconds (counts as a failed attempt)."""
    termination_grace_period_seconds: int | None = Field(None, ge=1, le=MAX_GRACE_SECONDS)
    """Seconds a stopped pod (suspend, preemption, node drain) has to save a checkpoint before it is
    killed. Default: sized from what the stage saves (trained weights and optimizer states, at
    1 GiB/s per node, x1.5, + 30 s), e.g. about 300 s for the 13B finetune on one node."""

    @property
    def processes(self) -> int:
        return self.nodes * self.gpus_per_node


class PrepareResources(ApiModel):
    """prepare is one CPU-only pod."""

    cpu: Quantity = "4"
    memory: Quantity = "16Gi"
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = Field(None, max_length=32)
    active_deadline_seconds: int | None = Field(None, ge=1, le=MAX_DURATION_SECONDS)


_BATCH_RULE = {
    "rule": "self.globalBatchSize % (self.microBatchSize * self.resources.nodes * self.resources.gpusPerNode) == 0",
    "message": "globalBatchSize must be divisible by microBatchSize x resources.nodes x resources.gpusPerNode "
    "(the gradient-accumulation steps must be a whole number)",
}


class TrainingStage(TrainingParams):
    """The cluster's side of a training stage: its GPU node pool, and the batch rule that needs it."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [_BATCH_RULE]})

    resources: StageResources = Field(default_factory=StageResources)

    @model_validator(mode="after")
    def _batch_divisible(self) -> TrainingStage:
        per_step = self.micro_batch_size * self.resources.processes
        if self.global_batch_size % per_step:
            raise ValueError(
                f"globalBatchSize {self.global_batch_size} must be divisible by microBatchSize x nodes x "
                f"gpusPerNode = {self.micro_batch_size} x {self.resources.nodes} x "
                f"{self.resources.gpus_per_node} = {per_step}"
            )
        return self


# The stage's own parameters come first in each base list, so their defaults win over the
# shared ones while `resources` keeps its place after the shared hyperparameters.
class PretrainStage(PretrainParams, TrainingStage):
    """Feature alignment: only the projector trains (Vicuna and CLIP frozen), plain template."""


_ONE_STARTING_POINT_RULE = {
    "rule": "!has(self.modelPath) || !has(self.pretrainedProjector)",
    "message": ONE_STARTING_POINT,
    "fieldPath": ".modelPath",
}


class FinetuneStage(FinetuneParams, TrainingStage):
    """Visual instruction tuning: the LLM and projector train (CLIP frozen), vicuna_v1 template."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [_BATCH_RULE, _ONE_STARTING_POINT_RULE]}
    )

    pretrained_projector: RelativePath | None = None
    """mm_projector.bin to start from; default: the pretrain stage's output."""
    model_path: RelativePath | None = None
    """Task finetune: a Hugging Face LLaVA model directory (LlavaForConditionalGeneration, e.g.
    llava-hf/llava-1.5-7b-hf) to start from, tokenizer and image processor included, instead of
    paths.languageModel + paths.visionTower + the pretrained projector."""

    _check_paths = field_validator("pretrained_projector", "model_path")(
        lambda v: None if v is None else check_relative_path(v)
    )


class PrepareStage(PrepareParams):
    """Verify and index the data_dir."""

    resources: PrepareResources = Field(default_factory=PrepareResources)


class EvaluateStage(EvaluateParams):
    """MMMU accuracy with the official prompts and answer parsing."""

    model_path: RelativePath | None = None
    """HF model directory to evaluate; default: the finetune stage's output."""
    resources: StageResources = Field(default_factory=StageResources)

    _check_model = field_validator("model_path")(lambda v: None if v is None else check_relative_path(v))


class Volume(ApiModel):
    """A volume mounted into every stage pod."""

    model_config = ConfigDict(json_schema_extra={"required": ["source"]})

    source: dict[str, Any] = Field(
        json_schema_extra=_preserve_unknown(
            "A core/v1 volume source, e.g. {persistentVolumeClaim: {claimName: llava-data}}."
        )
    )
    mount_path: str = Field("/data", pattern=r"^/.*", max_length=512)
    read_only: bool = False

    @field_validator("source")
    @classmethod
    def _one_source(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) != 1 or not isinstance(next(iter(value.values())), dict):
            raise ValueError(
                "must name exactly one volume source, e.g. {persistentVolumeClaim: {claimName: llava-data}}"
            )
        return value


class OutputVolume(Volume):
    mount_path: str = Field("/output", pattern=r"^/.*", max_length=512)


class Storage(ApiModel):
    """The data_dir volume and, optionally, a separate volume for outputs."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.output) || self.output.mountPath != self.data.mountPath",
                    "message": "output.mountPath must differ from data.mountPath",
                }
            ]
        }
    )

    data: Volume
    """Holds the data_dir (LLaVA-Pretrain/, LLaVA-Finetune/, MMMU/, Output/)."""
    output: OutputVolume | None = None
    """Checkpoints and results; default: the paths.output directory on the data volume."""

    @model_validator(mode="after")
    def _distinct_mounts(self) -> Storage:
        if self.output is not None and self.output.mount_path == self.data.mount_path:
            raise ValueError("output.mountPath must differ from data.mountPath")
        return self


class Paths(ApiModel):
    """Locations relative to the data_dir; defaults are the FlagPerf llava1.5 case layout."""

    language_model: RelativePath = "LLaVA-Pretrain/checkpoints/vicuna-13b-v1.5"
    vision_tower: RelativePath = "LLaVA-Pretrain/checkpoints/clip-vit-large-patch14-336"
    pretrain_data: RelativePath = "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    pretrain_images: RelativePath = "LLaVA-Pretrain/images"
    finetune_data: RelativePath = "LLaVA-Finetune/llava_v1_5_mix665k.json"
    finetune_images: RelativePath = "LLaVA-Finetune/data"
    mmmu: RelativePath = "MMMU/MMMU"
    output: RelativePath = "Output"
    """Relative to the output volume when storage.output is set, else to the data_dir."""

    _check = field_validator("*")(lambda v: check_relative_path(v))


def _stage_order_rule() -> dict[str, str]:
    """Consecutive stages in recipe order; written out per position (at most 4) because CEL
    compares `listType: set` lists as sets and list-building rules cost too much to admit."""
    rank = "{" + ", ".join(f"'{s.value}': {i}" for i, s in enumerate(STAGE_ORDER)) + "}"
    checks = [
        f"(size(self.stages) < {i + 2} || {rank}[self.stages[{i}]] < {rank}[self.stages[{i + 1}]])"
        for i in range(len(STAGE_ORDER) - 1)
    ]
    return {
        "rule": " && ".join(checks),
        "message": "stages must keep the recipe order prepare, pretrain, finetune, evaluate",
        "fieldPath": ".stages",
    }


_STAGE_ORDER_RULE = _stage_order_rule()
_TASK_FINETUNE_RULE = {
    "rule": "!has(self.finetune) || !has(self.finetune.modelPath) "
    "|| !('pretrain' in self.stages && 'finetune' in self.stages)",
    "message": "finetune.modelPath starts finetune from a whole LLaVA model, so the pretrain stage's "
    "projector would go unused: remove pretrain from stages",
    "fieldPath": ".finetune.modelPath",
}


class LlavaRunSpec(ApiModel):
    """One LLaVA-1.5 recipe run: the chosen stages, each as a PyTorchJob on a GPU node pool."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _STAGE_ORDER_RULE,
                _TASK_FINETUNE_RULE,
                *_TRAINJOB_RULES,
                *_PYTORCHJOB_RULES,
            ]
        }
    )

    stages: list[Stage] = Field(
        default_factory=lambda: list(STAGE_ORDER),
        min_length=1,
        max_length=4,
        json_schema_extra={"x-kubernetes-list-type": "set", "default": [s.value for s in STAGE_ORDER]},
    )
    """Ordered subset of prepare, pretrain, finetune, evaluate."""
    image: str = Field(min_length=1, max_length=512)
    """The llava-trainer container image."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16)
    suspend: bool = False
    """Suspends the running stage's PyTorchJob (its pods are deleted); false resumes it from its checkpoint."""
    retries: int = Field(2, ge=0, le=MAX_RETRIES)
    """Further attempts of a failed stage; each resumes from the newest checkpoint."""
    service_account_name: str | None = Field(None, pattern=DNS1035, max_length=63)
    """Run the stages under this ServiceAccount instead of the one created per run."""
    backend: BackendKind | None = None
    """What runs each stage: PyTorchJob (Kubeflow training-operator) or TrainJob (Kubeflow Trainer
    v2); unset, the operator's default. Recorded in status.backend when the run starts: a started run
    never switches."""
    training_runtime: str | None = Field(None, pattern=r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$", max_length=253)
    """TrainJob backend: the ClusterTrainingRuntime the stages run on; unset, the operator's."""
    accelerator: Accelerator = Field(default_factory=Accelerator)
    placement: Placement = Field(default_factory=Placement)
    storage: Storage
    paths: Paths = Field(default_factory=Paths)
    prepare: PrepareStage = Field(default_factory=PrepareStage)
    pretrain: PretrainStage = Field(default_factory=PretrainStage)
    finetune: FinetuneStage = Field(default_factory=FinetuneStage)
    evaluate: EvaluateStage = Field(default_factory=EvaluateStage)

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, stages: list[Stage]) -> list[Stage]:
        if len(set(stages)) != len(stages):
            raise ValueError(f"stages must not repeat a stage, got {[s.value for s in stages]}")
        if stages != [s for s in STAGE_ORDER if s in stages]:
            raise ValueError(
                f"stages must keep the recipe order prepare, pretrain, finetune, evaluate; "
                f"got {[s.value for s in stages]}"
            )
        return stages

    @field_validator("finetune")
    @classmethod
    def _task_finetune_without_pretrain(cls, finetune: FinetuneStage, info: ValidationInfo) -> FinetuneStage:
        stages = info.data.get("stages") or []
        if finetune.model_path is not None and Stage.PRETRAIN in stages and Stage.FINETUNE in stages:
            raise ValueError(_TASK_FINETUNE_RULE["message"])
        return finetune

    @model_validator(mode="after")
    def _backend_refusals(self) -> LlavaRunSpec:
        """The CEL rules of the chosen backend (an unset backend is the operator's to choose)."""
        refusals = {BackendKind.TRAINJOB: trainjob_refusals, BackendKind.PYTORCHJOB: pytorchjob_refusals}
        refused = refusals[self.backend](self) if self.backend else []
        if refused:
            raise ValueError("; ".join(refused))
        return self

    def stage_config(self, stage: Stage) -> PrepareStage | PretrainStage | FinetuneStage | EvaluateStage:
        return getattr(self, stage.value)


def pytorchjob_refusals(spec: LlavaRunSpec) -> list[str]:
    """Why a PyTorchJob cannot run this spec as asked (the CEL rule's message); [] when it can."""
    return [_PYTORCHJOB_RULES[0]["message"]] if spec.training_runtime else []


def trainjob_refusals(spec: LlavaRunSpec) -> list[str]:
    """Why a TrainJob cannot run this spec as asked (the CEL rules' messages); [] when it can."""
    placement = spec.placement
    refused = [placement.priority_class_name is not None, placement.scheduler_name is not None]
    refused.append(spec.image_pull_policy != "IfNotPresent")
    return [rule["message"] for rule, bad in zip(_TRAINJOB_RULES, refused, strict=True) if bad]
