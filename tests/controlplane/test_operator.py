"""The operator on a real apiserver, under the chart's own RBAC.

The chart is installed with helm (replicas=0); the operator runs as a local `llavarun operator`
process authenticated with a TokenRequest token of the chart's ServiceAccount, so every call it
makes is authorised exactly as in a cluster. The tests play the training-operator by patching
PyTorchJob status through the status subresource as the admin (the real training-operator, if an
earlier test started it, is paused for this module so it does not race us).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from llava_operator.api.status import timestamp

from tests.cluster import (
    CONTROLLER_MANAGER,
    RUN_DURATION_ANNOTATION,
    TRAINING_OPERATOR,
    Cluster,
    wait_for,
)
from tests.e2e.support import (
    OPERATOR_NAMESPACE,
    OPERATOR_SERVICE_ACCOUNT,
    OperatorProcess,
    install_chart,
    operator_running,
    prepare_cluster,
)

pytestmark = pytest.mark.cluster

OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"
RESYNC = 2


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Iterator[dict[str, Any]]:
    """The chart installed (replicas=0) and the timings of doing so."""
    cluster.ensure(CONTROLLER_MANAGER)  # garbage collection of children
    paused = TRAINING_OPERATOR in cluster.components and cluster.procs[TRAINING_OPERATOR].alive()
    if paused:
        cluster.stop_component(TRAINING_OPERATOR)
    cluster.install_pytorchjob_crd()
    t0 = time.monotonic()
    out = install_chart(cluster)
    try:
        yield {"helm_output": out.stdout, "install_seconds": time.monotonic() - t0}
    finally:
        if paused:
            cluster.restart(TRAINING_OPERATOR)


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster,
    installed: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with operator_running(cluster, log, request.session, resync_seconds=RESYNC) as proc:
        yield proc


# --- helpers ---------------------------------------------------------------------------------------


def run_manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llavarun.io/v1alpha1",
        "kind": "LlavaRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "image": "ghcr.io/llavarun/llava-trainer:0.1.0",
            "storage": {"data": {"source": {"emptyDir": {}}}},
            "accelerator": {"profile": "cpu"},
            **spec,
        },
    }


def get(cluster: Cluster, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def jobs(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    items = json.loads(cluster.kubectl("get", "pytorchjobs", "-n", namespace, "-o", "json").stdout)["items"]
    return {j["metadata"]["name"]: j for j in items}


def status(cluster: Cluster, name: str, namespace: str) -> dict[str, Any]:
    return (get(cluster, "llavarun", name, namespace) or {}).get("status") or {}


def condition(cluster: Cluster, name: str, namespace: str, ctype: str) -> dict[str, Any]:
    return next((c for c in status(cluster, name, namespace).get("conditions", []) if c["type"] == ctype), {})


def wait_status(
    cluster: Cluster, name: str, namespace: str, what: str, timeout: float = 30, **fields: Any
) -> None:
    def match() -> bool:
        st = status(cluster, name, namespace)
        return all(st.get(k) == v for k, v in fields.items())

    wait_for(
        match,
        timeout=timeout,
        interval=0.3,
        what=f"{what}: {fields} (last {status(cluster, name, namespace)})",
    )


def wait_job(cluster: Cluster, name: str, namespace: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(
        lambda: get(cluster, "pytorchjob", name, namespace), timeout=timeout, interval=0.3, what=name
    )


def set_job(cluster: Cluster, name: str, namespace: str, outcome: str, **status_fields: Any) -> None:
    """Move a PyTorchJob the way the training-operator does: conditions through /status."""
    now = timestamp()
    conds = [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated", "lastTransitionTime": now}]
    running = outcome == "Running"
    conds.append(
        {"type": "Running", "status": str(running), "reason": "PyTorchJobRunning", "lastTransitionTime": now}
    )
    if not running:
        conds.append({
            "type": outcome, "status": "True", "reason": f"PyTorchJob{outcome}", "lastTransitionTime": now,
            "message": f"PyTorchJob {namespace}/{name} is {outcome.lower()}.",
        })  # fmt: skip
    body: dict[str, Any] = {"conditions": conds, "startTime": now, **status_fields}
    if not running:
        body["completionTime"] = now
    cluster.kubectl(
        "patch", "pytorchjob", name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": body}),
    )  # fmt: skip


def events(cluster: Cluster, name: str, namespace: str) -> list[str]:
    out = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name},involvedObject.kind=LlavaRun",
        "-o", "json",
    )  # fmt: skip
    items = sorted(
        json.loads(out.stdout)["items"], key=lambda e: (e.get("lastTimestamp") or "", e["metadata"]["name"])
    )
    return [e["reason"] for e in items]


def can_i(cluster: Cluster, user: str, *args: str) -> bool:
    proc = cluster.kubectl("auth", "can-i", *args, "--as", user, check=False)
    return proc.stdout.strip() == "yes"


# --- install and RBAC ------------------------------------------------------------------------------


def test_chart_installs_with_notes(installed: dict[str, Any]) -> None:
    out = installed["helm_output"]
    assert "serving LlavaRuns in every namespace" in out
    assert "replicas=0" in out
    assert installed["install_seconds"] < 120


def test_operator_service_account_cannot_read_secrets_or_touch_unrelated_objects(
    cluster: Cluster, installed: dict[str, Any], cluster_namespace: str
) -> None:
    ns = ["-n", cluster_namespace]
    allowed = [
        ("create", "pytorchjobs.kubeflow.org", *ns),
        ("patch", "llavaruns.llavarun.io", "--subresource=status", *ns),
        ("watch", "llavaruns.llavarun.io", "-A"),
        ("list", "pods", *ns),
        ("create", "events", *ns),
        ("create", "roles.rbac.authorization.k8s.io", *ns),
        ("list", "customresourcedefinitions.apiextensions.k8s.io"),
    ]
    denied = [
        ("get", "secrets", *ns),
        ("list", "secrets", "-A"),
        ("watch", "secrets", "-A"),
        ("get", "configmaps", *ns),
        ("create", "pods", *ns),
        ("delete", "pods", *ns),
        ("delete", "llavaruns.llavarun.io", *ns),
        ("create", "llavaruns.llavarun.io", *ns),
        ("update", "llavaruns.llavarun.io", *ns),
        ("patch", "deployments.apps", *ns),
        ("delete", "roles.rbac.authorization.k8s.io", *ns),
        ("patch", "roles.rbac.authorization.k8s.io", *ns),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("escalate", "roles.rbac.authorization.k8s.io", *ns),
        ("bind", "roles.rbac.authorization.k8s.io", *ns),
        ("impersonate", "serviceaccounts", *ns),
        ("create", "serviceaccounts", "--subresource=token", *ns),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
    ]
    assert [a for a in allowed if not can_i(cluster, OPERATOR_USER, *a)] == []
    assert [d for d in denied if can_i(cluster, OPERATOR_USER, *d)] == []


def test_default_roles_let_namespace_users_see_and_edit_llavaruns(
    cluster: Cluster, installed: dict[str, Any], cluster_namespace: str
) -> None:
    cluster.kubectl(
        "create", "rolebinding", "viewer", "--clusterrole=view", "--user=alice", "-n", cluster_namespace
    )
    cluster.kubectl(
        "create", "rolebinding", "editor", "--clusterrole=edit", "--user=bob", "-n", cluster_namespace
    )
    ns = ["-n", cluster_namespace]
    wait_for(
        lambda: can_i(cluster, "alice", "list", "llavaruns.llavarun.io", *ns), timeout=30, what="aggregation"
    )
    assert not can_i(cluster, "alice", "create", "llavaruns.llavarun.io", *ns)
    wait_for(
        lambda: can_i(cluster, "bob", "create", "llavaruns.llavarun.io", *ns), timeout=30, what="aggregation"
    )
    assert not can_i(cluster, "bob", "patch", "llavaruns.llavarun.io", "--subresource=status", *ns)


# --- the run's lifecycle ---------------------------------------------------------------------------


def test_new_run_gets_status_rbac_and_first_job_all_owned_and_no_finalizer(
    cluster: Cluster, operator: OperatorProcess, cluster_namespace: str
) -> None:
    ns = cluster_namespace
    cluster.apply(run_manifest("fresh", ns, stages=["prepare", "pretrain"]))
    job = wait_job(cluster, "fresh-prepare", ns)
    wait_status(
        cluster, "fresh", ns, "first status", phase="Pending", stage="prepare", currentJob="fresh-prepare"
    )
    run = get(cluster, "llavarun", "fresh", ns)
    assert run is not None
    uid = run["metadata"]["uid"]
    assert run["metadata"].get("finalizers") in (None, [])
    assert not [a for a in run["metadata"].get("annotations", {}) if a.startswith("kopf.zalando.org")]
    assert "llavarun.io/last-handled-configuration" in run["metadata"]["annotations"]
    assert run["status"]["observedGeneration"] == run["metadata"]["generation"]
    conds = {c["type"]: c["status"] for c in run["status"]["conditions"]}
    assert conds == {"Succeeded": "Unknown", "Failed": "False", "Suspended": "False", "Queued": "False"}
    for kind, name in (("serviceaccount", "fresh-trainer"), ("role", "fresh-status-writer"),
                       ("rolebinding", "fresh-status-writer")):  # fmt: skip
        obj = wait_for(lambda k=kind, n=name: get(cluster, k, n, ns), timeout=10, what=name)
        (owner,) = obj["metadata"]["ownerReferences"]
        assert (owner["uid"], owner["controller"]) == (uid, True)
    (owner,) = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("LlavaRun", uid, True)
    assert wait_for(lambda: "StageStarted" in events(cluster, "fresh", ns), timeout=10, what="event")


def test_a_run_on_a_backend_the_operator_does_not_serve_is_refused_until_the_spec_picks_one(
    cluster: Cluster, operator: OperatorProcess, cluster_namespace: str
) -> None:
    """This operator serves PyTorchJobs only: a TrainJob run fails InvalidSpec naming spec.backend,
    creates nothing, and runs once the user picks a served backend."""
    ns = cluster_namespace
    cluster.apply(run_manifest("elsewhere", ns, stages=["prepare"], backend="TrainJob"))
    wait_status(cluster, "elsewhere", ns, "refused", phase="Failed", reason="InvalidSpec")
    failed = condition(cluster, "elsewhere", ns, "Failed")
    assert failed["status"] == "True" and failed["message"].startswith(
        "spec is invalid: spec.backend: TrainJob is not served by this operator (it serves PyTorchJob)"
    )
    assert "backend" not in status(cluster, "elsewhere", ns)  # nothing started: nothing recorded
    assert jobs(cluster, ns) == {} and get(cluster, "serviceaccount", "elsewhere-trainer", ns) is None
    assert wait_for(lambda: "InvalidSpec" in events(cluster, "elsewhere", ns), timeout=10, what="event")

    cluster.kubectl("patch", "llavarun", "elsewhere", "-n", ns, "--type=merge", "-p",
                    json.dumps({"spec": {"backend": "PyTorchJob"}}))  # fmt: skip
    wait_job(cluster, "elsewhere-prepare", ns)
    wait_status(cluster, "elsewhere", ns, "started", phase="Pending", backend="PyTorchJob")
    assert condition(cluster, "elsewhere", ns, "Failed")["status"] == "False"


def test_stages_advance_in_order_to_success(
    cluster: Cluster, operator: OperatorProcess, cluster_namespace: str
) -> None:
    ns = cluster_namespace
    cluster.apply(run_manifest("order", ns, stages=["prepare", "pretrain", "evaluate"]))
    created = []
    for stage in ("prepare", "pretrain", "evaluate"):
        name = f"order-{stage}"
        wait_job(cluster, name, ns)
        created.append(stage)
        assert sorted(jobs(cluster, ns)) == sorted(f"order-{s}" for s in created)
        set_job(cluster, name, ns, "Running")
        wait_status(cluster, "order", ns, "running", phase="Running", stage=stage)
        set_job(cluster, name, ns, "Succeeded")
    wait_status(cluster, "order", ns, "done", phase="Succeeded")
    st = status(cluster, "order", ns)
    assert condition(cluster, "order", ns, "Succeeded")["status"] == "True"
    assert {s: r["phase"] for s, r in st["stages"].items()} == dict.fromkeys(
        ("prepare", "pretrain", "evaluate"), "Succeeded"
    )
    assert all(r["completionTime"] and r["startTime"] and r["attempts"] == 1 for r in st["stages"].values())
    got = wait_for(
        lambda: (e := events(cluster, "order", ns)) and "RunSucceeded" in e and e, timeout=10, what="events"
    )
    assert (
        got.count("StageStarted") == 3 and got.count("StageSucceeded") == 3 and got.count("RunSucceeded") == 1
    )
    table = cluster.kubectl("get", "llavaruns", "-n", ns).stdout.splitlines()
    assert table[0].split() == ["NAME", "STAGE", "PHASE", "PROGRESS", "ETA", "REASON", "AGE"]
    assert table[1].split()[:3] == ["order", "evaluate", "Succeeded"]
    wide = cluster.kubectl("get", "llavaruns", "-n", ns, "-o", "wide").stdout.splitlines()
    assert "order-evaluate" in wide[1].split()


def test_failed_job_is_retried_then_the_run_fails_naming_job_and_pod(
    cluster: Cluster, operator: OperatorProcess, cluster_namespace: str
) -> None:
    ns = cluster_namespace
    cluster.apply(run_manifest("flaky", ns, stages=["pretrain"], retries=1,
                               pretrain={"globalBatchSize": 8, "microBatchSize": 1}))  # fmt: skip
    wait_job(cluster, "flaky-pretrain", ns)
    set_job(cluster, "flaky-pretrain", ns, "Failed", replicaStatuses={"Master": {"failed": 1}})
    retry = wait_job(cluster, "flaky-pretrain-r1", ns)
    assert retry["metadata"]["labels"]["llavarun.io/attempt"] == "1"
    wait_status(cluster, "flaky", ns, "retrying", currentJob="flaky-pretrain-r1", phase="Running")
    assert "flaky-pretrain-master-0" in status(cluster, "flaky", ns)["stages"]["pretrain"]["message"]
    # A failed worker pod of the last attempt, as the training-operator leaves it.
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "flaky-pretrain-r1-worker-0", "namespace": ns,
                     "labels": {"training.kubeflow.org/job-name": "flaky-pretrain-r1"}},
        "spec": {"containers": [{"name": "pytorch", "image": "x"}]},
    }  # fmt: skip
    cluster.kubectl("create", "-f", "-", input=yaml.safe_dump(pod))
    cluster.kubectl(
        "patch", "pod", pod["metadata"]["name"], "-n", ns, "--subresource=status", "--type=merge", "-p",
        json.dumps({"status": {"phase": "Failed", "containerStatuses": [{
            "name": "pytorch", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}),
    )  # fmt: skip
    set_job(cluster, "flaky-pretrain-r1", ns, "Failed", replicaStatuses={"Worker": {"failed": 1}})
    wait_status(cluster, "flaky", ns, "failed", phase="Failed")
    failed = condition(cluster, "flaky", ns, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "BackoffLimitExceeded")
    assert "job flaky-pretrain-r1 failed" in failed["message"]
    assert "pod flaky-pretrain-r1-worker-0: exit code 137, OOMKilled" in failed["message"]
    assert sorted(jobs(cluster, ns)) == ["flaky-pretrain", "flaky-pretrain-r1"]
    reasons = wait_for(
        lambda: (e := events(cluster, "flaky", ns)) and "StageFailed" in e and e, timeout=10, what="ev"
    )
    assert reasons.count("StageRetrying") == 1
    time.sleep(2 * RESYNC)
    assert sorted(jobs(cluster, ns)) == ["flaky-pretrain", "flaky-pretrain-r1"]


def test_suspend_and_resume_patch_the_current_job_only_when_the_user_changes_it(
    cluster: Cluster, operator: OperatorProcess, cluster_namespace: str
) -> None:
    ns = cluster_namespace
    cluster.apply(run_manifest("pause", ns, stages=["prepare", "pretrain"]))
    wait_job(cluster, "pause-prepare", ns)
    set_job(cluster, "pause-prepare", ns, "Running")
    cluster.kubectl("patch", "llavarun", "pause", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_status(cluster, "pause", ns, "suspended", phase="Suspended")
    assert jobs(cluster, ns)["pause-prepare"]["spec"]["runPolicy"]["suspend"] is True
    assert condition(cluster, "pause", ns, "Suspended")["status"] == "True"
    cluster.kubectl(
        "patch", "llavarun", "pause", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    wait_for(lambda: jobs(cluster, ns)["pause-prepare"]["spec"]["runPolicy"]["suspend"] is False, timeout=20,
             what="resumed job")  # fmt: skip
    wait_status(cluster, "pause", ns, "resumed", phase="Running")
    assert condition(cluster, "pause", ns, "Suspended")["reason"] == "Resumed"
    reasons = wait_for(
        lambda: (e := events(cluster, "pause", ns)) and "Resumed" in e and e, timeout=10, what="ev"
    )
    assert reasons.count("Suspended") == 1


def test_queue_suspension_shows_queued_and_is_never_overridden(
    cluster: Cluster, operator: OperatorProcess, cluster_namespace: str
) -> None:
    """Kueue suspends a job until admission: the run is Queued and we leave runPolicy.suspend alone."""
    ns = cluster_namespace
    cluster.apply(run_manifest("queued", ns, stages=["pretrain"], placement={"queueName": "gpu-queue"}))
    job = wait_job(cluster, "queued-pretrain", ns)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    cluster.kubectl("patch", "pytorchjob", "queued-pretrain", "-n", ns, "--type=merge",
                    "-p", '{"spec":{"runPolicy":{"suspend":true}}}')  # fmt: skip
    wait_status(cluster, "queued", ns, "queued", phase="Queued")
    assert condition(cluster, "queued", ns, "Queued")["status"] == "True"
    time.sleep(3 * RESYNC)  # several resyncs: nobody flips it back
    assert jobs(cluster, ns)["queued-pretrain"]["spec"]["runPolicy"]["suspend"] is True
    cluster.kubectl("patch", "pytorchjob", "queued-pretrain", "-n", ns, "--type=merge",
                    "-p", '{"spec":{"runPolicy":{"suspend":false}}}')  # fmt: skip
    set_job(cluster, "queued-pretrain", ns, "Running")
    wait_status(cluster, "queued", ns, "admitted", phase="Running")
    assert "Queued" in events(cluster, "queued", ns)


def test_operator_killed_mid_stage_resumes_without_duplicates(
    cluster: Cluster, operator: OperatorProcess, cluster_namespace: str
) -> None:
    ns = cluster_namespace
    cluster.apply(run_manifest("crash", ns, stages=["prepare", "pretrain", "evaluate"]))
    wait_job(cluster, "crash-prepare", ns)
    set_job(cluster, "crash-prepare", ns, "Running")
    wait_status(cluster, "crash", ns, "running", phase="Running")
    operator.kill()
    t0 = time.monotonic()
    set_job(cluster, "crash-prepare", ns, "Succeeded")  # while the operator is down
    operator.start()
    wait_job(cluster, "crash-pretrain", ns)
    recovery = time.monotonic() - t0
    set_job(cluster, "crash-pretrain", ns, "Running")
    wait_status(cluster, "crash", ns, "pretrain running", phase="Running", stage="pretrain")
    wait_for(
        lambda: events(cluster, "crash", ns).count("StageStarted") == 2, timeout=10, what="events posted"
    )
    operator.kill()  # and once more right after it acted
    operator.start()
    set_job(cluster, "crash-pretrain", ns, "Succeeded")
    wait_job(cluster, "crash-evaluate", ns)
    set_job(cluster, "crash-evaluate", ns, "Succeeded")
    wait_status(cluster, "crash", ns, "done", phase="Succeeded")
    time.sleep(2 * RESYNC)
    assert sorted(jobs(cluster, ns)) == ["crash-evaluate", "crash-prepare", "crash-pretrain"]
    reasons = events(cluster, "crash", ns)
    assert reasons.count("StageSucceeded") == 3, reasons
    assert reasons.count("StageStarted") == 3, reasons
    assert recovery < 60


def test_apiserver_restart_is_survived(
    cluster: Cluster, operator: OperatorProcess, cluster_namespace: str
) -> None:
    """The watches break and resume (kopf re-lists); the operator neither dies nor misses the stage."""
    ns = cluster_namespace
    cluster.apply(run_manifest("outage", ns, stages=["prepare", "pretrain"]))
    wait_job(cluster, "outage-prepare", ns)
    t0 = time.monotonic()
    cluster.restart_apiserver()
    set_job(cluster, "outage-prepare", ns, "Succeeded")
    wait_job(cluster, "outage-pretrain", ns, timeout=60)
    recovery = time.monotonic() - t0
    assert operator.healthy()
    assert sorted(jobs(cluster, ns)) == ["outage-prepare", "outage-pretrain"]
    assert recovery < 60


def test_trainer_service_account_patches_only_its_own_run_status(
    cluster: Cluster, operator: OperatorProcess, cluster_namespace: str
) -> None:
    ns = cluster_namespace
    for name in ("alpha", "beta"):
        cluster.apply(run_manifest(name, ns, stages=["pretrain"]))
        wait_job(cluster, f"{name}-pretrain", ns)
    trainer = f"system:serviceaccount:{ns}:alpha-trainer"
    wait_for(lambda: can_i(cluster, trainer, "patch", "llavaruns.llavarun.io/alpha", "--subresource=status", "-n", ns),
             timeout=20, what="trainer role")  # fmt: skip
    assert not can_i(
        cluster, trainer, "patch", "llavaruns.llavarun.io/beta", "--subresource=status", "-n", ns
    )
    assert not can_i(cluster, trainer, "patch", "llavaruns.llavarun.io/alpha", "-n", ns)
    assert not can_i(cluster, trainer, "list", "llavaruns.llavarun.io", "-n", ns)
    assert not can_i(cluster, trainer, "get", "secrets", "-n", ns)
    # The trainer's write survives the operator's next reconciliations (disjoint subtrees).
    token = cluster.create_token(ns, "alpha-trainer")
    kubeconfig = cluster.kubeconfig_for_token(token, namespace=ns)
    cluster.kubectl(
        "patch",
        "llavarun",
        "alpha",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"progress":{"step":7,"loss":1.25,"percent":3}}}',
        kubeconfig=kubeconfig,
    )
    denied = cluster.kubectl(
        "patch",
        "llavarun",
        "beta",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"progress":{"step":7}}}',
        kubeconfig=kubeconfig,
        check=False,
    )
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    set_job(cluster, "alpha-pretrain", ns, "Running")
    wait_status(cluster, "alpha", ns, "running", phase="Running")
    time.sleep(2 * RESYNC)
    assert status(cluster, "alpha", ns)["progress"] == {"step": 7, "loss": 1.25, "percent": 3}


def test_deleting_a_run_never_waits_for_the_operator_and_collects_its_children(
    cluster: Cluster, operator: OperatorProcess, cluster_namespace: str
) -> None:
    ns = cluster_namespace
    cluster.apply(run_manifest("gone", ns, stages=["pretrain"]))
    wait_job(cluster, "gone-pretrain", ns)
    wait_for(lambda: get(cluster, "rolebinding", "gone-status-writer", ns), timeout=10, what="rbac")
    operator.stop()
    try:
        t0 = time.monotonic()
        cluster.kubectl("delete", "llavarun", "gone", "-n", ns, "--timeout=30s")
        deleted_in = time.monotonic() - t0
        wait_for(lambda: not jobs(cluster, ns), timeout=60, what="garbage collection of the job")
        for kind, name in (("serviceaccount", "gone-trainer"), ("role", "gone-status-writer"),
                           ("rolebinding", "gone-status-writer")):  # fmt: skip
            wait_for(lambda k=kind, n=name: get(cluster, k, n, ns) is None, timeout=60, what=f"GC of {name}")
    finally:
        operator.start()
    assert deleted_in < 30


def test_metrics_and_logs(cluster: Cluster, operator: OperatorProcess, cluster_namespace: str) -> None:
    ns = cluster_namespace
    cluster.apply(run_manifest("metered", ns, stages=["pretrain"]))
    wait_job(cluster, "metered-pretrain", ns)
    set_job(cluster, "metered-pretrain", ns, "Succeeded")
    wait_status(cluster, "metered", ns, "done", phase="Succeeded")

    def scraped() -> str | None:
        text = operator.metrics()
        return text if text and 'llavarun_runs{phase="Succeeded"}' in text and "_count" in text else None

    text = wait_for(scraped, timeout=20, what="metrics")
    assert 'llavarun_stage_duration_seconds_count{result="succeeded",stage="pretrain"}' in text
    assert "llavarun_reconcile_errors_total" in text or "llavarun_reconciles_total" in text
    assert 'llavarun_transitions_total{reason="RunSucceeded"}' in text
    logs = operator.log.read_text().splitlines()
    assert any("RunSucceeded" in line and line.startswith("{") for line in logs)
    assert operator.errors() == []


# --- with the real training-operator ---------------------------------------------------------------


@pytest.fixture
def training_operator(cluster: Cluster, installed: dict[str, Any]) -> Cluster:
    """scheduler + kwok GPU nodes + the training-operator, running (un-paused) for this test."""
    return prepare_cluster(cluster)


def test_stages_run_through_the_real_training_operator_and_kwok_pods(
    training_operator: Cluster, operator: OperatorProcess, cluster_namespace: str
) -> None:
    cluster, ns = training_operator, cluster_namespace
    t0 = time.monotonic()
    cluster.apply(
        run_manifest(
            "real", ns, stages=["prepare", "pretrain"], accelerator={"profile": "nvidia"},
            placement={"podAnnotations": {RUN_DURATION_ANNOTATION: "1s"}},
            pretrain={"globalBatchSize": 8, "microBatchSize": 1, "resources": {"nodes": 1, "gpusPerNode": 8}},
        )
    )  # fmt: skip
    wait_status(cluster, "real", ns, "run succeeded", timeout=180, phase="Succeeded")
    took = time.monotonic() - t0
    st = status(cluster, "real", ns)
    assert {s: r["job"] for s, r in st["stages"].items()} == {
        "prepare": "real-prepare",
        "pretrain": "real-pretrain",
    }
    states = {n: j["status"]["conditions"][-1]["type"] for n, j in jobs(cluster, ns).items()}
    assert states == {"real-prepare": "Succeeded", "real-pretrain": "Succeeded"}
    assert took < 180
