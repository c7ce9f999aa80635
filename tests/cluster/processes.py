"""Supervision of the control-plane processes.

Every component runs in its own session (process group) so that stopping it
also stops anything it spawned, and with PR_SET_PDEATHSIG so that it is killed
by the kernel even when the Python process dies without running any cleanup
(SIGKILL, OOM). Output goes to one log file per component, appended across
restarts so a restart's history stays readable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class ComponentError(RuntimeError):
    """A component failed to start or to become ready (the message has its log tail)."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel's choice, so parallel sessions do not clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        # Linux only; elsewhere the atexit/signal cleanup still applies.
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # parent already gone before prctl took effect
            os._exit(1)

    return preexec


def tail(path: Path, lines: int = 40) -> str:
    """Last *lines* lines of a log file ("" if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


class Process:
    """One long-running component: start, readiness wait, stop, log."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stop_timeout: float = 15.0,
    ) -> None:
        self.name = name
        self.stop_timeout = stop_timeout
        self.argv = argv
        self.log = log
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        if self.alive():
            return
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the process group, then SIGKILL what is left after *timeout* (default stop_timeout)."""
        if self.popen is None:
            return
        timeout = self.stop_timeout if timeout is None else timeout
        pgid = self.popen.pid  # start_new_session: pgid == pid
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        # Kill stragglers of the group even when the leader already exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        with self.log.open("ab") as out:
            out.write(f"=== {time.strftime('%H:%M:%S')} stopped (rc={self.popen.returncode})\n".encode())
        self.popen = None

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll *ready* until true; fail fast with the log tail if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                rc = self.popen.returncode if self.popen else None
                raise ComponentError(
                    f"{self.name} exited (rc={rc}) before {what}; log {self.log}:\n{tail(self.log)}"
                )
            try:
                if ready():
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise ComponentError(
                    f"{self.name}: timed out after {timeout:.0f}s waiting for {what}; "
                    f"log {self.log}:\n{tail(self.log)}"
                )
            time.sleep(0.2)
