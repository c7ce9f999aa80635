"""`llavarun report NAME | --status-file FILE`: a run's report from its status (local/report.py
builds it; this is the edge that reads the LlavaRun from the cluster or a file)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="the LlavaRun's name (read from the cluster)")
    parser.add_argument(
        "--status-file",
        metavar="FILE",
        help="a LlavaRun (YAML/JSON, e.g. kubectl get -o yaml) or its bare status (llavarun local's status file)",
    )
    parser.add_argument(
        "-n", "--namespace", help="namespace (default: the kubeconfig context's, else default)"
    )
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)"
    )
    parser.add_argument("--device", help="accelerator model when the run names none (e.g. H100, A800)")
    parser.add_argument("--json", action="store_true", help="the report as JSON")


def read_cluster_run(name: str, namespace: str | None, kubeconfig: str | None) -> dict[str, Any]:
    """The LlavaRun object as the apiserver has it (spec and status)."""
    from kubernetes import client, config

    from .apiserver import ApiError, request, run_path

    try:
        _contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        api = config.new_client_from_config(config_file=kubeconfig)
        namespace = namespace or (active.get("context") or {}).get("namespace") or "default"
    except config.ConfigException as err:
        if kubeconfig:
            raise ValueError(f"kubeconfig {kubeconfig}: {err}") from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise ValueError(f"no usable kubeconfig ({err}) and not inside a cluster") from None
        api = client.ApiClient()
        namespace = namespace or Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip()
    try:
        return request(api, "GET", run_path(namespace, name))
    except ApiError as err:  # one line on stderr (llavarun's ValueError), not a traceback
        raise ValueError(str(err)) from None


def accelerator_of(document: dict[str, Any], device: str | None) -> dict[str, Any] | None:
    """The accelerator, device counts and FlagPerf's N from the run's spec (None without one)."""
    if "spec" not in document:
        return None
    from llava_trainer.flops import flagperf_params

    from .capacity.geometry import recipe_geometry
    from .capacity.inputs import choose_device
    from .validate import load_run

    run = load_run({k: v for k, v in document.items() if k != "status"})
    chosen, source = choose_device(run, device)
    spec = run.spec
    geometry = recipe_geometry(spec.paths.language_model)
    n = flagperf_params(geometry.llm_params) if geometry else None
    stages = {"pretrain": spec.pretrain, "finetune": spec.finetune, "evaluate": spec.evaluate}
    return {
        "model": chosen.model,
        "peakTflops": chosen.peak_tflops,
        "source": source,
        "devices": {s: hp.resources.processes for s, hp in stages.items()},
        "flagperfN": {s: n for s in ("pretrain", "finetune")} if n else {},
    }


def run(args: argparse.Namespace) -> int:
    from . import yamlio
    from .local.report import report_markdown, run_report

    if bool(args.name) == bool(args.status_file):
        raise ValueError("give a LlavaRun NAME (read from the cluster) or --status-file FILE, not both")
    if args.status_file:
        documents = yamlio.load_documents(args.status_file)
        if len(documents) != 1 or not isinstance(documents[0], dict):
            raise ValueError(f"{args.status_file}: expected one LlavaRun or status object")
        document = documents[0]
        name = (document.get("metadata") or {}).get("name") or Path(args.status_file).stem
    else:
        document = read_cluster_run(args.name, args.namespace, args.kubeconfig)
        name = args.name
    status = document.get("status", {}) if "spec" in document or "status" in document else document
    spec_stages = (document.get("spec") or {}).get("stages")
    report = run_report(
        name, status or {}, stage_order=spec_stages, accelerator=accelerator_of(document, args.device)
    )
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(report_markdown(report)) + "\n")
    return 0
