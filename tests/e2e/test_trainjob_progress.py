"""The real trainer in a TrainJob's pod reports its progress twice: into the LlavaRun status (with
its run's own token) and, through the runtime status endpoint Kubeflow Trainer v2 injects into the
pod (feature gate TrainJobStatus, KEP-2779), into the TrainJob's `status.trainerStatus`.

The pod is played by a local process, as in test_trainer_status: the operator's trainer flags with
a tiny local data_dir, under `torchrun --standalone`, with the literal env of the TrainJob's kwok
pod (what Trainer injected included). Two things a kubelet would provide are made here: the
projected volume's files (the CA from the TrainJob's ConfigMap, a token of the pod's
ServiceAccount with the volume's audience), and the endpoint's address: its in-cluster Service
name does not resolve on this host, so the URL's host becomes 127.0.0.1 (same port and path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from llava_trainer.status import TrainerStatusSink

from tests.cluster import Cluster

from .childkinds import TRAINJOB
from .support import (
    Kube,
    OperatorProcess,
    job_name,
    play_trainer_pod,
    run_token_kubeconfig,
    synth_data_dir,
    tiny_pretrain,
    wait_pods,
)

pytestmark = pytest.mark.e2e

RUN = "v2reporter"
STATUS_ENV = (
    "KUBEFLOW_TRAINER_SERVER_URL",
    "KUBEFLOW_TRAINER_SERVER_CA_CERT",
    "KUBEFLOW_TRAINER_SERVER_TOKEN",
)


def trainer_container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == TRAINJOB.container]
    return dict(container)


def projected_status_volume(pod: dict[str, Any], mount_dir: str) -> tuple[str, str]:
    """(token audience, CA ConfigMap) of the projected volume mounted at `mount_dir`."""
    (mount,) = [m for m in trainer_container(pod)["volumeMounts"] if m["mountPath"] == mount_dir]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    sources = volume["projected"]["sources"]
    audience = next(s["serviceAccountToken"]["audience"] for s in sources if "serviceAccountToken" in s)
    return audience, next(s["configMap"]["name"] for s in sources if "configMap" in s)


def test_rank_zero_reports_into_the_llavarun_and_the_trainjob_trainer_status(
    e2e_cluster: Cluster,
    kube: Kube,
    running_operator: OperatorProcess,
    cluster_namespace: str,
    tmp_path: Path,
) -> None:
    if not e2e_cluster.trainer_status_server:
        pytest.skip("Trainer v2 runs without its status server here: no private mount namespaces")
    ns, job = cluster_namespace, job_name(RUN, "pretrain")
    kube.create_run(tiny_pretrain(ns, RUN, backend="TrainJob"))
    data_dir = synth_data_dir(tmp_path)
    (pod,) = wait_pods(kube, ns, TRAINJOB.pods_of(job), "Running")
    pod_env = {e["name"]: e["value"] for e in trainer_container(pod)["env"] if "value" in e}
    assert all(pod_env.get(name) for name in STATUS_ENV), "Trainer injected no status endpoint"

    # The projected volume, as the kubelet would write it.
    files = tmp_path / "kubeflow-trainer"
    files.mkdir()
    audience, ca_map = projected_status_volume(
        pod, str(Path(pod_env["KUBEFLOW_TRAINER_SERVER_TOKEN"]).parent)
    )
    assert audience == f"trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs/{job}/status"
    (files / "ca.crt").write_text(kube.core.read_namespaced_config_map(ca_map, ns).data["ca.crt"])
    account = pod["spec"]["serviceAccountName"]
    token = e2e_cluster.create_token(ns, account, expiration_seconds=600, audiences=[audience])
    (files / "token").write_text(token)
    url = urlsplit(pod_env["KUBEFLOW_TRAINER_SERVER_URL"])
    status_url = urlunsplit(url._replace(netloc=f"127.0.0.1:{url.port}"))

    # A token for another TrainJob's endpoint is refused: the audience is the TrainJob.
    other = e2e_cluster.create_token(ns, account, expiration_seconds=600, audiences=[audience + "x"])
    (files / "other-token").write_text(other)
    with pytest.raises(OSError, match="answered 403"):
        TrainerStatusSink(status_url, str(files / "ca.crt"), str(files / "other-token")).write({})

    log = tmp_path / "pretrain.log"
    pod_env |= {
        "KUBEFLOW_TRAINER_SERVER_URL": status_url,
        "KUBEFLOW_TRAINER_SERVER_CA_CERT": str(files / "ca.crt"),
        "KUBEFLOW_TRAINER_SERVER_TOKEN": str(files / "token"),
        "LLAVARUN_KUBECONFIG": str(run_token_kubeconfig(e2e_cluster, ns, RUN)),
    }
    play_trainer_pod(kube.run(ns, RUN), "pretrain", data_dir, pod_env, log)
    assert "failed to write" not in log.read_text(), log.read_text()[-4000:]

    st = kube.status(ns, RUN)
    progress, results = st["progress"], st["results"]["pretrain"]
    trainer_status = TRAINJOB.jobs(kube, ns)[job]["status"]["trainerStatus"]
    assert trainer_status["progressPercentage"] == progress["percent"] == 100
    metrics = {m["name"]: float(m["value"]) for m in trainer_status["metrics"]}
    assert metrics["step"] == progress["step"] == 2
    for name, value in (("loss", progress["loss"]), ("samplesPerSecond", progress["samplesPerSecond"]),
                        ("finalLoss", results["finalLoss"])):  # fmt: skip
        assert metrics[name] == pytest.approx(value, rel=1e-5)
    assert trainer_status["lastUpdatedTime"] == progress["lastUpdate"]
    assert st["backend"] == "TrainJob" and st["stages"]["pretrain"]["job"] == job
