"""Run a LlavaRun's stages on this machine, as the operator would on a cluster.

Each stage runs the same `llava-trainer` command its PyTorchJob would run, under torchrun with
the stage's processes on this host. The status document the cluster would hold is kept in a
JSON file: this runner writes the operator's part (phase, stage, stages, conditions) between
stage processes, the trainer writes progress and results while it runs, so the two never write
at the same time. A rerun skips finished stages and the trainer resumes the running one from
its newest checkpoint, as a retried PyTorchJob does.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from ..api import LlavaRun, Stage
from ..naming import job_name
from ..trainer_command import stage_env, trainer_args
from .logs import describe_exit
from .preflight import cpu_cores, processes
from .processes import ProcessTree

STATUS_FILE = "llavarun-status.json"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, `kill`, a closed terminal: each stops the running stage cleanly (checkpoint, status)."""
TICK_SECONDS = 0.5
"""How often the progress display is refreshed while a stage is quiet."""


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def local_env(run: LlavaRun, stage: Stage, attempt: int, status_file: Path) -> dict[str, str]:
    """The stage's environment as its pods would have it, reporting into the status file."""
    env = dict(os.environ)
    # Locally the status goes to the file only, never to a cluster the shell happens to point at.
    for key in ("LLAVARUN_NAME", "LLAVARUN_NAMESPACE", "LLAVARUN_KUBECONFIG"):
        env.pop(key, None)
    env.update(stage_env(run.spec, run.name, stage, attempt))
    env.update({e.name: e.value for e in run.spec.placement.env})
    env.update(
        {
            "LLAVARUN_STATUS_FILE": str(status_file),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(max(1, cpu_cores() // processes(run, stage))),
        }
    )
    return env


@dataclass
class StatusFile:
    """The run's status document; the runner's writes are whole-file atomic replaces."""

    path: Path

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def update(self, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        status = self.read()
        mutate(status)
        tmp = self.path.with_name(f".{self.path.name}.runner")
        tmp.write_text(json.dumps(status, indent=2, sort_keys=True))
        os.replace(tmp, self.path)
        return status


def set_condition(status: dict[str, Any], type_: str, value: str, reason: str, message: str = "") -> None:
    conditions = status.setdefault("conditions", [])
    existing = next((c for c in conditions if c["type"] == type_), None)
    if existing and existing["status"] == value and existing["reason"] == reason:
        existing["message"] = message
        return
    entry = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now(),
    }
    if existing:
        conditions[conditions.index(existing)] = entry
    else:
        conditions.append(entry)


@dataclass
class StageOutcome:
    stage: Stage
    succeeded: bool
    attempts: int
    seconds: float
    log: Path


@dataclass
class LocalRun:
    """One `llavarun local` invocation."""

    run: LlavaRun
    data_dir: Path
    on_line: Callable[[Stage, str], None] = lambda stage, line: None
    on_tick: Callable[[Stage], None] = lambda stage: None
    on_event: Callable[[str, str], None] = lambda reason, message: None
    outcomes: list[StageOutcome] = field(default_factory=list)
    _signal: int | None = None
    _tree: ProcessTree | None = None

    @property
    def output_root(self) -> Path:
        return self.data_dir / self.run.spec.paths.output

    @property
    def status(self) -> StatusFile:
        return StatusFile(self.output_root / STATUS_FILE)

    def logs_dir(self) -> Path:
        return self.output_root / "logs"

    def execute(self) -> int:
        """Run every stage not yet finished; 0 on success, 1 on failure, 128 + the signal's number
        when stopped by SIGINT (Ctrl-C), SIGTERM or SIGHUP."""
        self.logs_dir().mkdir(parents=True, exist_ok=True)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            self.status.update(self._start)
            for stage in self.run.spec.stages:
                done = (self.status.read().get("stages") or {}).get(stage.value, {})
                if done.get("phase") == "Succeeded":
                    continue
                if self._signal is not None:
                    break
                outcome = self._run_stage(stage, first_attempt=int(done.get("attempts", 0)))
                self.outcomes.append(outcome)
                if self._signal is None and not outcome.succeeded:
                    return 1
            if self._signal is not None:
                return 128 + self._signal
            self.status.update(self._finish)
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start(self, status: dict[str, Any]) -> None:
        status["observedGeneration"] = self.run.metadata.generation or 1
        if status.get("phase") != "Succeeded":
            status["phase"] = "Running"
        status.pop("currentJob", None)
        set_condition(status, "Failed", "False", "Running")
        set_condition(status, "Succeeded", "Unknown", "Running")

    def _finish(self, status: dict[str, Any]) -> None:
        status["phase"] = "Succeeded"
        set_condition(status, "Succeeded", "True", "AllStagesSucceeded", "every stage finished")

    def _run_stage(self, stage: Stage, first_attempt: int) -> StageOutcome:
        retries = self.run.spec.retries
        started = time.monotonic()
        attempt = max(0, first_attempt - 1) if first_attempt else 0
        while True:
            name = job_name(self.run.name, stage, attempt)
            log = self.logs_dir() / f"{name}.log"

            def begin(status: dict[str, Any], attempt: int = attempt, name: str = name) -> None:
                status["stage"] = stage.value
                status["currentJob"] = name
                entry = status.setdefault("stages", {}).setdefault(stage.value, {})
                entry.update(phase="Running", job=status["currentJob"], attempts=attempt + 1)
                entry.setdefault("startTime", now())
                status.pop("progress", None)

            self.status.update(begin)
            self.on_event(
                "StageStarted",
                f"stage {stage.value} started as job {name} ({processes(self.run, stage)} "
                f"process(es), log {log})",
            )
            code = self._spawn(stage, attempt, log)
            took = time.monotonic() - started
            if code == 0:
                self.status.update(partial(_end_stage, stage=stage, phase="Succeeded", message=None))
                self.on_event("StageSucceeded", f"stage {stage.value} succeeded (job {name}, {took:.0f}s)")
                return StageOutcome(stage, True, attempt + 1, took, log)
            message = f"local job {name} {describe_exit(code, log)}"
            stopped = self._signal is not None
            final = stopped or attempt >= retries
            mark = _interrupted if stopped else _failed if final else _retrying
            self.status.update(partial(mark, stage=stage, message=message))
            if stopped:
                self.on_event(
                    "Suspended", f"stopped at stage {stage.value}; rerun the same command to resume"
                )
            elif final:
                self.on_event(
                    "StageFailed", f"stage {stage.value} failed after {attempt + 1} attempt(s): {message}"
                )
            else:
                self.on_event("StageRetrying", f"stage {stage.value} attempt {attempt + 1} failed: {message}")
            if final:
                return StageOutcome(stage, False, attempt + 1, took, log)
            attempt += 1

    def _spawn(self, stage: Stage, attempt: int, log: Path) -> int:
        command = stage_command(self.run, stage, self.data_dir)
        env = local_env(self.run, stage, attempt, self.status.path)
        with log.open("a") as sink:
            sink.write(f"$ {' '.join(command)}\n")
            sink.flush()
            if self._signal is not None:
                return 128 + self._signal
            self._tree = tree = ProcessTree.start(
                command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            proc = tree.proc
            lines: queue.Queue[str | None] = queue.Queue()
            reader = threading.Thread(target=_pump, args=(proc, lines), daemon=True)
            reader.start()

            def take(line: str) -> None:
                sink.write(line)
                self.on_line(stage, line.rstrip("\n"))

            try:
                # Until the output ends, or the launcher has exited and a tick passed in silence
                # (a straggler may still hold the pipe open).
                while (line := _next_line(lines, TICK_SECONDS)) is not None:
                    if line:
                        take(line)
                    elif proc.poll() is not None:
                        break
                    tree.record()
                    self.on_tick(stage)
                return proc.wait()
            finally:
                tree.reap()  # whatever outlived the launcher goes too
                reader.join(timeout=5)
                while line := _next_line(lines, 0):
                    take(line)
                self._tree = None

    def _on_signal(self, signum: int, frame: object) -> None:
        """First stop signal: SIGTERM the stage's process group (the trainer checkpoints and
        exits); a second one: SIGKILL it."""
        again = self._signal is not None
        self._signal = self._signal or signum
        if self._tree is not None:
            self._tree.signal(signal.SIGKILL if again else signal.SIGTERM)


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    """Forward a process's output line by line; None once it closed its output."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)


def _next_line(lines: queue.Queue[str | None], timeout: float) -> str | None:
    """The next output line, "" when none came within `timeout` (a tick), None at the end."""
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return ""


def _end_stage(status: dict[str, Any], stage: Stage, phase: str, message: str | None) -> None:
    entry = status.setdefault("stages", {}).setdefault(stage.value, {})
    entry.update(phase=phase, completionTime=now())
    if message:
        entry["message"] = message
    else:
        entry.pop("message", None)


def _failed(status: dict[str, Any], stage: Stage, message: str) -> None:
    _end_stage(status, stage, "Failed", message)
    status["phase"] = "Failed"
    set_condition(status, "Failed", "True", "RetriesExhausted", f"stage {stage.value}: {message}")
    set_condition(status, "Succeeded", "False", "StageFailed", f"stage {stage.value} failed")


def _retrying(status: dict[str, Any], stage: Stage, message: str) -> None:
    entry = status.setdefault("stages", {}).setdefault(stage.value, {})
    entry.update(phase="Retrying", message=message)


def _interrupted(status: dict[str, Any], stage: Stage, message: str) -> None:
    entry = status.setdefault("stages", {}).setdefault(stage.value, {})
    entry.update(phase="Suspended", message=f"interrupted; rerun to resume ({message})")
    status["phase"] = "Suspended"
    set_condition(status, "Suspended", "True", "Interrupted", "stopped by a signal; rerun to resume")
