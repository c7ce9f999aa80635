"""Live progress of a local run: stage, step/total, loss, samples/s, ETA (rich)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..api import Stage


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
    """Keeps the latest metrics per stage and the loss history for the report."""

    console: Console = field(default_factory=Console)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    _live: Live | None = None

    def __enter__(self) -> ProgressView:
        self._live = Live(self.table(), console=self.console, refresh_per_second=4, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self.table())
            self._live.__exit__(*exc)

    def on_line(self, stage: Stage, line: str) -> None:
        self.started.setdefault(stage.value, time.monotonic())
        record = parse_log_line(line)
        if record is None:
            if line.startswith(("Traceback", "llava-trainer:", "ERROR", "Error")):
                self.console.print(f"[red]{stage.value}[/]: {line}")
            return
        self.latest.setdefault(stage.value, {}).update(record)
        if record.get("step") is not None and record.get("loss") is not None:
            self.history.setdefault(stage.value, []).append((int(record["step"]), float(record["loss"])))

    def on_tick(self) -> None:
        if self._live is not None:
            self._live.update(self.table())

    def table(self) -> Table:
        table = Table(title="llavarun local", expand=False)
        for column in ("stage", "step", "loss", "samples/s", "tokens/s", "elapsed", "ETA"):
            table.add_column(column, justify="right" if column != "stage" else "left")
        for stage, data in self.latest.items():
            step, total = data.get("step"), data.get("total_steps") or data.get("totalSteps")
            elapsed = time.monotonic() - self.started.get(stage, time.monotonic())
            eta = None
            if step and total:
                eta = elapsed / step * max(0, total - step)
            table.add_row(
                stage,
                f"{step}/{total}" if step is not None and total else _fmt(step, ""),
                _fmt(data.get("loss")),
                _fmt(data.get("samples_per_second") or data.get("samplesPerSecond"), ".3g"),
                _fmt(data.get("tokens_per_second") or data.get("tokensPerSecond"), ".4g"),
                f"{elapsed:.0f}s",
                "-" if eta is None else f"{eta:.0f}s",
            )
        return table
