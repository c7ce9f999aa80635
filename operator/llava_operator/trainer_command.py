"""The `llava-trainer` command line of each stage, from a LlavaRun spec.

The flags are built as the trainer's own typed config (llava_trainer.config) and serialised by
it, so what the operator renders is by construction what the trainer parses.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from llava_trainer.config import (
    OUTPUT_DIRS,
    EvaluateConfig,
    FinetuneConfig,
    PrepareConfig,
    PretrainConfig,
    StageConfig,
    config_to_args,
)

from .api import LlavaRunSpec, Stage
from .api.spec import TRAINING_STAGES
from .api.stage_params import STAGE_PARAMS
from .capacity.checkpoint import grace_period_seconds
from .naming import job_name


def data_dir(spec: LlavaRunSpec) -> PurePosixPath:
    return PurePosixPath(spec.storage.data.mount_path)


def output_root(spec: LlavaRunSpec) -> PurePosixPath:
    base = spec.storage.output.mount_path if spec.storage.output else spec.storage.data.mount_path
    return PurePosixPath(base) / spec.paths.output


def stage_output_dir(spec: LlavaRunSpec, stage: Stage) -> PurePosixPath:
    return output_root(spec) / OUTPUT_DIRS[stage.value]


def stage_config(spec: LlavaRunSpec, stage: Stage, *, data_dir_override: str | None = None) -> StageConfig:
    """The trainer's typed config for `stage` of this run (paths as seen inside the pod)."""
    root = data_dir_override or str(data_dir(spec))
    out = str(stage_output_dir(spec, stage))
    if data_dir_override:  # local runs: outputs live under the local data_dir
        out = str(PurePosixPath(data_dir_override) / spec.paths.output / OUTPUT_DIRS[stage.value])
    paths = spec.paths
    # The stage contract's fields, exactly as the user set them (or the recipe's defaults).
    params = spec.stage_config(stage).model_dump(include=set(STAGE_PARAMS[stage.value].model_fields))
    common = {"data_dir": root, "output_dir": out, **params}
    models = {"language_model": paths.language_model, "vision_tower": paths.vision_tower}
    if stage is Stage.PREPARE:
        return PrepareConfig(
            **common,
            **models,
            pretrain_data=paths.pretrain_data,
            pretrain_images=paths.pretrain_images,
            finetune_data=paths.finetune_data,
            finetune_images=paths.finetune_images,
            mmmu_dir=paths.mmmu,
            stages=[s.value for s in spec.stages if s is not Stage.PREPARE],
            # The longest a training stage of this run takes (lengths are measured up to it).
            max_length=max(
                (spec.stage_config(s).max_length for s in TRAINING_STAGES if s in spec.stages),
                default=spec.finetune.max_length,
            ),
            pretrain_bad_images=spec.pretrain.bad_images,
            finetune_bad_images=spec.finetune.bad_images,
            finetune_model_path=spec.finetune.model_path if Stage.FINETUNE in spec.stages else None,
        )
    if stage is Stage.EVALUATE:
        return EvaluateConfig(**common, mmmu_dir=paths.mmmu)
    # MFU's denominator: a stated peak wins; otherwise the trainer looks its device up in the
    # profiles' table and falls back to this profile's default (llava_operator.api.profiles).
    peak = {"peak_tflops": spec.accelerator.peak_tflops or 0.0, "accelerator": spec.accelerator.profile}
    if stage is Stage.PRETRAIN:
        return PretrainConfig(
            **common, **models, **peak, data_path=paths.pretrain_data, image_folder=paths.pretrain_images
        )
    return FinetuneConfig(
        **common, **models, **peak, data_path=paths.finetune_data, image_folder=paths.finetune_images
    )


def trainer_args(spec: LlavaRunSpec, stage: Stage, *, data_dir_override: str | None = None) -> list[str]:
    """`llava-trainer <stage> <flags>`, without the launcher."""
    return [stage.value, *config_to_args(stage_config(spec, stage, data_dir_override=data_dir_override))]


def stage_env(spec: LlavaRunSpec, run_name: str, stage: Stage, attempt: int) -> dict[str, str]:
    """The environment every process of a stage gets, on a cluster and locally: which attempt of
    which stage it is, the accelerator profile's backend and device env, no hub downloads."""
    profile = spec.accelerator.resolved()
    grace = grace_period_seconds(spec, stage)
    env = {
        "LLAVARUN_STAGE": stage.value,
        "LLAVARUN_ATTEMPT": str(attempt),
        "LLAVARUN_JOB": job_name(run_name, stage, attempt),
        "LLAVARUN_DIST_BACKEND": profile.backend,
        # What the pod's terminationGracePeriodSeconds gives the trainer to save on SIGTERM; torchrun
        # waits as long for its workers before it SIGKILLs them (its own default is 30 s).
        "LLAVARUN_GRACE_SECONDS": str(grace),
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(grace),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **profile.env,
    }
    if profile.backend == "nccl":
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    return env


def launcher_command(stage: Stage) -> list[str]:
    """prepare and single-process tools run directly; distributed stages under torchrun, which
    takes --nnodes/--nproc-per-node/--node-rank/--master-* from the PET_* env the
    training-operator injects."""
    if stage is Stage.PREPARE:
        return ["llava-trainer"]
    return ["torchrun", "--no-python", "llava-trainer"]
