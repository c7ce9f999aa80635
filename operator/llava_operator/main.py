"""`llavarun operator`: run the kopf operator with our settings.

Always `--standalone` (no kopf peering): the chart runs exactly one replica with strategy
Recreate, which is the leader election kopf lacks.
"""

from __future__ import annotations

import argparse
import logging
import sys

import kopf

from . import metrics
from .backends import cluster_backends
from .kinds import CLUSTER_KINDS, DEFAULT_TRAINING_RUNTIME


def served_kinds(default: str, listed: str) -> list[str]:
    """The default backend first, then the other listed ones; ValueError for an unknown kind."""
    kinds = [default, *(k.strip() for k in listed.split(",") if k.strip())]
    unknown = sorted(set(kinds) - set(CLUSTER_KINDS))
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}: choose from {', '.join(CLUSTER_KINDS)}")
    return list(dict.fromkeys(kinds))


LOG_FORMATS = {"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llavarun operator",
        description="Reconcile LlavaRuns into one Kubeflow PyTorchJob or TrainJob per stage (kopf, standalone).",
    )
    parser.add_argument(
        "--backend",
        choices=CLUSTER_KINDS,
        default="PyTorchJob",
        help="What runs the stages of a run whose spec.backend is unset (default: %(default)s).",
    )
    parser.add_argument(
        "--backends",
        default="",
        metavar="KIND,...",
        help="Every backend served, comma-separated (spec.backend may pick any); default: --backend only. "
        "PyTorchJob needs the training-operator, TrainJob Kubeflow Trainer v2 with JobSet.",
    )
    parser.add_argument(
        "--training-runtime",
        default=DEFAULT_TRAINING_RUNTIME,
        metavar="NAME",
        help="TrainJob backend: the ClusterTrainingRuntime of runs without spec.trainingRuntime "
        "(default: %(default)s, the chart's).",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="Serve only this namespace (repeatable; kopf globs like 'team-*' work). Default: all.",
    )
    parser.add_argument(
        "-A", "--all-namespaces", action="store_true", help="Serve every namespace (default)."
    )
    parser.add_argument("--liveness-port", type=int, default=8080, help="Serve /healthz here (0: off).")
    parser.add_argument(
        "--metrics-port", type=int, default=9090, help="Serve Prometheus /metrics here (0: off)."
    )
    parser.add_argument("--bind-address", default="0.0.0.0", help="Address of the liveness/metrics servers.")
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=30.0,
        help="Reconcile every unfinished run at least this often (safety net for missed events).",
    )
    parser.add_argument(
        "--api-workers",
        type=int,
        default=32,
        help="Threads for Kubernetes API calls; reconciles of different runs proceed in parallel "
        "(explicit because Python's default follows the node's cores, not the pod's CPU limit).",
    )
    parser.add_argument("--log-format", choices=sorted(LOG_FORMATS), default="full")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log kopf's handler activity too.")
    parser.add_argument("--debug", action="store_true", help="Log every API request kopf makes.")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `llavarun operator -- --flags` passes the separator through
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args.all_namespaces and args.namespace:
        raise ValueError("choose --namespace or --all-namespaces, not both")
    kopf.configure(debug=args.debug, verbose=args.verbose, log_format=LOG_FORMATS[args.log_format])
    logging.getLogger("llavarun").setLevel(logging.INFO)

    from .handlers import REGISTRY, Context, serve_children

    available = cluster_backends(args.training_runtime)
    default, *others = (available[k] for k in served_kinds(args.backend, args.backends))
    for backend in (default, *others):
        serve_children(backend)
    metrics.serve(args.metrics_port, args.bind_address)
    liveness = f"http://{args.bind_address}:{args.liveness_port}/healthz" if args.liveness_port else None
    kopf.run(
        registry=REGISTRY,
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=liveness,
        memo=kopf.Memo(
            ctx=Context(
                resync_seconds=args.resync_seconds,
                api_workers=args.api_workers,
                backend=default,
                others=tuple(others),
            )
        ),
    )
    return 0
