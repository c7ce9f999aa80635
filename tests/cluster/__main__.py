"""Command line: ``python -m tests.cluster build`` and ``python -m tests.cluster up``.

``up`` starts the same control plane the tests use, prints ``export KUBECONFIG=...`` and
keeps it running until Ctrl-C or SIGTERM, then stops every process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from .controlplane import BUILD_SCRIPT, FULL, OPTIONAL_COMPONENTS, TRAINER_STACK, Cluster, build


def _up(args: argparse.Namespace) -> int:
    components: list[str] = list(FULL) if args.full else []
    if args.trainer:
        components += TRAINER_STACK
    for item in args.with_ or []:
        components += [c for c in item.split(",") if c]
    if args.gpu_nodes and "kwok" not in components:
        components += ["scheduler", "kwok"]  # GPU nodes are only useful with pods scheduled onto them
    components = list(dict.fromkeys(components))  # once each, in the order asked
    bin_dir = build()
    cluster = Cluster(
        bin_dir=bin_dir,
        workdir=Path(args.workdir) if args.workdir else None,
        gpu_nodes=2 if args.gpu_nodes is None else args.gpu_nodes,
    )
    try:
        cluster.start(components)
        print(
            f"# control plane {cluster.expected_version} up: {', '.join(['etcd', 'apiserver', *components])}"
        )
        print(f"# logs: {cluster.logs_dir}   binaries: {bin_dir}")
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        print(f"export PATH={bin_dir}:$PATH")
        print("# Ctrl-C or SIGTERM stops it.", flush=True)
        while True:
            time.sleep(1)
            dead = [name for name, proc in cluster.procs.items() if not proc.alive()]
            if dead:
                print(f"component(s) exited: {dead}\n{cluster.describe_logs()}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        print("\nstopping ...", file=sys.stderr)
        return 0
    finally:
        cluster.stop()
        print(f"stopped; logs kept in {cluster.logs_dir}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build/cache the binaries (tests/cluster/build)")
    up = sub.add_parser("up", help="run a control plane until interrupted")
    up.add_argument("--full", action="store_true", help=f"also start {', '.join(FULL)}")
    up.add_argument(
        "--trainer", action="store_true", help=f"also start the Trainer v2 stack: {', '.join(TRAINER_STACK)}"
    )
    up.add_argument(
        "--with",
        dest="with_",
        action="append",
        metavar="COMPONENTS",
        help=f"comma-separated extra components from {', '.join(OPTIONAL_COMPONENTS)}",
    )
    up.add_argument(
        "--gpu-nodes",
        type=int,
        metavar="N",
        help="fake GPU nodes (8 GPUs each); implies scheduler+kwok (default 2 when kwok runs)",
    )
    up.add_argument("--workdir", help="state/log directory (default: a new temp dir)")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        return subprocess.call([str(BUILD_SCRIPT)])
    return _up(args)


if __name__ == "__main__":
    sys.exit(main())
