"""The Kubeflow Trainer v2 stack of the test control plane, end to end.

A TrainJob against a minimal torch ClusterTrainingRuntime becomes a JobSet, the JobSet a Job, the
Job one pod per node on kwok GPU nodes; pods that exit 0 make the TrainJob Complete, a pod that
exits non-zero makes it Failed (and can be found from it), and ``suspend`` reaches the JobSet.
These are the facts an operator-side TrainJob backend builds on: every assertion is one of them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.cluster import (
    EXIT_CODE_ANNOTATION,
    GPU_RESOURCE,
    OUTCOME_LABEL,
    RUN_DURATION_ANNOTATION,
    Cluster,
    CommandError,
    wait_for,
)

pytestmark = pytest.mark.cluster

RUNTIME = "llavarun-test-torch"
#: Who owns our runtimePatches entry (the TrainJob API keys patches by manager).
PATCH_MANAGER = "llavarun.io/test"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def _torch_runtime() -> dict[str, Any]:
    """A minimal torch ClusterTrainingRuntime, shaped like the trainer module's torch-distributed.

    One replicated job "node" (the trainer step, container "node"). No Job retries and no
    container restarts: a failing pod fails the Job, the JobSet and the TrainJob at once.
    """
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "ClusterTrainingRuntime",
        "metadata": {"name": RUNTIME, "labels": {"trainer.kubeflow.org/framework": "torch"}},
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": "node",
                            "template": {
                                "metadata": {
                                    "labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
                                },
                                "spec": {
                                    "backoffLimit": 0,
                                    "template": {
                                        "spec": {
                                            "restartPolicy": "Never",
                                            "containers": [{"name": "node", "image": "llava-trainer:test"}],
                                        }
                                    },
                                },
                            },
                        }
                    ]
                }
            },
        },
    }


def _trainjob(
    name: str,
    namespace: str,
    *,
    pod_labels: dict[str, str] | None = None,
    pod_annotations: dict[str, str] | None = None,
    suspend: bool = False,
) -> dict[str, Any]:
    """A 2-node TrainJob with 8 GPUs per node; GPU tolerations and kwok steering via runtimePatches."""
    pod_patch = {
        "metadata": {"labels": pod_labels or {}, "annotations": pod_annotations or {}},
        "spec": {"tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]},
    }
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "runtimeRef": {"name": RUNTIME},
            "suspend": suspend,
            "trainer": {
                "numNodes": 2,
                "command": ["llava-trainer", "pretrain"],
                "resourcesPerNode": {"limits": {GPU_RESOURCE: "8"}},
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {"name": "node", "template": {"spec": {"template": pod_patch}}}
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }


def _get(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return None


def _pods(cluster: Cluster, namespace: str, trainjob: str) -> list[dict[str, Any]]:
    """The TrainJob's pods: its JobSet has its name, and JobSet labels every pod with that."""
    items = _get(cluster, "pods", "-n", namespace, "-l", f"{JOBSET_NAME_LABEL}={trainjob}")["items"]
    return list(items)


def _wait_condition(cluster: Cluster, namespace: str, name: str, type_: str, status: str = "True") -> Any:
    def has() -> dict[str, Any] | None:
        cond = _condition(_get(cluster, "trainjob", name, "-n", namespace), type_)
        return cond if cond and cond["status"] == status else None

    return wait_for(has, timeout=90, interval=0.3, what=f"TrainJob {name} {type_}={status}")


def _wait_pods(
    cluster: Cluster, namespace: str, name: str, phase: str, count: int = 2
) -> list[dict[str, Any]]:
    def there() -> list[dict[str, Any]] | None:
        pods = _pods(cluster, namespace, name)
        return pods if len(pods) == count and all(p["status"].get("phase") == phase for p in pods) else None

    return list(wait_for(there, timeout=90, interval=0.2, what=f"{count} {phase} pods of TrainJob {name}"))


@pytest.fixture(scope="module")
def torch_runtime(trainer_cluster: Cluster) -> Iterator[str]:
    trainer_cluster.apply(_torch_runtime())
    try:
        yield RUNTIME
    finally:
        trainer_cluster.kubectl("delete", "clustertrainingruntime", RUNTIME, "--wait=false", check=False)


