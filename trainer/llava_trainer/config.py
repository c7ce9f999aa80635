"""Typed configuration of each `llava-trainer` subcommand, parsed from command-line flags.

The flags are the contract with the operator: the renderer writes them into the container args,
this module parses them back. Each stage's hyperparameters are the stage contract
(`llava_operator.api.stage_params`, shared with the LlavaRun API, so names, bounds and defaults
are defined once); the classes here add what the operator derives from the rest of the run
(data paths, the accelerator) and what only a direct command line uses. Flag names are the field
names in kebab-case; every value is explicit (`--gradient-checkpointing true`), so a rendered
command round-trips exactly. Importing this module must stay cheap: no torch.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, Literal, get_args, get_origin

from llava_operator.api.profiles import AcceleratorProfileName
from llava_operator.api.spec import Paths
from llava_operator.api.stage_params import (
    BadImages,
    EvaluateParams,
    FinetuneParams,
    LoraParams,
    PrepareParams,
    PretrainParams,
    TrainingParams,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

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
LAYOUT = Paths()
"""The data_dir layout's defaults (the FlagPerf llava1.5 case), as the LlavaRun API defines them."""
BAD_IMAGES_DEFAULT: BadImages = TrainingParams.model_fields["bad_images"].default


class StageConfig(BaseModel):
    """Flags every subcommand takes."""

    # Errors name the snake_case field (the flag), not the API's camelCase alias.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, loc_by_alias=False)

    data_dir: Path
    """The data_dir root; relative paths below resolve against it."""
    output_dir: Path | None = None
    """Where this stage writes; default: <data-dir>/Output/<stage directory>."""

    stage: str = Field("", exclude=True)  # set by the subclass; not a flag

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
        return self.data_dir / LAYOUT.output

    @property
    def stage_output(self) -> Path:
        return self.output_dir if self.output_dir is not None else self.output_root / OUTPUT_DIRS[self.stage]

    @property
    def index_path(self) -> Path:
        return self.output_root / OUTPUT_DIRS["prepare"] / INDEX_FILE


class ModelPaths(StageConfig):
    language_model: str = LAYOUT.language_model
    vision_tower: str = LAYOUT.vision_tower

    @property
    def start_model(self) -> Path | None:
        """The Hugging Face LLaVA directory a task finetune starts from; None when the model is
        assembled from language_model, vision_tower and a projector."""
        return None

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer's directory: the LLaVA model's in a task finetune, else the language model's."""
        return self.start_model or self.resolve(self.language_model)

    @property
    def vision_dir(self) -> Path:
        """Whose config.json gives the image geometry and whose preprocessor_config.json the image
        processor: the LLaVA model in a task finetune, else the vision tower."""
        return self.start_model or self.resolve(self.vision_tower)


class PrepareConfig(PrepareParams, ModelPaths):
    stage: str = Field("prepare", exclude=True)
    pretrain_data: str = LAYOUT.pretrain_data
    pretrain_images: str = LAYOUT.pretrain_images
    finetune_data: str = LAYOUT.finetune_data
    finetune_images: str = LAYOUT.finetune_images
    mmmu_dir: str = LAYOUT.mmmu
    stages: list[Literal["pretrain", "finetune", "evaluate"]] = ["pretrain", "finetune", "evaluate"]
    """Which later stages' inputs to verify."""
    max_length: int = TrainingParams.model_fields["max_length"].default
    """The longest max_length of the run's training stages (token lengths are measured up to it)."""
    workers: int = 0
    """Processes for image checks and tokenization (0: one per CPU core)."""
    pretrain_bad_images: BadImages = BAD_IMAGES_DEFAULT
    """The pretrain stage's bad_images: prepare fails when that stage would stop on this data."""
    finetune_bad_images: BadImages = BAD_IMAGES_DEFAULT
    """The finetune stage's bad_images (see pretrain_bad_images)."""
    finetune_model_path: str | None = None
    """The finetune stage's model_path (task finetune): prepare checks that LLaVA directory and
    measures lengths with its tokenizer instead of language_model's."""

    @model_validator(mode="after")
    def _task_finetune_alone(self) -> PrepareConfig:
        if self.finetune_model_path is not None and "pretrain" in self.stages:
            raise ValueError(
                "--finetune-model-path (a task finetune from a whole LLaVA model) leaves nothing for "
                "pretrain to do: drop pretrain from --stages"
            )
        return self

    @property
    def start_model(self) -> Path | None:
        return self.resolve(self.finetune_model_path) if "finetune" in self.stages else None


class TrainConfig(TrainingParams, ModelPaths):
    """pretrain and finetune: the stage contract plus the run's data paths and accelerator."""

    data_path: str
    image_folder: str
    template: Literal["plain", "vicuna_v1"]
    """The conversation template; fixed per stage (plain for pretrain, vicuna_v1 for finetune)."""
    peak_tflops: float = Field(0.0, ge=0)
    """Stated per-device peak for MFU; 0: LLAVARUN_PEAK_TFLOPS, else the device's row in the
    accelerator table, else the --accelerator profile's default."""
    accelerator: AcceleratorProfileName | None = None
    """The run's accelerator profile, whose default peak counts when the device is not in the table."""

    @property
    def lora_params(self) -> LoraParams | None:
        """A LoRA finetune's settings; None for a full finetune and for pretrain."""
        return getattr(self, "lora", None)


