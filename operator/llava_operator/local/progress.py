"""Progress of a local run: stage, step/total, loss, samples/s, ETA.

One view of the trainer's JSON log lines, shown two ways: a live table on a terminal, plain
timestamped lines elsewhere (CI logs, `| tee`), where a redrawn table would print nothing until
the end. Both print the run's events (stage started, succeeded, retried ...) as they happen and
the final table once. The console is expected to print text as is (no markup, no wrapping).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..api import Stage

COLUMNS = ("stage", "step", "loss", "samples/s", "tokens/s", "elapsed", "ETA")


def parse_log_line(line: str) -> dict[str, Any] | None:
    """A trainer JSON log line as a dict, or None for any other output."""
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


@dataclass
class ProgressView:
    """The latest metrics per stage and the loss history (for the report)."""

    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    current: str | None = None
    """The stage running now."""

    def running(self, stage: Stage) -> None:
        now = time.monotonic()
        if self.current not in (None, stage.value):
            self.ended[self.current] = now
        self.started.setdefault(stage.value, now)
        self.ended.pop(stage.value, None)
        self.current = stage.value

    def on_line(self, stage: Stage, line: str) -> None:
        self.running(stage)
        record = parse_log_line(line)
        if record is None:
            return
        self.latest.setdefault(stage.value, {}).update(record)
        if record.get("step") is not None and record.get("loss") is not None:
            self.history.setdefault(stage.value, []).append((int(record["step"]), float(record["loss"])))

    def row(self, stage: str) -> tuple[str, ...]:
        data = self.latest.get(stage, {})
        step, total = data.get("step"), data.get("total_steps") or data.get("totalSteps")
        now = time.monotonic()
        elapsed = self.ended.get(stage, now) - self.started.get(stage, now)
        eta = elapsed / step * max(0, total - step) if step and total else None
        return (
            stage,
            f"{step}/{total}" if step is not None and total else _fmt(step, ""),
            _fmt(data.get("loss")),
            _fmt(data.get("samples_per_second") or data.get("samplesPerSecond"), ".3g"),
            _fmt(data.get("tokens_per_second") or data.get("tokensPerSecond"), ".4g"),
            f"{elapsed:.0f}s",
            "-" if eta is None else f"{eta:.0f}s",
        )

    def line(self, stage: str) -> str:
        """One stage's row as `[stage] step 3/12 loss 4.1 ...`."""
        _, *values = self.row(stage)
        return f"[{stage}] " + " ".join(f"{c} {v}" for c, v in zip(COLUMNS[1:], values, strict=True))

    def table(self) -> Table:
        table = Table(title="llavarun local", expand=False)
        for column in COLUMNS:
            table.add_column(column, justify="right" if column != "stage" else "left")
        for stage in self.started:
            table.add_row(*self.row(stage))
        return table


@dataclass
class LiveDisplay:
    """A table redrawn in place (a terminal); events print above it."""

    view: ProgressView
    console: Console
    _live: Live | None = None

    def __enter__(self) -> LiveDisplay:
        # Transient: the final table is printed once, by finish(), like the plain display's.
        self._live = Live(self.view.table(), console=self.console, refresh_per_second=4, transient=True)
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def on_event(self, reason: str, message: str) -> None:
        self.console.print(f"{reason}: {message}")

    def on_tick(self, stage: Stage) -> None:
        self.view.running(stage)
        if self._live is not None:
            self._live.update(self.view.table())

    def finish(self) -> None:
        self.console.print(self.view.table())


@dataclass
class LineDisplay:
    """Plain lines for logs: each event, and the running stage's progress every `every` seconds."""

    view: ProgressView
    console: Console
    every: float = 30.0
    _last: float = field(default_factory=time.monotonic)

    def __enter__(self) -> LineDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _print(self, text: str) -> None:
        self.console.print(
            f"{time.strftime('%H:%M:%S')} {text}", highlight=False, markup=False, soft_wrap=True
        )

    def on_event(self, reason: str, message: str) -> None:
        self._print(f"{reason}: {message}")

    def on_tick(self, stage: Stage) -> None:
        self.view.running(stage)
        now = time.monotonic()
        if now - self._last >= self.every and self.view.current is not None:
            self._last = now
            self._print(self.view.line(self.view.current))

    def finish(self) -> None:
        self.console.print(self.view.table())
