"""Memory per device of a training step: model states under ZeRO, activations, CLIP, overhead.

Model states follow DeepSpeed's own accounting (a trainer-tier test compares them with
`estimate_zero2/3_model_states_mem_needs`): with bf16/fp16, every parameter is held in 16 bits,
and every *trained* one also has a 16-bit gradient, an fp32 gradient partition, an fp32 master
copy and two fp32 Adam moments (2 + 4 + 4 + 8 = 18 bytes beside the 2-byte weight). ZeRO-1
partitions the fp32 states over the devices, ZeRO-2 also the 16-bit gradients, ZeRO-3 also the
weights (and then gathers the largest module whole; its 16-bit gradients go straight into the
fp32 partition, so 2 + 4 + 4 + 8 bytes per trained parameter, all partitioned). Frozen parts (CLIP; the LLM in pretrain)
cost only their 16-bit weights.

Activations are counted from what the transformers Llama/CLIP/LLaVA modules keep for the
backward pass, per token (the derivation is in docs/PERFORMANCE.md; a trainer-tier test compares
the model with the measured peak of a real forward + backward at small widths). Plain Python.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from llava_trainer.flops import LlavaShape, Stage

from .geometry import Geometry

Precision = Literal["bf16", "fp16", "fp32"]
Optimizer = Literal["deepspeed", "torch"]
GIB = 2**30
CONTEXT_GIB = 2.0
"""CUDA context, NCCL buffers and allocator fragmentation: memory the device loses that no tensor
accounts for (stated, not derived)."""


def element_bytes(precision: Precision) -> int:
    return 4 if precision == "fp32" else 2


@dataclass(frozen=True)
class ModelStates:
    """Bytes per device."""

    parameters: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer


def trained_and_frozen(geometry: Geometry, stage: Stage) -> tuple[int, int]:
    """(trained, frozen) parameters: pretrain trains the projector only; finetune the LLM and
    the projector, or with LoRA (`shape.adapter_params`) the adapters and the projector while the
    LLM stays frozen; CLIP is always frozen."""
    if stage == "pretrain":
        return geometry.projector_params, geometry.llm_params + geometry.vision_params
    if geometry.shape.adapter_params:
        trained = geometry.shape.adapter_params + geometry.projector_params
        return trained, geometry.llm_params + geometry.vision_params
    return geometry.llm_params + geometry.projector_params, geometry.vision_params


def model_states(
    trained: int,
    frozen: int,
    *,
    precision: Precision,
    zero_stage: int,
    devices: int,
    largest_module: int,
    optimizer: Optimizer = "deepspeed",
) -> ModelStates:
    """Parameters, gradients and optimizer states per device.

    `optimizer="torch"` is bench/gpu_step.py's single-device setup: plain torch AdamW whose weights,
    gradients and two moments all stay in the weights' dtype (8 bytes per trained parameter in bf16)."""
    if optimizer == "torch":
        b = element_bytes(precision)
        return ModelStates(b * (trained + frozen), b * trained, 2.0 * b * trained)
    n = max(devices, 1)
    weights = n if zero_stage >= 3 else 1
    grads16 = n if zero_stage >= 2 else 1
    states = n if zero_stage >= 1 else 1
    gathered = largest_module if zero_stage >= 3 else 0
    if precision == "fp32":  # no 16-bit copies: fp32 weights, gradients and two moments
        return ModelStates(
            4.0 * (trained + frozen) / weights + 4.0 * gathered,
            4.0 * trained / grads16,
            8.0 * trained / states,
        )
    # ZeRO-3 reduces 16-bit gradients bucket by bucket straight into the fp32 partition: no
    # 16-bit gradient partition stays (DeepSpeed's 18 bytes there are 2 + 4 + 4 + 8 as well)
    grads16_bytes = 0.0 if zero_stage >= 3 else 2.0 * trained / grads16
    return ModelStates(
        parameters=2.0 * (trained + frozen) / weights + 2.0 * gathered,
        gradients=grads16_bytes + 4.0 * trained / states + 2.0 * gathered,
        optimizer=12.0 * trained / states,
    )


@dataclass(frozen=True)
class Activations:
    """Bytes per device for one micro-batch; `peak` is what adds to the model states."""

    llm_saved: float
    """Kept for backward by the decoder layers (checkpointing: each layer's input only)."""
    recompute: float
    """With checkpointing, one layer's activations rebuilt during its backward, and its gradients."""
    loss: float
    """Logits, their fp32 copy and log-softmax (the largest transient at the end of forward)."""
    projector: float
    """Kept by the trained projector (its input holds a CLIP hidden state alive)."""
    clip_forward: float
    """The frozen CLIP forward's largest moment (before the LLM's activations exist)."""

    @property
    def peak(self) -> float:
        forward_end = self.llm_saved + self.loss
        backward = self.llm_saved + self.recompute
        return max(self.clip_forward, self.projector + max(forward_end, backward))


def layer_saved_per_token(shape: LlavaShape, stage: Stage, b: int) -> float:
    """Bytes one decoder layer keeps for backward per token (SDPA / FlashAttention: no T² terms).

    Each RMSNorm keeps its input in fp32 and the rsqrt; when the layer trains (finetune) also its
    normalised input and its output (the next linear layers' input, for their weight gradients).
    Attention keeps q, k, v, its output and an fp32 log-sum-exp per head (o_proj's input is a view
    of that output). The SwiGLU MLP keeps gate, SiLU(gate) and up, plus their product (down_proj's
    input) when it trains. Frozen linear layers keep nothing: their input gradient needs only the
    weight."""
    trains = stage == "finetune"
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = b * (2 * q + 2 * kv) + 4 * shape.heads
    mlp = b * shape.intermediate * (4 if trains else 3)
    return 2 * _norm_saved(shape, stage, b) + attention + mlp


