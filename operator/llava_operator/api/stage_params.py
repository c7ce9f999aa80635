"""What each stage's trainer takes, defined once: names, types, bounds, defaults and meaning.

These models are the stage contract between the LlavaRun API and `llava-trainer`. The API's stage
sections (`spec.pretrain`, …) extend them with what only a cluster needs (resources, placement);
the trainer's typed configs (`llava_trainer.config`) extend them with what the operator derives
from the rest of the run (paths, the accelerator's peak); the renderer turns exactly these fields
into `--kebab-case` flags. So a default, a bound or a docstring written here is what the CRD,
`llava-trainer --help` and a rendered command all say.

Defaults are the LLaVA-1.5 recipe. Field names are snake_case here and camelCase in the CRD.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import ApiModel
from .mmmu import SUBJECTS

#: Seeds stay in numpy's classic 32-bit seed range; seed + batch index (evaluate) then stays far
#: inside the 64-bit range torch.manual_seed accepts.
MAX_SEED = 2**32 - 1
#: Optimizer-step counts (maxSteps, saveSteps, loggingSteps): one step a second for three years.
MAX_STEPS = 100_000_000

LoraTarget = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The linear layers of a LLaMA/Vicuna decoder layer (attention, then the SwiGLU MLP)."""
ONE_STARTING_POINT = (
    "modelPath (a whole LLaVA model, its projector included) and pretrainedProjector exclude each other"
)
BadImages = Literal["error", "skip"]
"""What a training stage does with a missing, corrupt or too large image: stop, or skip and count it."""
Precision = Literal["bf16", "fp16", "fp32"]


class PrepareParams(ApiModel):
    """Verify and index the data_dir."""

    max_listed: int = Field(20, ge=0, le=10000)
    """How many missing/corrupt image paths the report lists (all are counted)."""
    check_images: Literal["all", "exists", "none"] = "all"
    """all: open and decode every image; exists: only stat them; none: skip image checks."""
    measure_lengths: bool = True
    """Tokenize every sample once and store the lengths, so training start-up needs no rescan."""


class TrainingParams(ApiModel):
    """Hyperparameters shared by pretrain and finetune (LLaVA's train.py flags)."""

    learning_rate: float = Field(gt=0, le=1)
    global_batch_size: int = Field(ge=1, le=65536)
    """Samples per optimizer step over all processes (LLaVA keeps it fixed when the GPU count changes)."""
    micro_batch_size: int = Field(ge=1, le=4096)
    """Samples per process per forward pass; gradient accumulation makes up the rest."""
    epochs: int = Field(1, ge=1, le=100)
    max_steps: int = Field(0, ge=0, le=MAX_STEPS)
    """Stop after this many optimizer steps (0: run all epochs). Benchmarks use it."""
    max_length: int = Field(2048, ge=64, le=32768)
    """Tokens per sample after the 576 image tokens are spliced in; longer samples are truncated."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    precision: Precision = "bf16"
    zero_stage: int = Field(ge=0, le=3)
    """DeepSpeed ZeRO stage."""
    gradient_checkpointing: bool = True
    save_steps: int = Field(ge=1, le=MAX_STEPS)
    """Checkpoint every N optimizer steps (and at the end); a retried attempt resumes from the newest."""
    save_total_limit: int = Field(1, ge=1, le=100)
    logging_steps: int = Field(1, ge=1, le=MAX_STEPS)
    dataloader_workers: int = Field(4, ge=0, le=64)
    seed: int = Field(42, ge=0, le=MAX_SEED)
    """Seeds the new projector's initialisation and the data order."""
    image_aspect_ratio: Literal["square", "pad"]
    """square: CLIP resize + centre crop; pad: expand to square with the CLIP mean colour first."""
    group_by_modality_length: bool
    """Batches never mix image and text-only samples and hold similar lengths (~25% faster finetune)."""
    bad_images: BadImages = "error"
    """A missing or corrupt image fails the stage (error) or is skipped and counted (skip); prepare
    fails when the stage would stop on its data."""


