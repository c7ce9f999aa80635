"""`llavarun local FILE [--data-dir DIR]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from .. import yamlio
from ..validate import load_run
from .progress import ProgressView
from .report import write_report
from .runner import INTERRUPTED_EXIT, LocalRun


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llavarun local",
        description="Run a LlavaRun's stages on this machine (torchrun with the stage's processes).",
    )
    parser.add_argument("file", help="LlavaRun YAML")
    parser.add_argument(
        "--data-dir",
        type=Path,
        required=True,
        help="the data_dir (FlagPerf llava1.5 layout; `llava-trainer synth --out DIR` makes a tiny one)",
    )
    parser.add_argument("--plain", action="store_true", help="no live table, just the trainer's log lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    docs = yamlio.load_documents(args.file)
    if len(docs) != 1:
        raise ValueError(f"{args.file}: expected one LlavaRun, found {len(docs)} documents")
    run = load_run(docs[0])
    data_dir = args.data_dir.resolve()
    if not data_dir.is_dir():
        raise ValueError(f"--data-dir {data_dir} is not a directory")
    console = Console(stderr=True)
    view = ProgressView(console=console)
    local = LocalRun(run, data_dir, on_line=view.on_line, on_tick=view.on_tick)
    console.print(f"llavarun local: {run.name}: stages {', '.join(s.value for s in run.spec.stages)}")
    console.print(f"status file: {local.status.path}")
    if args.plain:
        local.on_line = lambda stage, line: (view.on_line(stage, line), print(f"[{stage.value}] {line}"))
        code = local.execute()
    else:
        with view:
            code = local.execute()
    status = local.status.read()
    report = write_report(
        local.output_root / "report",
        run.name,
        [s.value for s in run.spec.stages],
        status,
        local.outcomes,
        view.history,
    )
    if code == 0:
        console.print(f"[green]LlavaRun {run.name} succeeded[/]")
    elif code == INTERRUPTED_EXIT:
        console.print("[yellow]interrupted; rerun the same command to resume[/]")
    else:
        failed = next((c for c in status.get("conditions", []) if c["type"] == "Failed"), {})
        console.print(f"[red]LlavaRun {run.name} failed: {failed.get('message', '')}[/]")
    console.print(f"report: {report}")
    print(json.dumps({"phase": status.get("phase"), "report": str(report)}), file=sys.stdout)
    return code
