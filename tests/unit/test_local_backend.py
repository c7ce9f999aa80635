"""The local backend: a stage attempt as a LocalJob document (what runs, where it logs) and its
supervisor's status read as the plan's JobState; the trainer's reports folded into the status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from llava_operator.api import LlavaRun, Stage
from llava_operator.backend import SPEC_HASH_ANNOTATION, SUSPEND_ANNOTATION
from llava_operator.backends.local import LocalJobBackend
from llava_operator.jobstate import JobPhase
from llava_operator.local.runner import fold

DATA = Path("/data/dir")


PRETRAIN = {"globalBatchSize": 64, "resources": {"nodes": 1, "gpusPerNode": 2}}


def llavarun(**spec: Any) -> LlavaRun:
    return LlavaRun.from_k8s(
        {
            "apiVersion": "llavarun.io/v1alpha1",
            "kind": "LlavaRun",
            "metadata": {"name": "r", "generation": 1},
            "spec": {
                "image": "img",
                "accelerator": {"profile": "cpu"},
                "storage": {"data": {"source": {"emptyDir": {}}}},
                "pretrain": PRETRAIN,
                **spec,
            },
        }
    )


def test_an_attempt_is_the_stage_command_under_torchrun_with_its_own_log_and_report_file() -> None:
    job = LocalJobBackend(DATA).render(llavarun(), Stage.PRETRAIN, 1)
    assert job["metadata"]["name"] == "r-pretrain-r1"
    assert job["metadata"]["labels"]["llavarun.io/attempt"] == "1"
    command = job["spec"]["command"]
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert command[command.index("--data-dir") + 1] == str(DATA)
    env = job["spec"]["env"]
    assert (env["LLAVARUN_JOB"], env["LLAVARUN_ATTEMPT"]) == ("r-pretrain-r1", "1")
    assert env["LLAVARUN_STATUS_FILE"] == str(
        DATA / "Output" / "local" / "jobs" / "r-pretrain-r1.status.json"
    )
    assert job["spec"]["log"] == str(DATA / "Output" / "logs" / "r-pretrain-r1.log")
    assert job["metadata"]["annotations"][SUSPEND_ANNOTATION] == "false"


def test_the_spec_hash_follows_what_runs_not_the_suspension() -> None:
    def hashed(run: LlavaRun) -> str:
        return LocalJobBackend(DATA).render(run, Stage.PRETRAIN, 0)["metadata"]["annotations"][
            SPEC_HASH_ANNOTATION
        ]

    assert hashed(llavarun(suspend=True)) == hashed(llavarun())
    assert hashed(llavarun(pretrain={**PRETRAIN, "learningRate": 0.01})) != hashed(llavarun())


@pytest.mark.parametrize(
    ("status", "suspend", "phase", "started"),
    [
        ({}, False, JobPhase.CREATED, False),
        ({}, True, JobPhase.SUSPENDED, False),
        ({"phase": "Running", "startTime": "t"}, False, JobPhase.RUNNING, True),
        ({"phase": "Running", "startTime": "t"}, True, JobPhase.SUSPENDED, True),
        ({"phase": "Stopped", "startTime": "t"}, True, JobPhase.SUSPENDED, True),
        ({"phase": "Stopped", "startTime": "t"}, False, JobPhase.CREATED, True),
        ({"phase": "Succeeded", "startTime": "t"}, True, JobPhase.SUCCEEDED, True),
        (
            {"phase": "Failed", "startTime": "t", "message": "exited 1: E; log: l"},
            False,
            JobPhase.FAILED,
            True,
        ),
    ],
    ids=["new", "created suspended", "running", "stopping", "stopped", "to restart", "succeeded", "failed"],
)
def test_the_supervisor_status_is_read_as_the_plan_state(
    status: dict, suspend: bool, phase: JobPhase, started: bool
) -> None:
    state = LocalJobBackend(DATA).state({"spec": {"suspend": suspend}, "status": status})
    assert (state.phase, state.started, state.suspended) == (phase, started, suspend)
    assert state.message == (status.get("message", "") if phase is JobPhase.FAILED else "")


def test_suspension_is_one_field_and_the_record_of_it() -> None:
    assert LocalJobBackend(DATA).suspend_patch(True) == {
        "metadata": {"annotations": {SUSPEND_ANNOTATION: "true"}},
        "spec": {"suspend": True},
    }


def test_a_trainer_report_replaces_progress_and_adds_its_stage_results() -> None:
    status = {
        "phase": "Running",
        "progress": {"stage": "prepare", "percent": 100},
        "results": {"prepare": {"missingImages": 0}},
    }
    report = {"progress": {"stage": "pretrain", "step": 3}, "results": {"pretrain": {"steps": 3}}}
    assert fold(status, report) == {
        "phase": "Running",
        "progress": {"stage": "pretrain", "step": 3},
        "results": {"prepare": {"missingImages": 0}, "pretrain": {"steps": 3}},
    }
