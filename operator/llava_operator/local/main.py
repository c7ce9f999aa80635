"""`llavarun local FILE --data-dir DIR`: checks, then the stages, then the report.

Everything a person reads goes to stdout (so `| tee` keeps it); a refusal goes to stderr.
Exit status: 0 succeeded, 1 failed, 2 refused before starting, 128 + N stopped by signal N.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from .. import yamlio
from ..estimate import plan_lines, run_plan
from ..validate import load_run
from .preflight import Refused, preflight
from .progress import LineDisplay, LiveDisplay, ProgressView
from .report import write_report
from .runner import LocalRun

REFUSED_EXIT = 2


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
    parser.add_argument(
        "--plain", action="store_true", help="no live table: progress lines plus every trainer log line"
    )
    parser.add_argument(
        "--progress-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="without a live table (not a terminal, or --plain): a progress line every S seconds (default 30)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start again as a new run, forgetting the previous status and attempts (a failed run is "
        "final otherwise); logs, checkpoints and outputs stay, training resumes from the checkpoints",
    )
    parser.add_argument(
        "--oversubscribe",
        action="store_true",
        help="start a stage even if it has more processes than this machine has CPU cores",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    docs = yamlio.load_documents(args.file)
    if len(docs) != 1:
        raise ValueError(f"{args.file}: expected one LlavaRun, found {len(docs)} documents")
    run = load_run(docs[0])
    data_dir = args.data_dir.resolve()
    try:
        preflight(run, data_dir, oversubscribe=args.oversubscribe)
    except Refused as refused:
        print(f"llavarun local: LlavaRun {run.name} cannot start on this machine:", file=sys.stderr)
        for problem in refused.problems:
            print("\n".join(f"  {line}" for line in problem.splitlines()), file=sys.stderr)
        return REFUSED_EXIT

    console = Console(file=sys.stdout, highlight=False, markup=False, soft_wrap=True)
    view = ProgressView()
    live = console.is_terminal and not args.plain
    display = LiveDisplay(view, console) if live else LineDisplay(view, console, args.progress_seconds)
    local = LocalRun(run, data_dir, on_line=view.on_line, on_tick=display.on_tick, on_event=display.on_event)
    if args.plain:
        local.on_line = lambda stage, line: (
            view.on_line(stage, line),
            console.out(f"[{stage.value}] {line}"),
        )
    console.print(
        f"llavarun local: LlavaRun {run.name}: stages {', '.join(s.value for s in run.spec.stages)}"
    )
    console.print(f"status file: {local.paths.status_file}")
    planned = run_plan(run)  # what the status records as status.plan, as the operator does
    for line in plan_lines(planned):
        console.print(line)
    if not planned.get("unavailable"):
        console.print(
            "  (the recipe's model sizes and typical lengths; `llavarun plan FILE --data-dir DIR` reads yours)"
        )
    try:
        with display:
            code = local.execute(fresh=args.fresh)
    except Refused as refused:
        print(f"llavarun local: {refused}", file=sys.stderr)
        return REFUSED_EXIT
    display.finish()
    status = local.status()
    report = write_report(
        local.output_root / "report", run.name, [s.value for s in run.spec.stages], status, view.history
    )
    if code == 0:
        console.print(f"LlavaRun {run.name} succeeded")
    elif code > 128:
        console.print(
            f"LlavaRun {run.name} suspended (signal {code - 128}); rerun the same command to resume"
        )
    else:
        failed = next((c for c in status.get("conditions", []) if c["type"] == "Failed"), {})
        console.print(f"LlavaRun {run.name} failed ({failed.get('reason', '')}): {failed.get('message', '')}")
        console.print(
            "a failed run is final; `--fresh` starts it again as a new run (training resumes from its checkpoints)"
        )
    console.print(f"report: {report}")
    return code