class PretrainConfig(PretrainParams, TrainConfig):
    stage: str = Field("pretrain", exclude=True)
    data_path: str = LAYOUT.pretrain_data
    image_folder: str = LAYOUT.pretrain_images
    template: Literal["plain"] = "plain"


class FinetuneConfig(FinetuneParams, TrainConfig):
    stage: str = Field("finetune", exclude=True)
    data_path: str = LAYOUT.finetune_data
    image_folder: str = LAYOUT.finetune_images
    template: Literal["vicuna_v1"] = "vicuna_v1"

    @property
    def projector_path(self) -> Path:
        """Default: <output root>/checkpoints_pretrain/mm_projector.bin."""
        explicit = self.resolve(self.pretrained_projector)
        return explicit or self.output_root / OUTPUT_DIRS["pretrain"] / PROJECTOR_FILE

    @property
    def start_model(self) -> Path | None:
        return self.resolve(self.model_path)


class EvaluateConfig(EvaluateParams, StageConfig):
    stage: str = Field("evaluate", exclude=True)
    mmmu_dir: str = LAYOUT.mmmu
    responses: Path | None = None
    """Score this {question_id: response} JSON file instead of generating (no model needed)."""

    @property
    def model_dir(self) -> Path:
        """Default: <output root>/checkpoints_finetune/model."""
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


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a nested contract section (`X` or `X | None`, e.g. finetune's lora), else None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _flags(config: type[BaseModel]) -> Iterator[tuple[str, str | None, FieldInfo]]:
    """(flag field, section, field) of every flag: a plain field is its own flag; each field of a
    nested section is `<section>_<field>` (`--lora-r`), one definition serialised flat."""
    for name, field in config.model_fields.items():
        if field.exclude:
            continue
        nested = _nested_model(field.annotation)
        if nested is None:
            yield name, None, field
        else:
            for inner, inner_field in nested.model_fields.items():
                yield f"{name}_{inner}", name, inner_field


def add_config_flags(parser: argparse.ArgumentParser, config: type[StageConfig]) -> None:
    """One `--kebab-name VALUE` flag per config field (per field of a nested section: any of them
    turns the section on); values are validated by the model."""
    groups: dict[str, Any] = {}
    for name, section, field in _flags(config):
        target: Any = parser
        if section is not None:
            if section not in groups:
                about = config.model_fields[section].description or ""
                groups[section] = parser.add_argument_group(
                    f"{flag_name(section)}-*", f"{about} Any of these flags turns it on."
                )
            target = groups[section]
        kind = "comma-separated list" if _is_list(field.annotation) else _type_hint(field.annotation)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} ({kind}; default: {default})".strip()
        target.add_argument(flag_name(name), dest=name, default=argparse.SUPPRESS, help=help_text)


def _type_hint(annotation: Any) -> str:
    present = [a for a in get_args(annotation) if a is not type(None)]
    if isinstance(annotation, UnionType) and len(present) == 1:  # `X | None` is shown as X
        annotation = present[0]
    if get_origin(annotation) is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "|".join(str(member.value) for member in annotation)
    if _is_list(annotation):
        return _type_hint(get_args(annotation)[0])
    return getattr(annotation, "__name__", str(annotation))


def parse_config(config: type[StageConfig], namespace: argparse.Namespace) -> StageConfig:
    """Build the typed config from parsed flags, with readable errors naming the flag."""
    values: dict[str, Any] = {}
    given = vars(namespace)
    for name, section, field in _flags(config):
        if name in given:
            raw = given[name]
            value = [v for v in raw.split(",") if v] if _is_list(field.annotation) else raw
            if section is None:
                values[name] = value
            else:
                values.setdefault(section, {})[name.removeprefix(f"{section}_")] = value
    if "data_dir" not in values and os.environ.get("LLAVARUN_DATA_DIR"):
        values["data_dir"] = os.environ["LLAVARUN_DATA_DIR"]
    try:
        return config.model_validate(values)
    except ValidationError as err:
        lines = [
            f"{_error_flag(e['loc'])}: {e['msg']}"
            + (f" (got {e['input']!r})" if e["type"] != "missing" else "")
            for e in err.errors()
        ]
        raise SystemExit("llava-trainer: invalid flags:\n  " + "\n  ".join(lines)) from None


def _error_flag(loc: tuple[Any, ...]) -> str:
    """The flag an error location names: ('lora', 'r') is --lora-r, ('stages', 0) is --stages."""
    names = [str(part) for part in loc if not isinstance(part, int)]
    return flag_name("_".join(names)) if names else ""


def config_to_args(config: StageConfig) -> list[str]:
    """The flags that reproduce `config` (used by the renderer's round-trip test and the local runner)."""
    args: list[str] = []
    dumped = config.model_dump(exclude_none=True, mode="json")
    for name, section, _ in _flags(type(config)):
        value = dumped.get(section, {}).get(name.removeprefix(f"{section}_")) if section else dumped.get(name)
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = str(value).lower()
        args += [flag_name(name), str(value)]
    return args