def test_trainjob_runs_as_a_jobset_on_kwok_gpu_nodes_and_completes(
    trainer_cluster: Cluster, torch_runtime: str, cluster_namespace: str
) -> None:
    c, ns = trainer_cluster, cluster_namespace
    c.apply(_trainjob("tiny", ns, pod_annotations={RUN_DURATION_ANNOTATION: "3s"}))

    # TrainJob -> JobSet of the same name, controlled by the TrainJob.
    jobset = wait_for(lambda: _get(c, "jobset", "tiny", "-n", ns), timeout=60, what="JobSet tiny")
    owner = jobset["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("TrainJob", "tiny", True)
    assert jobset["spec"]["suspend"] is False
    [rjob] = jobset["spec"]["replicatedJobs"]
    assert rjob["name"] == "node" and rjob["replicas"] == 1
    # numNodes is the Job's parallelism: one Indexed Job "<trainjob>-node-0" with a pod per node.
    job = wait_for(lambda: _get(c, "job", "tiny-node-0", "-n", ns), timeout=60, what="Job tiny-node-0")
    assert (job["spec"]["parallelism"], job["spec"]["completions"]) == (2, 2)
    assert job["spec"]["completionMode"] == "Indexed"

    # Both pods run at once, one per GPU node (8 GPUs each: two cannot share a node).
    pods = _wait_pods(c, ns, "tiny", "Running")
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert len(nodes) == 2
    for node_name in nodes:
        node = _get(c, "node", node_name)
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        assert node["status"]["allocatable"][GPU_RESOURCE] == "8"
    assert sorted(p["metadata"]["labels"][COMPLETION_INDEX_LABEL] for p in pods) == ["0", "1"]
    for pod in pods:
        [container] = pod["spec"]["containers"]
        assert container["name"] == "node"
        assert container["command"] == ["llava-trainer", "pretrain"]
        assert container["resources"]["limits"][GPU_RESOURCE] == "8"
        env = {e["name"]: e for e in container["env"]}
        assert env["PET_NNODES"]["value"] == "2"
        assert env["PET_MASTER_ADDR"]["value"] == "tiny-node-0-0.tiny"  # rank 0's hostname.subdomain
        assert "job-completion-index" in env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert pod["metadata"]["labels"]["jobset.sigs.k8s.io/replicatedjob-name"] == "node"

    complete = _wait_condition(c, ns, "tiny", "Complete")
    assert complete["reason"] == "AllJobsCompleted"
    trainjob = _get(c, "trainjob", "tiny", "-n", ns)
    assert _condition(trainjob, "Failed") is None
    assert trainjob["status"]["jobsStatus"] == [
        {"name": "node", "active": 0, "failed": 0, "ready": 0, "succeeded": 1, "suspended": 0}
    ]
    assert {p["status"]["phase"] for p in _pods(c, ns, "tiny")} == {"Succeeded"}


def test_a_failed_pod_fails_the_trainjob_and_is_found_from_it(
    trainer_cluster: Cluster, torch_runtime: str, cluster_namespace: str
) -> None:
    c, ns = trainer_cluster, cluster_namespace
    # Both pods run until told otherwise; then rank 1 alone exits 3.
    c.apply(
        _trainjob(
            "doomed", ns, pod_labels={OUTCOME_LABEL: "hang"}, pod_annotations={EXIT_CODE_ANNOTATION: "3"}
        )
    )
    pods = _wait_pods(c, ns, "doomed", "Running")
    [rank1] = [p["metadata"]["name"] for p in pods if p["metadata"]["labels"][COMPLETION_INDEX_LABEL] == "1"]
    c.kubectl("label", "pod", rank1, "-n", ns, f"{OUTCOME_LABEL}=fail", "--overwrite")

    failed = _wait_condition(c, ns, "doomed", "Failed")
    assert failed["reason"] == "FailedJobs"
    assert "first failed job: doomed-node-0" in failed["message"]
    trainjob = _get(c, "trainjob", "doomed", "-n", ns)
    assert _condition(trainjob, "Complete") is None
    assert trainjob["status"]["jobsStatus"][0]["failed"] == 1
    job = _get(c, "job", "doomed-node-0", "-n", ns)
    assert (_condition(job, "Failed") or {}).get("reason") == "BackoffLimitExceeded"

    # From the TrainJob to the pod and its exit code: the JobSet label selects the TrainJob's pods;
    # the failed one stays (the Job deleted the other, still running one).
    def failed_pods() -> list[dict[str, Any]] | None:
        pods = _pods(c, ns, "doomed")
        return pods if len(pods) == 1 else None

    [pod] = wait_for(failed_pods, timeout=60, what="only the failed pod left")
    assert pod["metadata"]["name"] == rank1
    assert pod["status"]["phase"] == "Failed"
    assert pod["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "doomed-node-0"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_suspend_reaches_the_jobset_and_resume_runs_the_pods(
    trainer_cluster: Cluster, torch_runtime: str, cluster_namespace: str
) -> None:
    c, ns = trainer_cluster, cluster_namespace
    c.apply(_trainjob("paused", ns, pod_labels={OUTCOME_LABEL: "hang"}, suspend=True))

    def suspended_everywhere() -> bool:
        jobset = _get(c, "jobset", "paused", "-n", ns)
        job = _get(c, "job", "paused-node-0", "-n", ns)
        return bool(
            jobset["spec"]["suspend"] is True
            and (_condition(jobset, "Suspended") or {}).get("status") == "True"
            and (_condition(job, "Suspended") or {}).get("status") == "True"
        )

    wait_for(suspended_everywhere, timeout=60, what="JobSet and Job of TrainJob paused suspended")
    cond = _wait_condition(c, ns, "paused", "Suspended")
    assert cond["reason"] == "Suspended"
    assert _pods(c, ns, "paused") == []

    c.kubectl("patch", "trainjob", "paused", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    _wait_pods(c, ns, "paused", "Running")
    assert _get(c, "jobset", "paused", "-n", ns)["spec"]["suspend"] is False
    assert _wait_condition(c, ns, "paused", "Suspended", status="False")["reason"] == "Resumed"

    # Suspending a running TrainJob suspends its JobSet, whose Job deletes the running pods.
    c.kubectl("patch", "trainjob", "paused", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(lambda: _pods(c, ns, "paused") == [], timeout=60, what="pods of TrainJob paused deleted")
    assert _get(c, "jobset", "paused", "-n", ns)["spec"]["suspend"] is True
    assert _wait_condition(c, ns, "paused", "Suspended")["reason"] == "Suspended"
    trainjob = _get(c, "trainjob", "paused", "-n", ns)
    assert _condition(trainjob, "Complete") is None and _condition(trainjob, "Failed") is None


def test_the_apiserver_calls_the_controllers_webhooks(
    trainer_cluster: Cluster, torch_runtime: str, cluster_namespace: str
) -> None:
    c, ns = trainer_cluster, cluster_namespace
    # Registered from the modules' manifests, pointed at the local servers, trusting the test CA.
    ca = c.pki.ca_crt.read_bytes()
    expected = {
        "mutatingwebhookconfigurations": {
            "defaulter.trainer.kubeflow.org": {"defaulter.trainjob.trainer.kubeflow.org"},
            "jobset-mutating-webhook-configuration": {"mjobset.kb.io", "mpod.kb.io"},
        },
        "validatingwebhookconfigurations": {
            "validator.trainer.kubeflow.org": {
                "validator.clustertrainingruntime.trainer.kubeflow.org",
                "validator.trainingruntime.trainer.kubeflow.org",
                "validator.trainjob.trainer.kubeflow.org",
            },
            "jobset-validating-webhook-configuration": {"vjobset.kb.io", "vpod.kb.io"},
        },
    }
    for kind, configs in expected.items():
        for name, hook_names in configs.items():
            hooks = _get(c, kind, name)["webhooks"]
            assert {h["name"] for h in hooks} == hook_names
            for hook in hooks:
                assert hook["clientConfig"]["url"].startswith("https://127.0.0.1:")
                assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca
                assert hook["failurePolicy"] == "Fail"
                if hook["name"].endswith("pod.kb.io"):  # only pods of JobSets go through JobSet
                    [expr] = hook["objectSelector"]["matchExpressions"]
                    assert (expr["key"], expr["operator"]) == (JOBSET_NAME_LABEL, "Exists")

    # The trainer's validating webhook refuses a TrainJob whose runtime does not exist.
    missing = _trainjob("orphan", ns)
    missing["spec"]["runtimeRef"]["name"] = "no-such-runtime"
    with pytest.raises(
        CommandError, match=r'admission webhook "validator\.trainjob\.trainer\.kubeflow\.org" denied'
    ):
        c.kubectl("create", "-f", "-", input=yaml.safe_dump(missing))

    # JobSet's defaulting webhook fills in what its schema cannot: a pod restartPolicy.
    jobset = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": "bare", "namespace": ns},
        "spec": {
            "replicatedJobs": [
                {
                    "name": "r",
                    "template": {
                        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}}
                    },
                }
            ]
        },
    }
    out = json.loads(
        c.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=yaml.safe_dump(jobset)).stdout
    )
    assert (
        out["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["restartPolicy"]
        == "OnFailure"
    )
