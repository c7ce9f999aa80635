"""Local process groups: the children of `llavarun local`, one per stage attempt.

A LocalJob is a small document in the Kubernetes shape (metadata with the plan's labels and
annotations, a spec, a status) describing one attempt: the same `llava-trainer` command its
PyTorchJob would run, under `torchrun --standalone` with all the stage's processes on this host,
and the environment its pods would get. `local/jobs.py` keeps these documents on disk and runs
them (it plays the apiserver and the training-operator); this module is the pure part the plan
uses: render an attempt, read its state, (un)suspend it.

Its status, written by the supervisor: `phase` (Running, Succeeded, Failed, or Stopped after it
was suspended), `startTime`, `completionTime`, `exitCode`, `message`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api import API_VERSION, LlavaRun, Stage
from ..api.spec import PrepareResources
from ..backend import RunObjects, stamp, suspend_patch_at
from ..jobstate import JobPhase, JobState
from ..naming import job_name, stage_labels
from ..trainer_command import stage_env, trainer_args

KIND = "LocalJob"
STATUS_FILE = "llavarun-status.json"
RUNNING, SUCCEEDED, FAILED, STOPPED = "Running", "Succeeded", "Failed", "Stopped"


def processes(run: LlavaRun, stage: Stage) -> int:
    """Processes a stage starts: nodes x gpusPerNode (all on this host); prepare is one."""
    res = run.spec.stage_config(stage).resources
    return 1 if isinstance(res, PrepareResources) else res.processes


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class LocalPaths:
    """Where a local run keeps its state, under its output directory (data_dir/spec.paths.output)."""

    output: Path

    @property
    def status_file(self) -> Path:
        """The run's status document (what `kubectl get llavarun -o yaml` shows under status)."""
        return self.output / STATUS_FILE

    @property
    def logs(self) -> Path:
        return self.output / "logs"

    @property
    def store(self) -> Path:
        """The local "apiserver": the run object and one document per child."""
        return self.output / "local"

    @property
    def run_file(self) -> Path:
        return self.store / "llavarun.json"

    @property
    def jobs(self) -> Path:
        return self.store / "jobs"

    def log(self, job: str) -> Path:
        return self.logs / f"{job}.log"

    def trainer_status(self, job: str) -> Path:
        """What the trainer of one attempt reports (progress, results); folded into status_file."""
        return self.jobs / f"{job}.status.json"


def stage_command(run: LlavaRun, stage: Stage, data_dir: Path) -> list[str]:
    """The stage's trainer command for this host: torchrun --standalone with all its processes."""
    args = trainer_args(run.spec, stage, data_dir_override=str(data_dir))
    if stage is Stage.PREPARE:
        return [sys.executable, "-m", "llava_trainer", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes(run, stage)}",
        "-m",
        "llava_trainer",
        *args,
    ]


def stage_environment(run: LlavaRun, stage: Stage, attempt: int, trainer_status: Path) -> dict[str, str]:
    """What the attempt's processes get on top of this shell's environment: the stage env its pods
    would have, the user's placement env, and a status file instead of the apiserver."""
    return {
        **stage_env(run.spec, run.name, stage, attempt),
        **{e.name: e.value for e in run.spec.placement.env},
        "LLAVARUN_STATUS_FILE": str(trainer_status),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(max(1, cpu_cores() // processes(run, stage))),
    }


class LocalJobBackend:
    """Stage attempts as process groups on this machine, with data under `data_dir`."""

    kind = KIND

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def refusals(self, run: LlavaRun) -> list[str]:
        """None: what a cluster backend refuses (placement, pull policy) means nothing here."""
        return []

    def paths(self, run: LlavaRun) -> LocalPaths:
        return LocalPaths(self.data_dir / run.spec.paths.output)

    def render(self, run: LlavaRun, stage: Stage, attempt: int) -> dict[str, Any]:
        name = job_name(run.name, stage, attempt)
        paths = self.paths(run)
        runs = {
            "command": stage_command(run, stage, self.data_dir),
            "env": stage_environment(run, stage, attempt, paths.trainer_status(name)),
            "processes": processes(run, stage),
            "log": str(paths.log(name)),
        }
        child = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": name,
                "labels": stage_labels(run.name, stage, attempt),
                "annotations": {"llavarun.io/generation": str(run.metadata.generation or 0)},
            },
            "spec": {**runs, "suspend": run.spec.suspend},
        }
        return stamp(child, suspend=run.spec.suspend, runs=runs)

    def run_objects(self, run: LlavaRun) -> RunObjects:
        """Nothing: the trainer reports into a file, no identity to create."""
        return RunObjects()

    def state(self, child: Mapping[str, Any]) -> JobState:
        status = child.get("status") or {}
        suspended = bool((child.get("spec") or {}).get("suspend"))
        reported = status.get("phase")
        if reported in (SUCCEEDED, FAILED):
            phase = JobPhase(reported)
        elif suspended:
            phase = JobPhase.SUSPENDED
        elif reported == RUNNING:
            phase = JobPhase.RUNNING
        else:
            phase = JobPhase.CREATED
        return JobState(
            phase=phase,
            message=str(status.get("message") or "") if phase is JobPhase.FAILED else "",
            start_time=status.get("startTime"),
            completion_time=status.get("completionTime"),
            suspended=suspended,
            started=bool(status.get("startTime")),
        )

    def suspend_patch(self, suspend: bool) -> dict[str, Any]:
        return suspend_patch_at({"suspend": suspend}, suspend)

    def where_to_look(
        self, child_name: str, state: JobState, namespace: str, pods: list[Mapping[str, Any]]
    ) -> str:
        """Nothing more: a failed attempt's message already quotes its error and names its log."""
        return ""
