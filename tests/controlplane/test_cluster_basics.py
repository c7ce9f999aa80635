"""The test control plane itself: what later tiers rely on must really work."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import yaml

from tests.cluster import (
    EXIT_CODE_ANNOTATION,
    GPU_RESOURCE,
    OUTCOME_LABEL,
    RUN_DURATION_ANNOTATION,
    Cluster,
    wait_for,
)

pytestmark = pytest.mark.cluster


def _get(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_apiserver_reports_the_pinned_version(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"] == cluster.expected_version
    major, minor = cluster.expected_version.removeprefix("v").split(".")[:2]
    assert (version["major"], version["minor"]) == (major, minor)
    client = json.loads(cluster.kubectl("version", "--client", "-o", "json").stdout)
    assert client["clientVersion"]["gitVersion"] == cluster.expected_version


def test_pytorchjob_crd_installs_server_side(cluster: Cluster) -> None:
    cluster.install_pytorchjob_crd()
    crd = _get(cluster, "crd", "pytorchjobs.kubeflow.org", "--show-managed-fields")
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    managers = {m["manager"] for m in crd["metadata"]["managedFields"]}
    assert "kubectl" in managers
    assert "kubectl.kubernetes.io/last-applied-configuration" not in crd["metadata"].get("annotations", {})
    # The API is served: a dry-run create validates against the schema.
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "dry", "namespace": "default"},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "template": {"spec": {"containers": [{"name": "pytorch", "image": "busybox"}]}},
                }
            }
        },
    }
    cluster.kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(job))


def test_gpu_pod_is_scheduled_on_a_kwok_gpu_node_and_runs(
    full_cluster: Cluster, cluster_namespace: str
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "gpu-pod", "namespace": cluster_namespace},
        "spec": {
            "containers": [
                {"name": "main", "image": "busybox", "resources": {"limits": {GPU_RESOURCE: "1"}}}
            ],
            "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        },
    }
    full_cluster.apply(pod)

    def running() -> dict[str, Any] | None:
        obj = _get(full_cluster, "pod", "gpu-pod", "-n", cluster_namespace)
        return obj if obj["status"].get("phase") == "Running" else None

    obj = wait_for(running, timeout=60, what="gpu-pod Running")
    node = _get(full_cluster, "node", obj["spec"]["nodeName"])
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert node["status"]["allocatable"][GPU_RESOURCE] == "8"
    assert {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]


def test_pod_without_toleration_stays_off_gpu_nodes(full_cluster: Cluster, cluster_namespace: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "plain", "namespace": cluster_namespace},
        "spec": {
            "containers": [{"name": "main", "image": "busybox", "resources": {"limits": {GPU_RESOURCE: "1"}}}]
        },
    }
    full_cluster.apply(pod)

    def unschedulable() -> bool:
        conds = _get(full_cluster, "pod", "plain", "-n", cluster_namespace)["status"].get("conditions", [])
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conds)

    wait_for(unschedulable, timeout=60, what="plain pod Unschedulable")


def _pytorchjob(
    name: str, namespace: str, master_labels: dict[str, str] | None = None, master_exit_code: int = 1
) -> dict[str, Any]:
    def replica(labels: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "replicas": 1,
            "restartPolicy": "Never",
            "template": {
                "metadata": {
                    "labels": labels or {},
                    "annotations": {
                        RUN_DURATION_ANNOTATION: "2s",
                        EXIT_CODE_ANNOTATION: str(master_exit_code),
                    },
                },
                "spec": {
                    "containers": [
                        {"name": "pytorch", "image": "busybox", "resources": {"limits": {GPU_RESOURCE: "1"}}}
                    ],
                    "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
                },
            },
        }

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"pytorchReplicaSpecs": {"Master": replica(master_labels), "Worker": replica()}},
    }


def _job_condition(cluster: Cluster, name: str, namespace: str) -> str | None:
    conds = _get(cluster, "pytorchjob", name, "-n", namespace).get("status", {}).get("conditions", [])
    done = [c["type"] for c in conds if c["type"] in ("Succeeded", "Failed") and c["status"] == "True"]
    return done[0] if done else None


def test_pytorchjob_runs_to_succeeded_through_kwok(full_cluster: Cluster, cluster_namespace: str) -> None:
    full_cluster.apply(_pytorchjob("tiny", cluster_namespace))

    def pods_and_services() -> bool:
        pods = _get(
            full_cluster, "pods", "-n", cluster_namespace, "-l", "training.kubeflow.org/job-name=tiny"
        )
        svcs = _get(
            full_cluster, "services", "-n", cluster_namespace, "-l", "training.kubeflow.org/job-name=tiny"
        )
        return len(pods["items"]) == 2 and len(svcs["items"]) == 2

    wait_for(pods_and_services, timeout=60, what="2 pods and 2 services for PyTorchJob tiny")
    result = wait_for(
        lambda: _job_condition(full_cluster, "tiny", cluster_namespace),
        timeout=90,
        what="PyTorchJob tiny finished",
    )
    assert result == "Succeeded"
    pods = _get(full_cluster, "pods", "-n", cluster_namespace, "-l", "training.kubeflow.org/job-name=tiny")
    roles = {
        p["metadata"]["labels"]["training.kubeflow.org/replica-type"]: p["status"]["phase"]
        for p in pods["items"]
    }
    assert roles["master"] == "Succeeded"


def test_pod_labelled_to_fail_fails_the_pytorchjob(full_cluster: Cluster, cluster_namespace: str) -> None:
    job = _pytorchjob("doomed", cluster_namespace, master_labels={OUTCOME_LABEL: "fail"}, master_exit_code=3)
    full_cluster.apply(job)
    result = wait_for(
        lambda: _job_condition(full_cluster, "doomed", cluster_namespace),
        timeout=90,
        what="PyTorchJob doomed finished",
    )
    assert result == "Failed"
    master = _get(full_cluster, "pod", "doomed-master-0", "-n", cluster_namespace)
    assert master["status"]["phase"] == "Failed"
    assert master["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_serviceaccount_token_authenticates_and_is_subject_to_rbac(
    cluster: Cluster, cluster_namespace: str
) -> None:
    ns = cluster_namespace
    sa = f"reader-{uuid.uuid4().hex[:6]}"
    cluster.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "cm-reader", "namespace": ns},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "cm-reader", "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
            },
        ]
    )
    kubeconfig = cluster.kubeconfig_for_token(cluster.create_token(ns, sa), namespace=ns)

    whoami = json.loads(cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:{sa}"

    def can_i(*args: str) -> str:
        proc = cluster.kubectl("auth", "can-i", *args, "-n", ns, kubeconfig=kubeconfig, check=False)
        return proc.stdout.strip()

    assert can_i("list", "configmaps") == "yes"
    assert can_i("create", "configmaps") == "no"
    assert can_i("list", "secrets") == "no"
    cluster.kubectl("get", "configmaps", "-n", ns, kubeconfig=kubeconfig)
    denied = cluster.kubectl("get", "secrets", "-n", ns, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()


def test_apiserver_restart_keeps_state(cluster: Cluster, cluster_namespace: str) -> None:
    cluster.kubectl("create", "configmap", "survivor", "-n", cluster_namespace, "--from-literal=a=b")
    old_pid = cluster.procs["apiserver"].pid
    cluster.restart_apiserver()
    assert cluster.procs["apiserver"].pid != old_pid
    cm = _get(cluster, "configmap", "survivor", "-n", cluster_namespace)
    assert cm["data"] == {"a": "b"}


def test_helm_talks_to_the_cluster(cluster: Cluster) -> None:
    version = cluster.helm("version", "--template", "{{ .Version }}").stdout.strip()
    assert version == cluster.versions["HELM_VERSION"]
    cluster.helm("list", "--all-namespaces")


OOM_STAGE = """
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: test-pod-oom
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchLabels: {kwok.llavarun.test/outcome: oom}
    matchExpressions:
    - jq: {key: .status.phase, operator: In, values: [Running]}
  steps:
  - patch:
      subresource: status
      root: status
      template: |
        phase: Failed
        containerStatuses:
        {{ range .spec.containers }}
        - name: {{ .name | Quote }}
          image: {{ .image | Quote }}
          ready: false
          restartCount: 0
          state:
            terminated: {exitCode: 137, reason: OOMKilled}
        {{ end }}
"""


def test_extra_kwok_stage_drives_pods(full_cluster: Cluster, cluster_namespace: str) -> None:
    full_cluster.add_kwok_stages(OOM_STAGE, name="oom")
    try:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "oom", "namespace": cluster_namespace, "labels": {OUTCOME_LABEL: "oom"}},
            "spec": {
                "containers": [{"name": "main", "image": "busybox"}],
                "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists"}],
            },
        }
        full_cluster.apply(pod)

        def terminated() -> dict[str, Any] | None:
            status = _get(full_cluster, "pod", "oom", "-n", cluster_namespace)["status"]
            return status if status.get("phase") == "Failed" else None

        status = wait_for(terminated, timeout=60, what="pod oom Failed")
        assert status["containerStatuses"][0]["state"]["terminated"]["reason"] == "OOMKilled"
    finally:
        full_cluster.remove_kwok_stages("oom")
