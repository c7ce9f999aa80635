"""Edits through the real scheduler and each backend's controllers: a stage whose pod cannot
schedule picks up the toleration the user adds, because an attempt that never started is replaced."""

from __future__ import annotations

from typing import Any

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


def unschedulable(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def test_a_pending_prepare_picks_up_the_toleration_added_to_the_placement(
    e2e_cluster: Cluster,
    kube: Kube,
    running_operator: OperatorProcess,
    cluster_namespace: str,
    backend: ChildKind,
) -> None:
    """The GPU pool carries a taint the run does not tolerate: prepare's pod sits unschedulable and
    the run `Pending`. The user adds the toleration to spec.placement; the job that never ran is
    replaced by `<run>-prepare-r1` with it (the old one deleted, event AttemptReplaced), which
    schedules, and the run completes."""
    ns, run = cluster_namespace, "untolerated"
    pool = f"team-{ns}"[:63]
    (node,) = e2e_cluster.add_gpu_nodes(
        1, taint_key=TEAM_TAINT, prefix="team-node", labels={POOL_LABEL: pool}
    )
    first, second = job_name(run, "prepare"), job_name(run, "prepare", 1)
    try:
        kube.create_run(
            llavarun(
                run,
                ns,
                ["prepare", "pretrain"],
                placement={"nodeSelector": {POOL_LABEL: pool}},
                retries=0,
                backend=backend.kind,
            )
        )
        wait_for(
            lambda: any(unschedulable(p) for p in kube.pods(ns, backend.pods_of(first))),
            timeout=60,
            interval=0.2,
            what=f"{first}'s pod to be unschedulable",
        )
        st = wait_run(kube, ns, run, "pending", phase="Pending")
        assert st["stages"]["prepare"]["phase"] == "Pending"

        toleration = {"key": TEAM_TAINT, "operator": "Exists", "effect": "NoSchedule"}
        kube.patch_run(ns, run, {"spec": {"placement": {"tolerations": [toleration]}}})
        st = wait_run(kube, ns, run, "succeeded after the edit", timeout=120, phase="Succeeded")
        pods = kube.pods(ns, backend.pods_of(second))
    finally:
        e2e_cluster.kubectl("delete", "node", node, "--wait=false", check=False)

    jobs = backend.jobs(kube, ns, run)
    assert sorted(jobs) == sorted([second, job_name(run, "pretrain")]), "the pending job was deleted"
    assert backend.verdict(jobs[second]) == "Succeeded"
    assert {p["spec"].get("nodeName") for p in pods} == {node}
    assert all(toleration in p["spec"]["tolerations"] for p in pods)
    record = st["stages"]["prepare"]
    assert (record["phase"], record["job"], record["attempts"]) == ("Succeeded", second, 2)
    assert condition(st, "Succeeded")["status"] == "True"
    reasons = wait_events(kube, ns, run, "RunSucceeded")
    assert reasons.count("AttemptReplaced") == 1 and "StageRetrying" not in reasons
    (replaced,) = kube.event_messages(ns, run, "AttemptReplaced")
    assert f"job {first} had not started" in replaced and f"replaced by job {second}" in replaced
