"""The local apiserver and training-operator for LocalJobs (backends/local.py).

LocalJob documents live in one directory; creating one starts its processes (unless it is
suspended), suspending one SIGTERMs them (the trainer saves a checkpoint and exits), resuming
starts them again, deleting one kills them. Each running job's output goes to its log and to a
callback, line by line. A job whose supervisor died (a `llavarun local` killed with SIGKILL) is
found running on the next start: whatever is left of its processes is killed and the attempt is
started again, as the training-operator restarts a job's pods.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..api import Stage
from ..api.status import merge_patch, timestamp
from ..backends.local import FAILED, RUNNING, STOPPED, SUCCEEDED
from ..naming import LABEL_RUN, LABEL_STAGE
from .logs import describe_exit
from .processes import ProcessTree, processes_with_env

HIDDEN_ENV = ("LLAVARUN_NAME", "LLAVARUN_NAMESPACE", "LLAVARUN_KUBECONFIG")
"""Locally the trainer reports into a file only, never to a cluster the shell happens to point at."""


def write_json(path: Path, value: Any) -> None:
    """Atomically: a reader sees the old document or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class _Running:
    tree: ProcessTree
    log: IO[str]
    reader: threading.Thread
    stage: Stage


class LocalJobs:
    """The LocalJobs of one run, on disk and as processes."""

    def __init__(self, directory: Path, run: str, on_line: Callable[[Stage, str], None]) -> None:
        self.dir = directory
        self.run = run
        self.on_line = on_line
        self.running: dict[str, _Running] = {}
        self._lines: queue.Queue[tuple[str, str | None]] = queue.Queue()

    # --- the store -------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(name).read_text())
        except FileNotFoundError:
            return None

    def list(self) -> list[dict[str, Any]]:
        """This run's jobs (their status as of the last poll)."""
        docs = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            if path.name.endswith(".status.json"):
                continue
            doc = json.loads(path.read_text())
            if (doc.get("metadata") or {}).get("labels", {}).get(LABEL_RUN) == self.run:
                docs.append(doc)
        return docs

    def _update(self, name: str, status: Mapping[str, Any]) -> None:
        doc = self.get(name)
        if doc is not None:
            write_json(self._path(name), merge_patch(doc, {"status": status}))

    # --- what the plan asks ----------------------------------------------------------------------

    def create(self, doc: Mapping[str, Any]) -> bool:
        """Store and start a job; False when one of that name exists (as a 409)."""
        name = doc["metadata"]["name"]
        if self.get(name) is not None:
            return False
        stored = merge_patch(doc, {"metadata": {"creationTimestamp": timestamp()}})
        write_json(self._path(name), stored)
        if not stored["spec"].get("suspend"):
            self._start(stored)
        return True

    def patch(self, name: str, patch: Mapping[str, Any]) -> None:
        """Merge-patch a job (a missing one is ignored, as a 404); flipping its suspension stops
        or starts its processes."""
        doc = self.get(name)
        if doc is None:
            return
        new = merge_patch(doc, patch)
        write_json(self._path(name), new)
        was, now = bool(doc["spec"].get("suspend")), bool(new["spec"].get("suspend"))
        finished = (new.get("status") or {}).get("phase") in (SUCCEEDED, FAILED)
        if now and not was and name in self.running:
            self.running[name].tree.signal(signal.SIGTERM)
        elif was and not now and not finished and name not in self.running:
            self._start(new)

    def delete(self, name: str) -> None:
        running = self.running.get(name)
        if running is not None:
            running.tree.signal(signal.SIGKILL)
            self._finish(name, running)
        self._path(name).unlink(missing_ok=True)

    # --- the processes ---------------------------------------------------------------------------

    def adopt(self) -> None:
        """Jobs no process of ours runs although they should: a killed supervisor's (whatever is
        left of their processes is ended first) and any created but never started. Each is
        started again, as the training-operator recreates a job's pods."""
        for doc in self.list():
            name, spec = doc["metadata"]["name"], doc["spec"]
            phase = (doc.get("status") or {}).get("phase")
            if phase in (SUCCEEDED, FAILED) or name in self.running:
                continue
            if phase == RUNNING:
                for pid in processes_with_env("LLAVARUN_STATUS_FILE", spec["env"]["LLAVARUN_STATUS_FILE"]):
                    os.kill(pid, signal.SIGKILL)
                self._update(name, {"phase": STOPPED})
            if not spec.get("suspend"):
                self._start(doc, note="started again: the llavarun local that ran it is gone")

    def _start(self, doc: Mapping[str, Any], note: str = "") -> None:
        name, spec = doc["metadata"]["name"], doc["spec"]
        env = {k: v for k, v in os.environ.items() if k not in HIDDEN_ENV}
        env.update(spec["env"])
        log_path = Path(spec["log"])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("a")
        if note:
            log.write(f"# {note}\n")
        log.write(f"$ {' '.join(spec['command'])}\n")
        log.flush()
        tree = ProcessTree.start(
            spec["command"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        reader = threading.Thread(target=self._pump, args=(name, tree.proc), daemon=True)
        reader.start()
        stage = Stage(doc["metadata"]["labels"][LABEL_STAGE])
        self.running[name] = _Running(tree, log, reader, stage)
        started = (doc.get("status") or {}).get("startTime") or timestamp()
        self._update(
            name,
            {
                "phase": RUNNING,
                "startTime": started,
                "exitCode": None,
                "message": None,
                "completionTime": None,
            },
        )

    def _pump(self, name: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._lines.put((name, line))
        self._lines.put((name, None))

    def _take(self, name: str, line: str) -> None:
        running = self.running.get(name)
        if running is not None:
            running.log.write(line)
            self.on_line(running.stage, line.rstrip("\n"))

    def poll(self, timeout: float) -> bool:
        """Pass output on for up to `timeout` seconds; True as soon as a job's processes ended."""
        deadline = time.monotonic() + timeout
        while True:
            ended = [n for n, r in self.running.items() if r.tree.proc.poll() is not None]
            for name in ended:
                self._finish(name, self.running[name])
            if ended:
                return True
            for running in self.running.values():
                running.tree.record()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                name, line = self._lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if line is not None:
                self._take(name, line)

    def _finish(self, name: str, running: _Running) -> None:
        """The launcher exited: reap what it left, flush its output, record how it ended."""
        running.tree.reap()
        running.reader.join(timeout=5)
        while True:
            try:
                owner, line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self._take(owner, line)
        running.log.close()
        del self.running[name]
        code = running.tree.proc.returncode
        doc = self.get(name)
        if doc is None:
            return
        log = Path(doc["spec"]["log"])
        if code == 0:
            phase, message = SUCCEEDED, None
        elif doc["spec"].get("suspend"):
            phase, message = STOPPED, f"stopped to suspend ({describe_exit(code, log)})"
        else:
            phase, message = FAILED, describe_exit(code, log)
        self._update(
            name,
            {
                "phase": phase,
                "exitCode": code,
                "message": message,
                "completionTime": timestamp(),
            },
        )

    def signal_all(self, sig: signal.Signals) -> None:
        for running in self.running.values():
            running.tree.signal(sig)
