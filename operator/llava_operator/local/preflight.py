"""What `llavarun local` checks before the first stage starts, so a run that cannot work on this
machine is refused in a second with every reason, instead of failing minutes later per attempt.

The data_dir layout (inputs, checkpoints, tokenizer) is the prepare stage's own check
(`llava_trainer.prepare.check_layout`), run here on the same typed config the stage would get;
this module adds what only matters locally: the processes a stage starts against the cores and
devices of this host, inputs a stage needs that an earlier stage of this run does not produce,
and a writable output directory. Nothing is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from llava_trainer.config import EvaluateConfig, FinetuneConfig
from llava_trainer.prepare import LayoutError, check_layout

from ..api import LlavaRun, Stage
from ..api.profiles import AcceleratorProfileName
from ..api.spec import PrepareResources
from ..backends.local import LocalPaths, cpu_cores
from ..trainer_command import stage_config

WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
"""A Hugging Face checkpoint directory holds its weights in one of these."""


class Refused(Exception):
    """The run cannot start here; `problems` lists every reason (a reason may span lines)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _nvidia_devices() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    present = Path("/proc/driver/nvidia/gpus")
    count = len(list(present.iterdir())) if present.is_dir() else 0
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


DEVICE_COUNTERS: dict[AcceleratorProfileName, Callable[[], int]] = {
    AcceleratorProfileName.NVIDIA: _nvidia_devices,
}
"""How to count a profile's devices on this host without importing torch; profiles missing here
are not counted (torchrun reports a missing device itself)."""


def check_processes(run: LlavaRun, *, oversubscribe: bool) -> list[str]:
    """Each stage's processes against this machine's cores (unless oversubscribing) and devices."""
    problems = []
    cores = cpu_cores()
    profile = run.spec.accelerator.profile
    count_devices = DEVICE_COUNTERS.get(profile)
    devices = count_devices() if count_devices and run.spec.accelerator.resolved().resource_name else None
    for stage in run.spec.stages:
        res = run.spec.stage_config(stage).resources
        if isinstance(res, PrepareResources):
            continue
        wanted = f"nodes {res.nodes} x gpusPerNode {res.gpus_per_node} = {res.processes} processes"
        field = f"spec.{stage.value}.resources"
        if devices is not None and res.processes > devices:
            have = f"only {devices}" if devices else "none"
            problems.append(
                f"{field}: {wanted}, one {profile.value} device each, and this machine has {have} "
                "(lower nodes/gpusPerNode, use spec.accelerator.profile cpu, or run it on a cluster)"
            )
        elif res.processes > cores and not oversubscribe:
            problems.append(
                f"{field}: {wanted}, and this machine has {cores} CPU cores (lower nodes/gpusPerNode "
                "to fit, or pass --oversubscribe to start them anyway)"
            )
    return problems


def _checkpoint(path: Path, what: str) -> list[str]:
    if not path.is_dir():
        return [f"missing {path}: expected {what}"]
    if not any(any(path.glob(pattern)) for pattern in WEIGHTS):
        return [f"{path} has no weights ({' or '.join(WEIGHTS)}): expected {what}"]
    return []


def check_inputs(run: LlavaRun, data_dir: Path) -> list[str]:
    """The data_dir layout for the run's stages, plus checkpoints that no stage of this run makes."""
    spec = run.spec
    problems = []
    layout = stage_config(spec, Stage.PREPARE, data_dir_override=str(data_dir))
    try:
        check_layout(layout)
    except LayoutError as err:
        problems.append(str(err))
    for name in (layout.language_model, layout.vision_tower):
        model = layout.resolve(name)
        if (model / "config.json").is_file():  # a missing directory is reported by the layout check
            problems += _checkpoint(model, "a Hugging Face checkpoint (spec.paths)")
    problems += _tokenizer(layout.tokenizer_dir)  # a task finetune's is its LLaVA model's
    if (
        Stage.FINETUNE in spec.stages
        and spec.finetune.model_path is None  # a task finetune's model has its projector
        and not (Stage.PRETRAIN in spec.stages and spec.finetune.pretrained_projector is None)
    ):
        finetune = stage_config(spec, Stage.FINETUNE, data_dir_override=str(data_dir))
        assert isinstance(finetune, FinetuneConfig)
        if not finetune.projector_path.is_file():
            problems.append(
                f"missing {finetune.projector_path}: spec.finetune.pretrainedProjector (default: the "
                "pretrain stage's output) must exist when pretrain is not part of this run"
            )
    if Stage.EVALUATE in spec.stages and not (
        Stage.FINETUNE in spec.stages and spec.evaluate.model_path is None
    ):
        evaluate = stage_config(spec, Stage.EVALUATE, data_dir_override=str(data_dir))
        assert isinstance(evaluate, EvaluateConfig)
        problems += _checkpoint(
            evaluate.model_dir,
            "the model to evaluate (spec.evaluate.modelPath; default: the finetune stage's output, "
            "which this run does not make)",
        )
    return problems


def _tokenizer(model: Path) -> list[str]:
    """The tokenizer file must parse: a truncated one otherwise fails every training process."""
    spm, fast = model / "tokenizer.model", model / "tokenizer.json"
    try:
        if spm.is_file():
            import sentencepiece

            sentencepiece.SentencePieceProcessor(model_file=str(spm))
        elif fast.is_file():
            import tokenizers

            tokenizers.Tokenizer.from_file(str(fast))
    except Exception as err:  # the libraries raise RuntimeError/OSError/ValueError variously
        path = spm if spm.is_file() else fast
        return [f"{path} is not a readable tokenizer: {str(err).strip().splitlines()[-1][:200]}"]
    return []


def check_output(run: LlavaRun, data_dir: Path) -> list[str]:
    """The output directory (or the directory it will be created in) must be writable."""
    out = data_dir / run.spec.paths.output
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return [f"{existing} is not a writable directory: the run writes its outputs under {out}"]
    return []


def check_state(run: LlavaRun, data_dir: Path) -> list[str]:
    """The run can start: not suspended in its spec, and its output directory is its own."""
    problems = []
    if run.spec.suspend:
        problems.append(
            "spec.suspend: true would start nothing; remove it (a stopped run resumes by rerunning)"
        )
    stored = LocalPaths(data_dir / run.spec.paths.output).run_file
    if stored.is_file():
        try:
            other = json.loads(stored.read_text())["metadata"]["name"]
        except (ValueError, KeyError, TypeError):
            other = None
        if other is not None and other != run.name:
            problems.append(
                f"{stored.parent.parent} holds the state of LlavaRun {other}: use another "
                "spec.paths.output for this run (or remove that directory)"
            )
    return problems


def preflight(run: LlavaRun, data_dir: Path, *, oversubscribe: bool = False) -> None:
    """Raise Refused listing every reason this run cannot start here; return when it can."""
    problems = check_processes(run, oversubscribe=oversubscribe)
    if not data_dir.is_dir():
        problems.append(f"--data-dir {data_dir}: not a directory (a tiny one: llava-trainer synth --out DIR)")
    else:
        problems += [*check_inputs(run, data_dir), *check_output(run, data_dir), *check_state(run, data_dir)]
    if problems:
        raise Refused(problems)
