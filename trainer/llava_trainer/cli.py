"""`llava-trainer`: one subcommand per stage plus tools. Each command's module is imported only
when that command runs, so `--help` and the light tools do not pay for importing torch."""

from __future__ import annotations

import argparse
import importlib
import sys

from .config import CONFIGS, add_config_flags, parse_config

# command -> (module, one-line description). Stage commands get their flags from config.py and
# call `module.run(config) -> int`; tool commands define `add_arguments(parser)` and `main(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("llava_trainer.synth", "Create a small data_dir in the exact real layout and formats"),
    "prepare": ("llava_trainer.prepare", "Verify and index a data_dir"),
    "inspect": ("llava_trainer.inspect", "Show what the model trains on for one sample"),
    "pretrain": ("llava_trainer.train", "Projector-only feature alignment"),
    "finetune": ("llava_trainer.train", "Visual instruction tuning"),
    "evaluate": ("llava_trainer.evaluate.run", "MMMU accuracy with the official protocol"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-trainer",
        description="Runs the LLaVA-1.5 stages. Paths are relative to --data-dir unless absolute.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {c:<10} {d}" for c, (_, d) in COMMANDS.items()),
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])
        return 2
    command, rest = argv[0], argv[1:]
    module_name, description = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"llava-trainer {command}", description=description)
    if command in CONFIGS:
        add_config_flags(parser, CONFIGS[command])
        config = parse_config(CONFIGS[command], parser.parse_args(rest))
        return int(importlib.import_module(module_name).run(config) or 0)
    module = importlib.import_module(module_name)
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
