"""The capacity plan and the ETA in a run's status on a real control plane: the operator records
`llavarun plan`'s numbers for the run as the apiserver stored it (status.plan), the ETA from the
plan once the stage runs and from the trainer's measured ETA once it reports, `kubectl get
llavaruns` shows the phase and the ETA; a stage that does not fit gets a Warning, a model the
recipe does not know gets the reason there is no plan, and neither holds the run up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from llava_operator.api import LlavaRun
from llava_operator.api.status import parse_time, timestamp
from llava_operator.capacity.inputs import plan_for_run

from tests.cluster import Cluster, wait_for

from .support import (
    GROUP,
    PLURAL,
    VERSION,
    Kube,
    OperatorProcess,
    job_name,
    llavarun,
    wait_events,
    wait_job,
    wait_run,
)

pytestmark = pytest.mark.e2e


def minute(when: datetime) -> str:
    """A time as status.eta writes it: to the nearest minute."""
    return timestamp((when + timedelta(seconds=30)).replace(second=0, microsecond=0))


def status_with(kube: Kube, ns: str, run: str, what: str, test: Any, timeout: float = 60) -> dict[str, Any]:
    return dict(
        wait_for(lambda: (st := kube.status(ns, run)) and test(st) and st, timeout=timeout, what=what)
    )


def test_the_plan_and_the_eta_in_status_and_in_kubectl_get(
    e2e_cluster: Cluster, kube: Kube, running_operator: OperatorProcess, cluster_namespace: str
) -> None:
    ns, run = cluster_namespace, "planned"
    kube.create_run(llavarun(run, ns, ["pretrain", "finetune"], run_duration="120s"))
    st = status_with(kube, ns, run, "status.plan", lambda s: "plan" in s)
    stored = LlavaRun.from_k8s({k: v for k, v in (kube.run(ns, run) or {}).items() if k != "status"})
    expected = plan_for_run(stored)
    plan = st["plan"]
    assert (plan["generation"], plan["model"], plan["device"]) == (
        1,
        "vicuna-13b-v1.5 + clip-vit-large-patch14-336",
        expected["device"]["model"],
    )
    assert plan["fits"] is True and sorted(plan["stages"]) == ["finetune", "pretrain"]
    for name, stage in plan["stages"].items():
        assert stage["seconds"] == round(expected["stages"][name]["hours"] * 3600) > 0
        assert stage["gpuHours"] == expected["stages"][name]["gpuHours"] and stage["fits"] is True
    later = plan["stages"]["finetune"]["seconds"]

    st = wait_run(kube, ns, run, "running", phase="Running")
    started = parse_time(wait_job(kube, ns, job_name(run, "pretrain"))["status"]["startTime"])
    assert started is not None
    planned = minute(started + timedelta(seconds=plan["stages"]["pretrain"]["seconds"] + later))
    st = status_with(kube, ns, run, "the planned ETA", lambda s: s.get("eta") == planned)

    # The trainer reports (as its rank 0 does, on the status subresource): the ETA follows its measure.
    reported = datetime.now(UTC).replace(microsecond=0)
    progress = {"stage": "pretrain", "attempt": 0, "step": 5, "totalSteps": 100, "percent": 5}
    progress |= {"etaSeconds": 1800, "lastUpdate": timestamp(reported)}
    kube.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, PLURAL, run, {"status": {"progress": progress}}
    )
    measured = minute(reported + timedelta(seconds=1800 + later))
    status_with(kube, ns, run, "the measured ETA", lambda s: s.get("eta") == measured)

    table = e2e_cluster.kubectl("get", "llavaruns", "-n", ns).stdout
    wide = e2e_cluster.kubectl("get", "llavaruns", "-n", ns, "-o", "wide").stdout
    print(f"\n$ kubectl get llavaruns\n{table}\n$ kubectl get llavaruns -o wide\n{wide}")
    header, row = (line.split() for line in table.splitlines()[:2])
    assert header == ["NAME", "STAGE", "PHASE", "PROGRESS", "ETA", "REASON", "AGE"]
    assert row[:5] == [run, "pretrain", "Running", "5", measured]


def test_a_stage_that_does_not_fit_warns_and_an_unknown_model_says_why_neither_holds_the_run(
    kube: Kube, running_operator: OperatorProcess, cluster_namespace: str
) -> None:
    ns, stages = cluster_namespace, ["prepare", "pretrain", "finetune"]
    kube.create_run(llavarun("toobig", ns, stages, finetune={"gradientCheckpointing": False}))
    kube.create_run(llavarun("unknown", ns, ["prepare"], paths={"languageModel": "models/tiny-llm"}))

    st = wait_run(kube, ns, "unknown", "succeeded", phase="Succeeded")
    assert st["plan"] == {
        "generation": 1,
        "unavailable": "as `llavarun plan FILE` says: no built-in sizes for models/tiny-llm (known: "
        "vicuna-7b-v1.5, vicuna-13b-v1.5): give --data-dir to read its config.json",
    }

    st = wait_run(kube, ns, "toobig", "succeeded", timeout=120, phase="Succeeded")
    finetune = st["plan"]["stages"]["finetune"]
    assert st["plan"]["fits"] is False and finetune["fits"] is False
    assert finetune["fix"].startswith("spec.finetune.gradientCheckpointing: true")
    wait_events(kube, ns, "toobig", "RunSucceeded")
    (warning,) = kube.event_messages(ns, "toobig", "StageDoesNotFit")
    assert warning.startswith(f"stage finetune does not fit: {finetune['memoryGib']:.1f} GiB per device")
    assert warning.endswith(f"it fits with {finetune['fix']}")