def _norm_saved(shape: LlavaShape, stage: Stage, b: int) -> float:
    return 4 * shape.hidden + 4 + (2 * b * shape.hidden if stage == "finetune" else 0)


def activations(
    shape: LlavaShape,
    stage: Stage,
    *,
    precision: Precision,
    micro_batch: int,
    seq_len: int,
    images: int,
    checkpointing: bool,
) -> Activations:
    """One micro-batch of `micro_batch` samples padded to `seq_len` tokens holding `images` images
    in all.

    The loss upcasts the logits to fp32; the largest moment is the start of its backward, when
    log-softmax's fp32 output, the fp32 gradient coming into it and the one it produces are all
    alive (12 bytes per vocabulary entry per token, whatever the precision). With checkpointing,
    the backward of each layer rebuilds that layer's activations beside the gradient of its
    input and output hidden states, and the MLP's gradients (three of its width when the layer
    is frozen, two when it trains: down_proj's saved input is freed first)."""
    b = element_bytes(precision)
    tokens = micro_batch * seq_len
    per_layer = layer_saved_per_token(shape, stage, b) * tokens
    gradient_flow = 2 * b * shape.hidden * tokens
    if checkpointing:
        llm_saved = shape.layers * b * shape.hidden * tokens
        mlp_gradients = (3 if stage == "pretrain" else 2) * b * shape.intermediate * tokens
        recompute = per_layer + gradient_flow + mlp_gradients
    else:
        llm_saved = shape.layers * per_layer
        recompute = gradient_flow
    loss = (_norm_saved(shape, stage, b) + 12 * shape.vocab) * tokens
    patches = shape.image_tokens + 1
    projector = images * (patches * shape.vision_hidden + 2 * shape.image_tokens * shape.hidden) * b
    # frozen, so nothing is kept: one layer at a time, its quick-GELU MLP (fc1 output, sigmoid,
    # product) beside the residual stream, its layer-normed copy and the previous hidden state
    # product) beside the residual stream, its layer-normed copy and the previous hidden state;
    # the batch's pixels and the LLM's input embeddings already exist
    clip_layer = patches * (4 * shape.vision_hidden + 3 * shape.vision_intermediate)
    pixels = shape.channels * shape.image_size**2
    clip_forward = (images * (clip_layer + pixels) + tokens * shape.hidden) * b
    return Activations(llm_saved, recompute, loss, projector, clip_forward)


@dataclass(frozen=True)
class StepMemory:
    """Everything on one device during a training step, in bytes."""

    states: ModelStates
    activations: Activations
    activations_without_checkpointing: Activations
    buffers: float
    """ZeRO communication buckets (from the stage's DeepSpeed config)."""
    context: float
    checkpointing: bool

    @property
    def allocated(self) -> float:
        """What torch's allocator would report at peak (no context, no fragmentation)."""
        return self.states.total + self.activations.peak + self.buffers

    @property
    def total(self) -> float:
        return self.allocated + self.context

    def as_gib(self) -> dict[str, float]:
        act = self.activations
        return {
            "parameters": _gib(self.states.parameters),
            "gradients": _gib(self.states.gradients),
            "optimizer": _gib(self.states.optimizer),
            "activations": _gib(act.peak),
            "activationsWithoutCheckpointing": _gib(self.activations_without_checkpointing.peak),
            "clipForward": _gib(act.clip_forward),
            "overhead": _gib(self.buffers + self.context),
            "total": _gib(self.total),
        }

    def parts(self) -> dict[str, float]:
        return {k: _gib(v) for k, v in asdict(self.activations).items()}


def zero_buffers(zero_optimization: dict, precision: Precision) -> float:
    """Bytes of ZeRO's bucket buffers named in a DeepSpeed `zero_optimization` section: the
    gradient reduce bucket, and the all-gather (ZeRO-1/2) or prefetch (ZeRO-3) bucket."""
    b = element_bytes(precision)
    stage = int(zero_optimization.get("stage", 0))
    if stage == 0:
        return 0.0
    reduce = float(zero_optimization.get("reduce_bucket_size", 0))
    if stage == 3:
        return b * (reduce + float(zero_optimization.get("stage3_prefetch_bucket_size", 0)))
    return b * (reduce + float(zero_optimization.get("allgather_bucket_size", 0)))


def step_memory(
    geometry: Geometry,
    stage: Stage,
    *,
    precision: Precision,
    zero_stage: int,
    devices: int,
    micro_batch: int,
    seq_len: int,
    images_per_sample: int,
    checkpointing: bool,
    zero_optimization: dict | None = None,
    optimizer: Optimizer = "deepspeed",
    context_gib: float = CONTEXT_GIB,
) -> StepMemory:
    trained, frozen = trained_and_frozen(geometry, stage)
    states = model_states(
        trained,
        frozen,
        precision=precision,
        zero_stage=zero_stage,
        devices=devices,
        largest_module=geometry.largest_module_params,
        optimizer=optimizer,
    )
    common = {
        "precision": precision,
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "images": micro_batch * images_per_sample,
    }
    return StepMemory(
        states=states,
        activations=activations(geometry.shape, stage, checkpointing=checkpointing, **common),
        activations_without_checkpointing=activations(geometry.shape, stage, checkpointing=False, **common),
        buffers=zero_buffers(zero_optimization or {"stage": zero_stage}, precision),
        context=context_gib * GIB,
        checkpointing=checkpointing,
    )


def _gib(value: float) -> float:
    return round(value / GIB, 2)
