"""`llavarun plan FILE`: the capacity plan of each LlavaRun in FILE, offline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="LlavaRun YAML")
    parser.add_argument(
        "--data-dir", type=Path, help="read the model sizes and prepare's token lengths from this data_dir"
    )
    parser.add_argument("--mfu", type=float, metavar="PCT", help="assumed MFU in percent (ours)")
    parser.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="take the MFU measured by a previous run: its LlavaRun/status (YAML or JSON) or a gpu_step report",
    )
    parser.add_argument("--device", help="accelerator model from the table, e.g. H100, H200, A800, MI300X")
    parser.add_argument("--json", action="store_true", help="the plan as JSON")


def run(args: argparse.Namespace) -> int:
    """0 when every stage fits, 1 when one does not (the plan says what would)."""
    from .. import yamlio
    from ..validate import load_runs
    from .inputs import plan_for_run
    from .text import render_plan

    data_dir = args.data_dir.resolve() if args.data_dir else None
    plans = [
        plan_for_run(run, data_dir=data_dir, device=args.device, mfu=args.mfu, from_file=args.from_file)
        for run in load_runs(yamlio.read_documents(args.file))
    ]
    if args.json:
        sys.stdout.write(json.dumps(plans[0] if len(plans) == 1 else plans, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(render_plan(p) for p in plans))
    return 1 if any(not s["fits"] for p in plans for s in p["stages"].values()) else 0
