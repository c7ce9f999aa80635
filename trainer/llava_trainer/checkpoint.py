"""Atomic, resumable training checkpoints under `<stage output>/checkpoints/checkpoint-<step>`.

A checkpoint is written into `.tmp-checkpoint-<step>`, completed with a `COMPLETE` marker, then
renamed; a directory named `checkpoint-<step>` with the marker is therefore always whole, and a
kill at any moment leaves at worst a temporary directory that the next start removes.

Contents: DeepSpeed's engine checkpoint (trainable weights only, optimizer and scheduler state,
every rank's ZeRO partitions) in `ds/`, and per rank `trainer_state_rank<r>.pt` (data loader
position, RNG states). `trainer_state.json` records step, epoch and world size for humans and for
the resume check. The output directory must be shared by all ranks (one PVC), as DeepSpeed's
own checkpoints assume. `Checkpointer` decides when the loop saves (every `--save-steps`, at the
end, after SIGTERM); `GracefulStop` and `checkpoint_fits` are the SIGTERM policy: save once more
if it fits in the grace period.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .distributed import World, all_reduce_floats, barrier

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
COMPLETE = "COMPLETE"
DS_TAG = "ds"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
DEFAULT_GRACE_SECONDS = 25.0
"""Kubernetes' default terminationGracePeriodSeconds is 30; leave a margin for the exit."""


@dataclass
class TrainState:
    """Where the loop is: optimizer steps done, the epoch they are in, and the running totals."""

    step: int = 0
    epoch: int = 0
    samples: int = 0
    train_seconds: float = 0.0


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def save_checkpoint(
    engine: Any, root: Path, state: TrainState, loader_state: dict[str, Any], world: World, keep: int
) -> tuple[Path, float]:
    """Write checkpoint-<step> on every rank (collective); returns its path and the seconds it took
    (the longest rank's), which the SIGTERM handler uses to decide whether another one fits."""
    started = time.monotonic()
    final = root / f"{PREFIX}{state.step}"
    tmp = root / f"{TMP_PREFIX}{state.step}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(world)

    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
    per_rank = {"loader": loader_state, "rng": rng_state(), "train_state": asdict(state)}
    torch.save(per_rank, tmp / f"trainer_state_rank{world.rank}.pt")
    barrier(world)

    if world.is_main:
        summary = {**asdict(state), "world_size": world.world_size, "saved_at": time.time()}
        (tmp / "trainer_state.json").write_text(json.dumps(summary, indent=2))
        (tmp / COMPLETE).write_text(json.dumps({"step": state.step}))
        if final.exists():  # the same step saved again (e.g. SIGTERM right after a resume)
            _remove(final)
        tmp.rename(final)
        _rotate(root, keep)
    barrier(world)
    seconds = all_reduce_floats([time.monotonic() - started], world, op="max")[0]
    log.info("checkpoint %s written in %.1fs", final, seconds)
    return final, seconds


