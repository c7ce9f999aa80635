"""`llavarun`: the user-facing command (crd, render, validate, plan, report, operator, local)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from . import yamlio
from .kinds import CLUSTER_KINDS, DEFAULT_TRAINING_RUNTIME

COMMANDS: dict[str, str] = {
    "crd": "Print the LlavaRun CustomResourceDefinition generated from the API models",
    "render": "Print what the operator creates for a LlavaRun (RBAC and one PyTorchJob or TrainJob per stage)",
    "validate": "Check LlavaRun manifests offline, as the apiserver will",
    "plan": "Memory per device and time of each training stage, offline, before launching",
    "report": "A run's report from its status (the cluster's LlavaRun or a status file)",
    "operator": "Run the operator (kopf) against the current kubeconfig",
    "local": "Run a LlavaRun on this machine, each stage as local processes",
}


def _crd(args: argparse.Namespace) -> int:
    if args.reference:
        from .api.reference import render_reference

        sys.stdout.write(render_reference())
        return 0
    from .api.crd import generate_crd

    sys.stdout.write(yamlio.dump(generate_crd()))
    return 0


def _render(args: argparse.Namespace) -> int:
    """What the operator creates for each run, as it creates it: the backend's per-run objects,
    then each stage's first attempt (with the annotations the operator's plan keeps)."""
    from .api import Stage
    from .backends import cluster_backends, render_run
    from .validate import load_runs

    backends = cluster_backends(args.training_runtime)
    out = []
    for run in load_runs(yamlio.read_documents(args.file)):
        if args.stage and Stage(args.stage) not in run.spec.stages:
            raise ValueError(f"LlavaRun {run.name}: stage {args.stage!r} is not in spec.stages")
        stages = [Stage(args.stage)] if args.stage else list(run.spec.stages)
        out += render_run(backends[run.spec.backend or args.backend], run, stages)
    sys.stdout.write(yamlio.dump_all(out))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .validate import check_documents, data_problems, describe

    failed = 0
    for path in args.files:
        try:
            documents = yamlio.read_documents(path)
        except yamlio.YamlInputError as err:  # the other files are still checked
            failed += 1
            print(err, file=sys.stderr)
            continue
        for document, found in zip(documents, check_documents(documents), strict=True):
            if not found and args.data_dir is not None:
                found = data_problems(document.data, args.data_dir)
            if found:
                failed += 1
                print(f"{document.where}: {describe(document.data)} is invalid:", file=sys.stderr)
                for p in found:
                    print(f"  {p}", file=sys.stderr)
            else:
                print(f"{document.where}: {describe(document.data)} is valid")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llavarun", description="Kubernetes-native LLaVA-1.5 training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    crd = sub.add_parser("crd", help=COMMANDS["crd"])
    crd.add_argument("--reference", action="store_true", help="the markdown configuration reference instead")
    crd.set_defaults(func=_crd)
    render = sub.add_parser("render", help=COMMANDS["render"])
    render.add_argument("file", help="LlavaRun YAML ('-' for stdin)")
    render.add_argument("--stage", choices=["prepare", "pretrain", "finetune", "evaluate"])
    render.add_argument(
        "--backend",
        choices=CLUSTER_KINDS,
        default=CLUSTER_KINDS[0],
        help="The operator's default backend, for runs without spec.backend (default: %(default)s)",
    )
    render.add_argument(
        "--training-runtime",
        default=DEFAULT_TRAINING_RUNTIME,
        metavar="NAME",
        help="TrainJob: the operator's ClusterTrainingRuntime, for runs without spec.trainingRuntime",
    )
    render.set_defaults(func=_render)
    validate = sub.add_parser("validate", help=COMMANDS["validate"])
    validate.add_argument("files", nargs="+", help="LlavaRun YAML files")
    validate.add_argument(
        "--data-dir",
        type=Path,
        help="also check what each run reads from this data_dir (checkpoints, a task finetune's LLaVA "
        "model, data), as llavarun local does before it starts",
    )
    validate.set_defaults(func=_validate)
    from .capacity.cli import add_arguments as plan_arguments
    from .capacity.cli import run as plan_run

    plan = sub.add_parser("plan", help=COMMANDS["plan"], description=COMMANDS["plan"])
    plan_arguments(plan)
    plan.set_defaults(func=plan_run)
    from .runreport import add_arguments as report_arguments
    from .runreport import run as report_run

    report = sub.add_parser("report", help=COMMANDS["report"], description=COMMANDS["report"])
    report_arguments(report)
    report.set_defaults(func=report_run)
    for name in DELEGATED:  # listed for --help; main() hands them their arguments untouched
        sub.add_parser(name, help=COMMANDS[name], add_help=False)
    return parser


DELEGATED = {"operator": "llava_operator.main", "local": "llava_operator.local.main"}


def main(argv: list[str] | None = None) -> int:
    """Bad input (ValueError, including every YAML refusal) and unreadable files end as one
    `llavarun COMMAND: ...` message on stderr and exit code 1, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        # These commands own their flags entirely (argparse.REMAINDER refuses leading options).
        command, module = argv[0], importlib.import_module(DELEGATED[argv[0]])
        run = lambda: int(module.main(argv[1:]) or 0)  # noqa: E731
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: args.func(args)
    try:
        return run()
    except (ValueError, OSError) as err:
        print(f"llavarun {command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
