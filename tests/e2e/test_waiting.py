"""Why a stage waits, through the real scheduler: a run placed on a GPU pool whose taint it does not
tolerate says so in its status (the stage's reason and message quoting the scheduler, the
Succeeded condition, status.reason = the REASON column) and in one Warning event; the wait clears
once a toleration lets the pod run. On each backend: the pods are found through its selector."""

from __future__ import annotations

import time

import pytest

from tests.cluster import Cluster, wait_for

from .childkinds import ChildKind
from .support import (
    POOL_LABEL,
    TEAM_TAINT,
    Kube,
    OperatorProcess,
    condition,
    job_name,
    llavarun,
    wait_events,
    wait_run,
)

pytestmark = pytest.mark.e2e


def test_an_unschedulable_stage_says_why_in_status_event_and_column(
    e2e_cluster: Cluster,
    kube: Kube,
    running_operator: OperatorProcess,
    cluster_namespace: str,
    backend: ChildKind,
) -> None:
    ns, run = cluster_namespace, "waits"
    pool = f"waiting-{ns}"[:63]
    nodes = e2e_cluster.add_gpu_nodes(
        2, taint_key=TEAM_TAINT, prefix="waiting-node", labels={POOL_LABEL: pool}
    )
    try:
        placement = {"nodeSelector": {POOL_LABEL: pool}}
        kube.create_run(llavarun(run, ns, ["prepare"], placement=placement, retries=0, backend=backend.kind))

        def said() -> dict | None:
            st = kube.status(ns, run)
            return st if st.get("reason") == "Unschedulable" else None

        st = wait_for(said, timeout=60, interval=0.2, what=f"{run}'s status to say Unschedulable")
        record = st["stages"]["prepare"]
        assert (st["phase"], record["phase"], record["reason"]) == ("Pending", "Pending", "Unschedulable")
        # The scheduler's own words, as `kubectl describe pod` shows them.
        (first,) = kube.pods(ns, backend.pods_of(job_name(run, "prepare")))
        pod = first["metadata"]["name"]
        scheduled = next(c for c in first["status"]["conditions"] if c["type"] == "PodScheduled")
        assert "untolerated taint" in scheduled["message"]
        assert record["message"] == f"pod {pod} cannot be scheduled: {scheduled['message']}"
        succeeded = condition(st, "Succeeded")
        assert (succeeded["status"], succeeded["reason"]) == ("Unknown", "Unschedulable")
        assert succeeded["message"] == f"stage prepare waits: {record['message']}"

        table = e2e_cluster.kubectl("get", "llavaruns", "-n", ns).stdout
        print(f"\n$ kubectl get llavaruns\n{table}")
        header, row = table.splitlines()[0].split(), table.splitlines()[1].split()
        assert header[:6] == ["NAME", "STAGE", "PHASE", "PROGRESS", "ETA", "REASON"]
        assert row[:4] == [run, "prepare", "Pending", "Unschedulable"]  # no PROGRESS, no ETA yet

        wait_events(kube, ns, run, "StageWaiting")
        time.sleep(3 * running_operator.resync_seconds)  # resyncs see the same cause: no new event
        assert kube.events(ns, run).count("StageWaiting") == 1
        (warning,) = kube.event_messages(ns, run, "StageWaiting")
        assert warning.startswith(f"stage prepare waits (Unschedulable): pod {pod} cannot be scheduled")

        toleration = {"key": TEAM_TAINT, "operator": "Exists", "effect": "NoSchedule"}
        kube.patch_run(ns, run, {"spec": {"placement": {"tolerations": [toleration]}}})
        st = wait_run(kube, ns, run, "succeeded after the toleration", timeout=120, phase="Succeeded")
    finally:
        for node in nodes:
            e2e_cluster.kubectl("delete", "node", node, "--wait=false", check=False)
    assert "reason" not in st and "reason" not in st["stages"]["prepare"]
    assert condition(st, "Succeeded")["reason"] == "AllStagesSucceeded"