def load_checkpoint(engine: Any, path: Path, world: World) -> tuple[TrainState, dict[str, Any]]:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the train state and
    this rank's data loader state."""
    summary = json.loads((path / "trainer_state.json").read_text())
    if summary["world_size"] != world.world_size:
        raise SystemExit(
            f"llava-trainer: checkpoint {path} was written by {summary['world_size']} processes but "
            f"this run has {world.world_size}; ZeRO partitions and data positions are per process. "
            "Resume with the same number of nodes x processes per node, or move the checkpoint away."
        )
    load_path, _ = engine.load_checkpoint(
        str(path),
        tag=DS_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    per_rank = torch.load(path / f"trainer_state_rank{world.rank}.pt", map_location="cpu", weights_only=False)
    set_rng_state(per_rank["rng"])
    return TrainState(**per_rank["train_state"]), per_rank["loader"]


def resume(engine: Any, root: Path, world: World) -> tuple[TrainState, dict[str, Any] | None, Path | None]:
    """The newest complete checkpoint's train state, this rank's loader position and its path; a
    fresh start when there is none. Leftovers of a killed save are removed first."""
    if world.is_main:
        remove_incomplete(root)
    barrier(world)
    latest = latest_checkpoint(root)
    if latest is None:
        return TrainState(), None, None
    state, loader_state = load_checkpoint(engine, latest, world)
    return state, loader_state, latest


def remove_incomplete(root: Path) -> None:
    """Delete temporary and unmarked checkpoint directories left by a killed run (rank 0)."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX) or (_NAME.match(path.name) and not (path / COMPLETE).exists()):
            log.info("removing incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _rotate(root: Path, keep: int) -> None:
    for _, path in complete_checkpoints(root)[:-keep]:
        log.info("removing old checkpoint %s (--save-total-limit %d)", path, keep)
        _remove(path)


def _remove(path: Path) -> None:
    # Drop the marker first: a half-deleted directory must never look complete.
    (path / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
    """When and where a stage saves: every `save_steps` steps before the last, once at the end
    unless that step is saved already, and after SIGTERM if the last save's duration says another
    fits in the grace period. Saves are collectives: every rank calls the same methods."""

    def __init__(
        self,
        engine: Any,
        loader: Any,
        root: Path,
        world: World,
        *,
        save_steps: int,
        keep: int,
        total_steps: int,
    ) -> None:
        self.engine, self.loader, self.root, self.world = engine, loader, root, world
        self.save_steps, self.keep, self.total_steps = save_steps, keep, total_steps
        self.last_save_seconds: float | None = None

    def resume(self) -> tuple[TrainState, dict[str, Any] | None, Path | None]:
        """See `resume`: the newest complete checkpoint's state, loader position and path."""
        return resume(self.engine, self.root, self.world)

    def is_saved(self, step: int) -> bool:
        return latest_checkpoint(self.root) == self.root / f"{PREFIX}{step}"

    def save(self, state: TrainState) -> None:
        _, self.last_save_seconds = save_checkpoint(
            self.engine, self.root, state, self.loader.state_dict(), self.world, self.keep
        )

    def save_if_due(self, state: TrainState) -> None:
        """After an optimizer step: the periodic save (the last step is left to `save_final`)."""
        if state.step % self.save_steps == 0 and state.step < self.total_steps:
            self.save(state)

    def save_final(self, state: TrainState) -> None:
        if not self.is_saved(state.step):
            self.save(state)

    def save_before_exit(self, state: TrainState, seconds_left: float) -> bool:
        """After SIGTERM: whether this step is saved on exit (saving now if it fits in time)."""
        if self.is_saved(state.step):
            return True
        if not checkpoint_fits(self.last_save_seconds, seconds_left):
            return False
        self.save(state)
        return True


class GracefulStop:
    """SIGTERM (pod deletion, preemption) sets a flag; the loop finishes its step, saves a checkpoint
    if one fits in the grace period, and exits 143 so the stage is retried and resumes."""

    def __init__(self) -> None:
        self.signalled_at: float | None = None
        self._previous: Any = None

    def __enter__(self) -> GracefulStop:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
            print("llava-trainer: SIGTERM received; stopping after this step", file=sys.stderr, flush=True)

    def requested_anywhere(self, world: World) -> bool:
        """Whether any rank got the signal (all ranks must stop at the same step)."""
        local = 1.0 if self.signalled_at is not None else 0.0
        return all_reduce_floats([local], world, op="max")[0] > 0

    def seconds_left(self, world: World) -> float:
        try:
            grace = float(os.environ.get("LLAVARUN_GRACE_SECONDS", DEFAULT_GRACE_SECONDS))
        except ValueError:
            grace = DEFAULT_GRACE_SECONDS
        elapsed = time.monotonic() - self.signalled_at if self.signalled_at is not None else 0.0
        return grace - all_reduce_floats([elapsed], world, op="max")[0]


def checkpoint_fits(last_checkpoint_seconds: float | None, seconds_left: float) -> bool:
    """Whether a checkpoint should still finish before the kill: the last one's duration with a
    25% + 1 s margin; with no measurement yet, try (a cut-short save is never taken as complete)."""
    if last_checkpoint_seconds is None:
        return seconds_left > 0
    return last_checkpoint_seconds * 1.25 + 1.0 < seconds_left
