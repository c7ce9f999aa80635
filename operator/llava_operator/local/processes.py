"""One local attempt's processes: the launcher (torchrun, or the trainer itself) and everything it
starts, stopped together and never left behind.

torchrun starts each worker in a session of its own, so signalling the launcher's process group
does not reach the workers, and a launcher that dies leaves them running under PID 1. So the
tree below the launcher is recorded while it runs (from /proc), and stopping signals every
recorded process group; whatever is left when the launcher has exited is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, process group, state) of a process; None when it is gone."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[2]), fields[0]


def children_by_parent() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            tree.setdefault(stat[0], []).append(int(entry.name))
    return tree


def descendants(root: int) -> list[int]:
    tree, out, todo = children_by_parent(), [], [root]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def processes_with_env(key: str, value: str) -> list[int]:
    """Processes whose environment holds KEY=VALUE (those of ours we can read): how a later
    `llavarun local` finds the processes of an attempt whose supervisor was killed."""
    wanted = f"{key}={value}".encode()
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in env and (stat := _stat(int(entry.name))) is not None and stat[2] != "Z":
            found.append(int(entry.name))
    return found


def _signal_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


@dataclass
class ProcessTree:
    """A launcher started in a session of its own, and what it started."""

    proc: subprocess.Popen[str]
    seen: dict[int, int] = field(default_factory=dict)
    """pid -> process group of every process seen below the launcher (and the launcher)."""

    @classmethod
    def start(cls, command: list[str], **popen: object) -> ProcessTree:
        proc = subprocess.Popen(command, start_new_session=True, **popen)  # type: ignore[call-overload]
        tree = cls(proc)
        tree.seen[proc.pid] = proc.pid
        return tree

    @property
    def pid(self) -> int:
        return self.proc.pid

    def record(self) -> None:
        """Remember the processes below the launcher (call it now and then while it runs)."""
        for pid in descendants(self.proc.pid):
            stat = _stat(pid)
            if stat is not None and stat[2] != "Z":
                self.seen.setdefault(pid, stat[1])

    def alive(self) -> list[int]:
        """Recorded processes still running in the process group they were seen in."""
        out = []
        for pid, group in self.seen.items():
            stat = _stat(pid)
            if stat is not None and stat[1] == group and stat[2] != "Z":
                out.append(pid)
        return out

    def groups(self) -> set[int]:
        return {self.seen[pid] for pid in self.alive()}

    def signal(self, sig: signal.Signals) -> None:
        """Signal every recorded process group that still has a recorded member."""
        self.record()
        for group in self.groups() or {self.proc.pid}:
            _signal_group(group, sig)

    def reap(self) -> None:
        """After the launcher exited: kill what it left behind, and wait for the launcher."""
        self.record()
        for pid in self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for group in {self.seen[pid] for pid in self.alive()}:
            _signal_group(group, signal.SIGKILL)
        self.proc.wait()
