"""Typed configuration of each `llava-trainer` subcommand, parsed from command-line flags.

The flags are the contract with the operator: the PyTorchJob renderer writes them
into the container args, this module parses them back. Flag names are the field names in
kebab-case; every value is explicit (`--gradient-checkpointing true`), so a rendered command
round-trips exactly. Importing this module must stay cheap: no torch.
"""

from __future__ import annotations

import argparse
import os
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, Literal, get_args, get_origin

from llava_operator.api.mmmu import SUBJECTS
from llava_operator.api.profiles import AcceleratorProfileName
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

OUTPUT_DIRS = {
    "prepare": "prepare",
    "pretrain": "checkpoints_pretrain",
    "finetune": "checkpoints_finetune",
    "evaluate": "evaluate",
}
"""Each stage's directory under the output root (FlagPerf's Output/ layout)."""
INDEX_FILE = "index.json"
"""prepare's index/stats file, under <output root>/prepare/; training reuses it."""
PROJECTOR_FILE = "mm_projector.bin"
EXPORT_DIR = "model"
"""The final Hugging Face model directory inside a training stage's output directory."""
BadImages = Literal["error", "skip"]
"""What a training stage does with a missing, corrupt or too large image: stop, or skip and count it."""
BAD_IMAGES_DEFAULT: BadImages = "error"


class StageConfig(BaseModel):
    """Flags every subcommand takes."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    data_dir: Path
    """The data_dir root; relative paths below resolve against it."""
    output_dir: Path | None = None
    """Where this stage writes; default: <data-dir>/Output/<stage directory>."""
    seed: int = 42

    stage: str = ""  # set by the subclass; not a flag

    def resolve(self, path: str | Path | None) -> Path | None:
        """A path flag as an absolute path: relative ones are relative to the data_dir."""
        if path is None:
            return None
        path = Path(path)
        return path if path.is_absolute() else self.data_dir / path

    @property
    def output_root(self) -> Path:
        """The Output/ root shared by all stages of a run."""
        if self.output_dir is not None:
            return self.output_dir.parent
        return self.data_dir / "Output"

    @property
    def stage_output(self) -> Path:
        return self.output_dir if self.output_dir is not None else self.output_root / OUTPUT_DIRS[self.stage]

    @property
    def index_path(self) -> Path:
        return self.output_root / OUTPUT_DIRS["prepare"] / INDEX_FILE


class ModelPaths(StageConfig):
    language_model: str = "LLaVA-Pretrain/checkpoints/vicuna-13b-v1.5"
    vision_tower: str = "LLaVA-Pretrain/checkpoints/clip-vit-large-patch14-336"


class PrepareConfig(ModelPaths):
    stage: str = Field("prepare", exclude=True)
    pretrain_data: str = "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    pretrain_images: str = "LLaVA-Pretrain/images"
    finetune_data: str = "LLaVA-Finetune/llava_v1_5_mix665k.json"
    finetune_images: str = "LLaVA-Finetune/data"
    mmmu_dir: str = "MMMU/MMMU"
    stages: list[Literal["pretrain", "finetune", "evaluate"]] = ["pretrain", "finetune", "evaluate"]
    """Which later stages' inputs to verify."""
    max_length: int = 2048
    max_listed: int = 20
    check_images: Literal["all", "exists", "none"] = "all"
    measure_lengths: bool = True
    workers: int = 0
    """Processes for image checks and tokenization (0: one per CPU core)."""
    pretrain_bad_images: BadImages = BAD_IMAGES_DEFAULT
    """The pretrain stage's bad_images: prepare fails when that stage would stop on this data."""
    finetune_bad_images: BadImages = BAD_IMAGES_DEFAULT
    """The finetune stage's bad_images (see pretrain_bad_images)."""