class PretrainParams(TrainingParams):
    """Feature alignment: only the projector trains (Vicuna and CLIP frozen), plain template."""

    learning_rate: float = Field(1e-3, gt=0, le=1)
    global_batch_size: int = Field(256, ge=1, le=65536)
    micro_batch_size: int = Field(32, ge=1, le=4096)
    zero_stage: int = Field(2, ge=0, le=3)
    save_steps: int = Field(500, ge=1, le=MAX_STEPS)
    image_aspect_ratio: Literal["square", "pad"] = "square"
    group_by_modality_length: bool = False


class LoraParams(ApiModel):
    """LoRA finetune (LLaVA-1.5's finetune_lora.sh): low-rank adapters on the LLM's linear layers
    train while the LLM's own weights stay frozen; the projector trains fully at the stage's
    learningRate. The exported model has the adapters merged in."""

    r: int = Field(128, ge=1, le=4096)
    """Rank of each adapter."""
    alpha: int = Field(256, ge=1, le=65536)
    """An adapter's update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on each adapter's input."""
    target_modules: list[LoraTarget] = Field(
        default_factory=list, max_length=7, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Linear layers of every LLM decoder layer that get adapters; empty: all of them (the LM head
    never gets one), as LLaVA's scripts."""
    learning_rate: float = Field(2e-4, gt=0, le=1)
    """The adapters' learning rate (finetune_lora.sh's --learning_rate); the projector keeps the
    stage's learningRate (its --mm_projector_lr, 2e-5)."""


class FinetuneParams(TrainingParams):
    """Visual instruction tuning: the LLM and projector train (CLIP frozen), vicuna_v1 template."""

    learning_rate: float = Field(2e-5, gt=0, le=1)
    global_batch_size: int = Field(128, ge=1, le=65536)
    micro_batch_size: int = Field(16, ge=1, le=4096)
    zero_stage: int = Field(3, ge=0, le=3)
    save_steps: int = Field(1000, ge=1, le=MAX_STEPS)
    image_aspect_ratio: Literal["square", "pad"] = "pad"
    group_by_modality_length: bool = True
    pretrained_projector: str | None = Field(None, min_length=1, max_length=512)
    """mm_projector.bin to start from; default: the pretrain stage's output."""
    model_path: str | None = Field(None, min_length=1, max_length=512)
    """Task finetune: a Hugging Face LLaVA model directory (LlavaForConditionalGeneration, e.g.
    llava-hf/llava-1.5-7b-hf) to start from, tokenizer and image processor included, instead of
    paths.languageModel + paths.visionTower + the pretrained projector."""
    lora: LoraParams | None = None
    """LoRA finetune when set (`{}` takes LLaVA's r 128, alpha 256, dropout 0.05, lr 2e-4 on every
    linear layer of the LLM); unset: the whole LLM trains."""

    @model_validator(mode="after")
    def _one_starting_point(self) -> FinetuneParams:
        if self.model_path is not None and self.pretrained_projector is not None:
            raise ValueError(ONE_STARTING_POINT)
        return self


class EvaluateParams(ApiModel):
    """MMMU accuracy with the official prompts and answer parsing."""

    split: Literal["dev", "validation", "test"] = "validation"
    subjects: list[Literal[SUBJECTS]] = Field(  # type: ignore[valid-type]
        default_factory=list, max_length=30, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Subjects to evaluate; empty means all 30."""
    model_path: str | None = Field(None, min_length=1, max_length=512)
    """HF model directory to evaluate; default: the finetune stage's output."""
    images: Literal["first", "referenced"] = "first"
    """first: image_1 only, as the official MMMU protocol; referenced: every <image N> the question cites."""
    max_new_tokens: int = Field(128, ge=1, le=4096)
    num_beams: int = Field(1, ge=1, le=16)
    """The official MMMU LLaVA run samples with 5 beams (doSample true, numBeams 5)."""
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0, le=10)
    batch_size: int = Field(8, ge=1, le=1024)
    """Questions per process per generate call."""
    seed: int = Field(42, ge=0, le=MAX_SEED)
    """Seeds each batch's generation (seed + batch index) and the fallback answer of unparsable responses."""
    precision: Precision = "bf16"


STAGE_PARAMS: dict[str, type[ApiModel]] = {
    "prepare": PrepareParams,
    "pretrain": PretrainParams,
    "finetune": FinetuneParams,
    "evaluate": EvaluateParams,
}
"""Each stage's trainer-facing fields, by stage name."""
