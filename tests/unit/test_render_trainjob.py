"""The TrainJob backend: rendered TrainJobs validate strictly against the vendored Trainer v2.3
CRD and carry the same stage contract as the PyTorchJob; TrainJob conditions map to stage phases;
what a TrainJob cannot honour is refused with the reason."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from llava_operator.api import LlavaRun, Stage
from llava_operator.api.spec import trainjob_refusals
from llava_operator.backend import SPEC_HASH_ANNOTATION, SUSPEND_ANNOTATION
from llava_operator.backends.choice import backend_record, chosen_kind
from llava_operator.backends.local import LocalJobBackend
from llava_operator.backends.pytorchjob import PYTORCHJOB
from llava_operator.backends.trainjob import (
    MAIN_CONTAINER,
    PATCH_MANAGER,
    TRAINJOB,
    TrainJobBackend,
    trainjob_state,
)
from llava_operator.jobstate import JobPhase
from llava_operator.kinds import DEFAULT_TRAINING_RUNTIME
from llava_operator.plan import plan
from llava_operator.render import render_stage_job
from pydantic import ValidationError

from tests.helpers import EXAMPLES, SHARED, load_yaml
from tests.plan_world import T0, run_body
from tests.unit.test_render import K8S_VERSION, unknown_fields

LOCAL = LocalJobBackend(Path("/data"))
TRAINJOB_CRD = SHARED / "crds" / "trainer.kubeflow.org_trainjobs.yaml"


@cache
def trainjob_schema() -> dict[str, Any]:
    return load_yaml(TRAINJOB_CRD)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def assert_valid_trainjob(job: dict[str, Any]) -> None:
    schema = trainjob_schema()
    jsonschema.validators.validator_for(schema)(schema).validate(job)
    assert unknown_fields(job, schema) == []
    pod = pod_patch(job)
    container = {**pod["spec"]["containers"][0], "image": job["spec"]["trainer"]["image"]}
    whole = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", **pod["metadata"]},
        "spec": {**pod["spec"], "containers": [container]},
    }
    kubernetes_validate.validate(whole, K8S_VERSION, strict=True)


def pod_patch(job: dict[str, Any]) -> dict[str, Any]:
    [patch] = job["spec"]["runtimePatches"]
    assert patch["manager"] == PATCH_MANAGER
    [rjob] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    return dict(rjob["template"]["spec"]["template"])


def run_doc(**spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(load_yaml(EXAMPLES[0]))
    doc["spec"].update(spec)
    return doc


def run_of(**spec: Any) -> LlavaRun:
    return LlavaRun.model_validate(run_doc(**spec))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_renders_valid_trainjobs_or_is_refused_with_the_reason(path) -> None:
    doc = load_yaml(path)
    doc["spec"].pop("backend", None)
    doc["spec"].pop("trainingRuntime", None)
    run = LlavaRun.model_validate(doc)
    for stage in run.spec.stages:
        if trainjob_refusals(run.spec):  # e.g. the multinode example's priorityClassName
            with pytest.raises(ValueError, match="is not supported with backend TrainJob"):
                TRAINJOB.render(run, stage, 0)
        else:
            assert_valid_trainjob(TRAINJOB.render(run, stage, 0))


def test_the_stage_contract_is_the_pytorchjobs() -> None:
    run = run_of(placement={"queueName": "gpu", "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}]})
    for stage in run.spec.stages:
        tj = TRAINJOB.render(run, stage, 1)
        pj = render_stage_job(run, stage, 1)
        master = pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
        [container] = master["spec"]["containers"]
        trainer = tj["spec"]["trainer"]
        assert tj["metadata"]["name"] == pj["metadata"]["name"]
        assert tj["metadata"]["labels"] == pj["metadata"]["labels"]
        assert tj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
        assert (trainer["image"], trainer["command"], trainer["args"], trainer["env"]) == (
            container["image"],
            container["command"],
            container["args"],
            container["env"],
        )
        assert trainer["resourcesPerNode"] == container["resources"]
        assert str(trainer["numProcPerNode"]) == pj["spec"]["nprocPerNode"]
        workers = pj["spec"]["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 0)
        assert trainer["numNodes"] == 1 + workers
        pod = pod_patch(tj)
        assert pod["metadata"] == {k: master["metadata"][k] for k in ("labels", "annotations")}
        for key in (
            "serviceAccountName",
            "terminationGracePeriodSeconds",
            "nodeSelector",
            "tolerations",
            "imagePullSecrets",
            "securityContext",
            "volumes",
        ):
            assert pod["spec"][key] == master["spec"][key], key
        [patched] = pod["spec"]["containers"]
        assert patched["name"] == MAIN_CONTAINER
        assert patched["volumeMounts"] == container["volumeMounts"]
        assert patched["securityContext"] == container["securityContext"]


def test_runtime_reference_suspend_and_deadline() -> None:
    run = run_of(suspend=True)
    tj = TRAINJOB.render(run, Stage.PRETRAIN, 0)
    assert tj["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": DEFAULT_TRAINING_RUNTIME,
    }
    assert tj["spec"]["suspend"] is True
    assert tj["metadata"]["annotations"][SUSPEND_ANNOTATION] == "true"
    assert "activeDeadlineSeconds" not in tj["spec"]
    doc = run_doc(trainingRuntime="team-torch")
    doc["spec"]["pretrain"] = {**doc["spec"].get("pretrain", {}), "resources": {"activeDeadlineSeconds": 600}}
    tj = TrainJobBackend("ops-torch").render(LlavaRun.model_validate(doc), Stage.PRETRAIN, 0)
    assert tj["spec"]["runtimeRef"]["name"] == "team-torch"
    assert tj["spec"]["activeDeadlineSeconds"] == 600
    assert_valid_trainjob(tj)
    assert TrainJobBackend("ops-torch").render(run_of(), Stage.PRETRAIN, 0)["spec"]["runtimeRef"]["name"] == (
        "ops-torch"
    )


def test_suspension_is_not_part_of_the_spec_digest() -> None:
    a = TRAINJOB.render(run_of(suspend=False), Stage.PRETRAIN, 0)
    b = TRAINJOB.render(run_of(suspend=True), Stage.PRETRAIN, 0)
    c = TRAINJOB.render(run_of(placement={"nodeSelector": {"pool": "b"}}), Stage.PRETRAIN, 0)
    hashes = [j["metadata"]["annotations"][SPEC_HASH_ANNOTATION] for j in (a, b, c)]
    assert hashes[0] == hashes[1] != hashes[2]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"placement": {"priorityClassName": "high"}}, "placement.priorityClassName"),
        ({"placement": {"schedulerName": "volcano"}}, "placement.schedulerName"),
        ({"imagePullPolicy": "Always"}, "imagePullPolicy"),
    ],
)
def test_what_a_trainjob_cannot_honour_is_refused_with_the_reason(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=f"{field} is not supported with backend TrainJob"):
        run_of(backend="TrainJob", **spec)
    run = run_of(**spec)  # the operator's default backend: the render refuses, the PyTorchJob runs it
    with pytest.raises(ValueError, match="not supported with backend TrainJob"):
        TRAINJOB.render(run, Stage.PRETRAIN, 0)
    render_stage_job(run_of(backend="PyTorchJob", **spec), Stage.PRETRAIN)


@pytest.mark.parametrize(
    ("backend", "spec", "said"),
    [
        (
            TRAINJOB,
            {"placement": {"priorityClassName": "high"}},
            "placement.priorityClassName is not supported",
        ),
        (TRAINJOB, {"imagePullPolicy": "Never"}, "imagePullPolicy is not supported with backend TrainJob"),
        (PYTORCHJOB, {"trainingRuntime": "mine"}, "trainingRuntime is used only by backend TrainJob"),
    ],
)
def test_a_run_the_default_backend_cannot_run_fails_invalid_spec_and_creates_nothing(
    backend: Any, spec: dict[str, Any], said: str
) -> None:
    """No spec.backend, so the CRD cannot refuse it: the operator's default backend does, once."""
    body = run_body(stages=["pretrain"], **spec)
    result = plan(body, [], T0, backend=backend)
    assert (result.phase, result.create, result.patch, result.delete) == ("Failed", (), (), ())
    failed = next(c for c in result.status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "InvalidSpec")
    assert failed["message"] == f"spec is invalid: {said}" or failed["message"].startswith(
        f"spec is invalid: {said}"
    )
    assert [e.reason for e in result.events] == ["InvalidSpec"]
    body["status"] = result.status
    assert plan(body, [], T0, backend=backend).events == ()  # said once
    assert plan(run_body(stages=["pretrain"], **spec), [], T0, backend=LOCAL).phase == "Pending"


