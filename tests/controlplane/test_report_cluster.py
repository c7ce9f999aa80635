"""`llavarun report NAME` reads the LlavaRun from a real apiserver (kubeconfig, -n NAMESPACE)."""

from __future__ import annotations

import json

import pytest
from llava_operator.cli import main

from tests.cluster import Cluster
from tests.helpers import EXAMPLES, ROOT, load_yaml

pytestmark = pytest.mark.cluster


def test_report_of_a_run_in_the_cluster(cluster: Cluster, cluster_namespace: str, capsys):
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds" / "llavarun.yaml"))
    cluster.wait_crd_established("llavaruns.llavarun.io")
    doc = load_yaml(EXAMPLES[0]) | {"metadata": {"name": "reported"}}
    cluster.kubectl("create", "-n", cluster_namespace, "-f", "-", input=json.dumps(doc))
    status = {
        "phase": "Succeeded",
        "stages": {"pretrain": {"phase": "Succeeded", "attempts": 1}},
        "results": {"pretrain": {"tokensPerSecond": 16000.0, "mfu": 40.0, "mfuFlagperf": 20.0}},
    }
    cluster.kubectl(
        "patch", "llavarun", "reported", "-n", cluster_namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": status}),
    )  # fmt: skip
    args = ["report", "reported", "-n", cluster_namespace, "--kubeconfig", str(cluster.kubeconfig), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    pretrain = report["stages"]["pretrain"]
    devices = doc["spec"].get("pretrain", {}).get("resources", {}).get("gpusPerNode", 8)
    assert pretrain["devices"] == devices and pretrain["tokensPerSecondPerChip"] == 16000.0 / devices
    assert pretrain["mfu"] == 40.0 and report["phase"] == "Succeeded"
    assert main(["report", "missing", "-n", cluster_namespace, "--kubeconfig", str(cluster.kubeconfig)]) == 1
    assert "404" in capsys.readouterr().err
