"""Run a LlavaRun on this machine through the same `plan()` the operator uses on a cluster.

The local edge of the plan: the run object (the YAML's spec, with a generation that moves when
the spec changes, as the apiserver's does) and its status document live under the run's output
directory; its children are LocalJobs (backends/local.py), run by `LocalJobs` as process groups.
Each round reads the run, plans, applies the plan (children, then status, then events) and waits
for a process to end or a tick to pass; so a local run goes through the very states, conditions,
reasons and events a cluster run goes through, and a rerun resumes where the last one stopped.

Stopping (Ctrl-C, SIGTERM, SIGHUP) is suspension: the run's spec gets `suspend: true`, the plan
suspends the running attempt (its processes get SIGTERM, the trainer saves a checkpoint), and the
command exits once they are gone. The next `llavarun local` applies the file's spec again
(`suspend: false`), which resumes the attempt. A second signal kills the processes at once.

The status document has one writer, this module: the trainer of each attempt reports into a file
of its own (LLAVARUN_STATUS_FILE), whose `progress` and `results` are folded in here.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from ..api import API_VERSION, KIND, LlavaRun, Phase, Stage
from ..api.status import merge_patch
from ..backends.local import LocalJobBackend, LocalPaths
from ..plan import Plan, plan
from .jobs import LocalJobs, write_json
from .preflight import Refused

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, `kill`, a closed terminal: each suspends the run cleanly (checkpoint, status)."""
TICK_SECONDS = 0.5
"""How often the progress display is refreshed and the trainer's reports folded in."""
FINISHED = {Phase.SUCCEEDED.value: 0, Phase.FAILED.value: 1}
"""Exit status of a finished run."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def fold(status: dict[str, Any], reported: dict[str, Any]) -> dict[str, Any]:
    """The trainer's part of one attempt's report into the run's status: `progress` is the running
    attempt's, `results` accumulate per stage."""
    out = dict(status)
    if "progress" in reported:
        out["progress"] = reported["progress"]
    if reported.get("results"):
        out["results"] = {**(status.get("results") or {}), **reported["results"]}
    return out


@dataclass
class LocalRun:
    """One `llavarun local` invocation."""

    run: LlavaRun
    data_dir: Path
    on_line: Callable[[Stage, str], None] = lambda stage, line: None
    on_tick: Callable[[Stage], None] = lambda stage: None
    on_event: Callable[[str, str], None] = lambda reason, message: None
    signalled: int | None = None
    """The stop signal received, if any."""
    _folded: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.backend = LocalJobBackend(self.data_dir)
        self.paths: LocalPaths = self.backend.paths(self.run)
        self.jobs = LocalJobs(self.paths.jobs, self.run.name, lambda stage, line: self.on_line(stage, line))

    @property
    def output_root(self) -> Path:
        return self.paths.output

    def status(self) -> dict[str, Any]:
        return read_json(self.paths.status_file)

    # --- the run object --------------------------------------------------------------------------

    def apply_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Store the run's spec; its generation moves when the spec differs from the stored one."""
        stored = read_json(self.paths.run_file)
        generation = int((stored.get("metadata") or {}).get("generation") or 0)
        if stored.get("spec") != spec or not generation:
            generation += 1
        obj = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": self.run.name, "generation": generation},
            "spec": spec,
        }
        if obj != stored:
            write_json(self.paths.run_file, obj)
        return obj

    def body(self) -> dict[str, Any]:
        """The run as the plan reads it: the stored object and the status document."""
        return {**read_json(self.paths.run_file), "status": self.status()}

    # --- one round -------------------------------------------------------------------------------

    def reconcile(self) -> Plan:
        """Plan and apply once: children first, then status, then events (as the operator does)."""
        now = datetime.now(UTC)
        result = plan(self.body(), self.jobs.list(), now, backend=self.backend, pods={})
        for obj in result.create:
            self.jobs.create(obj)
        for name, patch in result.patch:
            self.jobs.patch(name, patch)
        for name in result.delete:
            self.jobs.delete(name)
        if result.status:
            write_json(self.paths.status_file, merge_patch(self.status(), result.status))
        for event in result.events:
            self.on_event(event.reason, event.message)
        return result

    def fold_reports(self) -> None:
        """Fold the trainers' new reports into the status document, oldest first."""
        fresh = []
        for doc in self.jobs.list():
            report = self.paths.trainer_status(doc["metadata"]["name"])
            try:
                mtime = report.stat().st_mtime
            except FileNotFoundError:
                continue
            if self._folded.get(str(report)) != mtime:
                self._folded[str(report)] = mtime
                fresh.append((mtime, report))
        if fresh:
            status = self.status()
            for _, report in sorted(fresh):
                status = fold(status, read_json(report))
            write_json(self.paths.status_file, status)

    def stop(self) -> None:
        """Suspend the run (the first stop signal's effect, applied by the next round)."""
        self.apply_spec({**read_json(self.paths.run_file)["spec"], "suspend": True})

    # --- the loop --------------------------------------------------------------------------------

    def forget(self) -> None:
        """Start over as a new run: the run object, its children's records and the status go;
        logs, checkpoints and stage outputs stay (training resumes from the checkpoints)."""
        shutil.rmtree(self.paths.jobs, ignore_errors=True)
        self.paths.run_file.unlink(missing_ok=True)
        self.paths.status_file.unlink(missing_ok=True)

    def execute(self, *, fresh: bool = False) -> int:
        """Run until the run succeeds (0), fails (1) or is stopped by signal N (128 + N); `fresh`:
        forget the previous state first (a failed run is final otherwise, as on a cluster)."""
        with self._exclusive():
            if fresh:
                self.forget()
            previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
            try:
                return self._loop()
            finally:
                self.jobs.signal_all(signal.SIGKILL)
                while self.jobs.running:
                    self.jobs.poll(TICK_SECONDS)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _loop(self) -> int:
        self.apply_spec(self.run.spec.to_k8s())
        self.jobs.adopt()
        stopping = False
        while True:
            if self.signalled is not None and not stopping:
                self.stop()
                stopping = True
            result = self.reconcile()
            if result.phase in FINISHED and not self.jobs.running:
                self.fold_reports()
                return FINISHED[result.phase]
            if stopping and not self.jobs.running:
                self.fold_reports()
                return 128 + (self.signalled or 0)
            if not self.jobs.running and not (
                result.create or result.patch or result.delete or result.status
            ):
                raise RuntimeError(
                    f"LlavaRun {self.run.name}: nothing runs and nothing changes ({result.phase})"
                )
            self.jobs.poll(TICK_SECONDS)
            self.fold_reports()
            for running in list(self.jobs.running.values()):
                self.on_tick(running.stage)

    def _on_signal(self, signum: int, frame: object) -> None:
        """First stop signal: suspend (in the next round); a second one: kill the processes now."""
        if self.signalled is not None:
            self.jobs.signal_all(signal.SIGKILL)
        self.signalled = self.signalled or signum

    def _exclusive(self) -> _Lock:
        return _Lock(self.paths.store / "lock", self.run.name)


@dataclass
class _Lock:
    """One `llavarun local` per output directory at a time (two would run the same attempt twice)."""

    path: Path
    run: str
    _file: IO[str] | None = None

    def __enter__(self) -> _Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise Refused(
                [f"another llavarun local is running LlavaRun {self.run} on {self.path.parent.parent}"]
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._file is not None
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