class TrainConfig(ModelPaths):
    """pretrain and finetune."""

    data_path: str
    image_folder: str
    template: Literal["plain", "vicuna_v1"]
    learning_rate: float = Field(gt=0)
    global_batch_size: int = Field(ge=1)
    micro_batch_size: int = Field(ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int = Field(0, ge=0)
    max_length: int = 2048
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    zero_stage: int = Field(ge=0, le=3)
    gradient_checkpointing: bool = True
    save_steps: int = Field(500, ge=1)
    save_total_limit: int = Field(1, ge=1)
    logging_steps: int = Field(1, ge=1)
    dataloader_workers: int = Field(4, ge=0)
    image_aspect_ratio: Literal["square", "pad"]
    group_by_modality_length: bool
    bad_images: BadImages = BAD_IMAGES_DEFAULT
    peak_tflops: float = Field(0.0, ge=0)
    """Stated per-device peak for MFU; 0: LLAVARUN_PEAK_TFLOPS, else the device's row in the
    accelerator table, else the --accelerator profile's default."""
    accelerator: AcceleratorProfileName | None = None
    """The run's accelerator profile, whose default peak counts when the device is not in the table."""


class PretrainConfig(TrainConfig):
    stage: str = Field("pretrain", exclude=True)
    data_path: str = "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    image_folder: str = "LLaVA-Pretrain/images"
    template: Literal["plain"] = "plain"
    learning_rate: float = Field(1e-3, gt=0)
    global_batch_size: int = Field(256, ge=1)
    micro_batch_size: int = Field(32, ge=1)
    zero_stage: int = Field(2, ge=0, le=3)
    image_aspect_ratio: Literal["square", "pad"] = "square"
    group_by_modality_length: bool = False


class FinetuneConfig(TrainConfig):
    stage: str = Field("finetune", exclude=True)
    data_path: str = "LLaVA-Finetune/llava_v1_5_mix665k.json"
    image_folder: str = "LLaVA-Finetune/data"
    template: Literal["vicuna_v1"] = "vicuna_v1"
    learning_rate: float = Field(2e-5, gt=0)
    global_batch_size: int = Field(128, ge=1)
    micro_batch_size: int = Field(16, ge=1)
    zero_stage: int = Field(3, ge=0, le=3)
    image_aspect_ratio: Literal["square", "pad"] = "pad"
    group_by_modality_length: bool = True
    pretrained_projector: str | None = None
    """Default: <output root>/checkpoints_pretrain/mm_projector.bin."""

    @property
    def projector_path(self) -> Path:
        explicit = self.resolve(self.pretrained_projector)
        return explicit or self.output_root / OUTPUT_DIRS["pretrain"] / PROJECTOR_FILE


class EvaluateConfig(StageConfig):
    stage: str = Field("evaluate", exclude=True)
    model_path: str | None = None
    """Default: <output root>/checkpoints_finetune/model."""
    mmmu_dir: str = "MMMU/MMMU"
    split: Literal["dev", "validation", "test"] = "validation"
    subjects: list[str] = []
    """Empty: all 30."""
    max_new_tokens: int = Field(128, ge=1)
    num_beams: int = Field(1, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    images: Literal["first", "referenced"] = "first"
    """Images shown per question: image_1 only (official MMMU protocol) or every <image N> referenced."""
    responses: Path | None = None
    """Score this {question_id: response} JSON file instead of generating (no model needed)."""

    @field_validator("subjects")
    @classmethod
    def _known_subjects(cls, subjects: list[str]) -> list[str]:
        unknown = sorted(set(subjects) - set(SUBJECTS))
        if unknown:
            raise ValueError(f"unknown MMMU subjects {unknown}; allowed: {', '.join(SUBJECTS)}")
        return subjects

    @property
    def model_dir(self) -> Path:
        explicit = self.resolve(self.model_path)
        return explicit or self.output_root / OUTPUT_DIRS["finetune"] / EXPORT_DIR


CONFIGS: dict[str, type[StageConfig]] = {
    "prepare": PrepareConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "evaluate": EvaluateConfig,
}


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list


def add_config_flags(parser: argparse.ArgumentParser, config: type[StageConfig]) -> None:
    """One `--kebab-name VALUE` flag per config field; values are validated by the model."""
    for name, field in config.model_fields.items():
        if field.exclude:
            continue
        kind = "comma-separated list" if _is_list(field.annotation) else _type_hint(field.annotation)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} ({kind}; default: {default})".strip()
        parser.add_argument(flag_name(name), dest=name, default=argparse.SUPPRESS, help=help_text)


def _type_hint(annotation: Any) -> str:
    present = [a for a in get_args(annotation) if a is not type(None)]
    if isinstance(annotation, UnionType) and len(present) == 1:  # `X | None` is shown as X
        annotation = present[0]
    if get_origin(annotation) is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "|".join(str(member.value) for member in annotation)
    return getattr(annotation, "__name__", str(annotation))


def parse_config(config: type[StageConfig], namespace: argparse.Namespace) -> StageConfig:
    """Build the typed config from parsed flags, with readable errors naming the flag."""
    values: dict[str, Any] = {}
    for name, field in config.model_fields.items():
        if name in vars(namespace):
            raw = getattr(namespace, name)
            values[name] = [v for v in raw.split(",") if v] if _is_list(field.annotation) else raw
    if "data_dir" not in values and os.environ.get("LLAVARUN_DATA_DIR"):
        values["data_dir"] = os.environ["LLAVARUN_DATA_DIR"]
    try:
        return config.model_validate(values)
    except ValidationError as err:
        lines = [
            f"{flag_name(str(e['loc'][0])) if e['loc'] else ''}: {e['msg']}"
            + (f" (got {e['input']!r})" if e["type"] != "missing" else "")
            for e in err.errors()
        ]
        raise SystemExit("llava-trainer: invalid flags:\n  " + "\n  ".join(lines)) from None


def config_to_args(config: StageConfig) -> list[str]:
    """The flags that reproduce `config` (used by the renderer's round-trip test and the local runner)."""
    args: list[str] = []
    for name, value in config.model_dump(exclude_none=True, mode="json").items():
        if isinstance(value, list):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = str(value).lower()
        args += [flag_name(name), str(value)]
    return args