def tj(*conditions: tuple[str, str, str], suspend: bool = False, **jobs: int) -> dict[str, Any]:
    """A TrainJob with conditions (type, status, reason) and one jobsStatus entry."""
    conds = [
        {
            "type": t,
            "status": s,
            "reason": r,
            "message": f"{r} msg",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
        for t, s, r in conditions
    ]
    entry = {"name": "node", "active": 0, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0, **jobs}
    return {
        "metadata": {"name": "r-pretrain", "namespace": "ns", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"suspend": suspend},
        "status": {"conditions": conds, "jobsStatus": [entry]},
    }


@pytest.mark.parametrize(
    ("job", "phase", "started"),
    [
        (tj(), JobPhase.CREATED, False),
        (tj(active=1), JobPhase.CREATED, False),
        (tj(active=1, ready=1), JobPhase.RUNNING, True),
        (tj(("Complete", "True", "AllJobsCompleted"), succeeded=1), JobPhase.SUCCEEDED, True),
        (tj(("Failed", "True", "FailedJobs"), failed=1), JobPhase.FAILED, True),
        (tj(("Failed", "True", "DeadlineExceeded")), JobPhase.FAILED, False),
        (tj(("Suspended", "True", "Suspended"), suspend=True), JobPhase.SUSPENDED, False),
        (tj(("Suspended", "False", "Resumed"), active=1, ready=1), JobPhase.RUNNING, True),
        (tj(suspend=True, ready=1), JobPhase.SUSPENDED, True),
    ],
)
def test_conditions_map_to_stage_phases(job: dict[str, Any], phase: JobPhase, started: bool) -> None:
    state = trainjob_state(job)
    assert (state.phase, state.started) == (phase, started)
    assert state.suspended is job["spec"]["suspend"]
    if phase is JobPhase.FAILED:
        assert state.message.startswith("TrainJob ns/r-pretrain: ")
        assert state.completion_time == "2026-01-01T00:00:00Z"


def test_a_failed_attempt_names_the_failed_pod_and_its_exit_code() -> None:
    failed = {
        "metadata": {"name": "r-pretrain-node-0-1-abcde"},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"name": "node", "state": {"terminated": {"exitCode": 3, "reason": "Error"}}}
            ],
        },
    }
    state = trainjob_state(tj(("Failed", "True", "FailedJobs"), failed=1))
    look = TRAINJOB.where_to_look("r-pretrain", state, "ns", [failed])
    assert (
        look
        == "pod r-pretrain-node-0-1-abcde: exit code 3, Error (kubectl logs -n ns r-pretrain-node-0-1-abcde -c node)"
    )
    assert TRAINJOB.where_to_look("r-pretrain", state, "ns", []) == ""
    assert TRAINJOB.pod_selector("r-pretrain") == "jobset.sigs.k8s.io/jobset-name=r-pretrain"


def test_suspend_patch_is_a_valid_trainjob_patch() -> None:
    patch = TRAINJOB.suspend_patch(True)
    assert patch == {"metadata": {"annotations": {SUSPEND_ANNOTATION: "true"}}, "spec": {"suspend": True}}
    assert unknown_fields(patch, trainjob_schema()) == []


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"spec": {}}, "PyTorchJob"),
        ({"spec": {"backend": "TrainJob"}}, "TrainJob"),
        ({"spec": {"backend": "PyTorchJob"}, "status": {"backend": "TrainJob"}}, "TrainJob"),
        ({"spec": {"backend": "TrainJob"}, "status": {"currentJob": "r-prepare"}}, "PyTorchJob"),
    ],
)
def test_the_recorded_backend_wins_so_a_run_never_switches(body: dict[str, Any], kind: str) -> None:
    assert chosen_kind(body, "PyTorchJob") == kind
    assert backend_record({**body, "status": {"backend": kind}}, kind) == {}
    assert chosen_kind({"spec": {}}, "TrainJob") == "TrainJob"
