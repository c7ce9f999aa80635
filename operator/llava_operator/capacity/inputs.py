"""The plan's edges: which device, which MFU, which geometry and lengths, read from files and flags."""

from __future__ import annotations

from pathlib import Path

from .. import yamlio
from ..api import LlavaRun, Stage
from ..api.profiles import DEFAULT_DEVICES, Device, known_device
from ..trainer_command import stage_config
from .geometry import Geometry, read_geometry, recipe_geometry
from .lengths import TokenLengths, read_index_lengths, recipe_lengths
from .planner import Mfu, capacity_plan
from .timing import DEFAULT_MFU


def choose_device(run: LlavaRun, name: str | None) -> tuple[Device, str]:
    """--device, else a placement node label naming a known device (e.g. nvidia.com/gpu.product:
    NVIDIA-H100-80GB-HBM3), else the profile's default device; a stated peakTflops wins."""
    spec = run.spec
    if name:
        device = known_device(name)
        if device is None:
            raise ValueError(
                f"--device {name!r} is not in the accelerator table (llava_operator.api.profiles)"
            )
        source = f"--device {name}"
    else:
        labels = {**spec.placement.node_selector}
        for hp in (spec.pretrain, spec.finetune):
            labels.update(hp.resources.node_selector or {})
        found = [(k, v, known_device(v)) for k, v in labels.items() if known_device(v)]
        if found:
            key, value, device = found[0]
            source = f"node label {key}: {value}"
        elif spec.accelerator.profile in DEFAULT_DEVICES:
            device = DEFAULT_DEVICES[spec.accelerator.profile]
            source = (
                f"the {spec.accelerator.profile.value} profile's default device (no --device, no node label)"
            )
        else:
            raise ValueError(
                f"profile {spec.accelerator.profile.value} has no device in the table: name one with --device"
            )
    if spec.accelerator.peak_tflops:
        device = Device(device.model, device.name_parts, spec.accelerator.peak_tflops, device.memory_gib)
        source += "; peak from spec.accelerator.peakTflops"
    return device, source


def geometry_for(run: LlavaRun, data_dir: Path | None) -> Geometry:
    paths = run.spec.paths
    if data_dir is not None:
        return read_geometry(data_dir / paths.language_model, data_dir / paths.vision_tower)
    geometry = recipe_geometry(paths.language_model)
    if geometry is None:
        raise ValueError(
            f"no built-in sizes for {paths.language_model} (known: vicuna-7b-v1.5, vicuna-13b-v1.5): "
            "give --data-dir to read its config.json"
        )
    return geometry


def lengths_for(run: LlavaRun, stage: Stage, geometry: Geometry, data_dir: Path | None) -> TokenLengths:
    """prepare's index under the data_dir when it holds the stage, else the recipe's typical lengths."""
    hp = run.spec.pretrain if stage is Stage.PRETRAIN else run.spec.finetune
    image_tokens = geometry.shape.image_tokens
    if data_dir is not None:
        index = Path(stage_config(run.spec, stage, data_dir_override=str(data_dir)).index_path)
        found = read_index_lengths(index, stage.value, image_tokens=image_tokens, max_length=hp.max_length)
        if found is not None:
            return found
    return recipe_lengths(stage.value, image_tokens=image_tokens, max_length=hp.max_length)


def measured_mfu(path: str, stage: Stage) -> Mfu | None:
    """A previous run's MFU (ours) for `stage`: a LlavaRun (YAML/JSON) or its status, whose
    results.<stage>.mfu (the whole stage) or progress.mfu (while it runs); or a
    bench/gpu_step.py report (its first result for the stage)."""
    for document in yamlio.load_documents(path):
        if not isinstance(document, dict):
            continue
        status = document.get("status", document)
        result = ((status.get("results") or {}).get(stage.value) or {}).get("mfu")
        if result:
            return Mfu(float(result), f"measured: {path} results.{stage.value}.mfu")
        progress = status.get("progress") or {}
        if progress.get("stage") == stage.value and progress.get("mfu"):
            return Mfu(float(progress["mfu"]), f"measured: {path} progress.mfu (running)")
        for row in document.get("results") if isinstance(document.get("results"), list) else []:
            if row.get("stage") == stage.value and row.get("mfu"):
                return Mfu(float(row["mfu"]), f"measured: {path} gpu_step {row.get('model')} {stage.value}")
    return None


def mfu_for(stage: Stage, given: float | None, from_file: str | None) -> Mfu:
    if given is not None:
        return Mfu(given, "--mfu")
    if from_file:
        found = measured_mfu(from_file, stage)
        if found is not None:
            return found
    return Mfu(DEFAULT_MFU, "default" + (f"; {from_file} has none for {stage.value}" if from_file else ""))


def plan_for_run(
    run: LlavaRun,
    *,
    data_dir: Path | None = None,
    device: str | None = None,
    mfu: float | None = None,
    from_file: str | None = None,
) -> dict:
    """`llavarun plan`'s dict for one run, its inputs gathered here: what `llavarun local` or the
    operator call to show or record the same numbers (`planner.capacity_plan` is the pure core)."""
    geometry = geometry_for(run, data_dir)
    chosen, source = choose_device(run, device)
    training = [s for s in run.spec.stages if s in (Stage.PRETRAIN, Stage.FINETUNE)]
    return capacity_plan(
        run.name,
        run.spec,
        geometry,
        {s: lengths_for(run, s, geometry, data_dir) for s in training},
        chosen,
        {s: mfu_for(s, mfu, from_file) for s in training},
        device_source=source,
    )
