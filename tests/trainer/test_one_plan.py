"""One plan for every place a LlavaRun runs: the same story, told to the operator's plan with the
PyTorchJob backend (an in-memory apiserver and training-operator, tests/plan_world.py) and to
`llavarun local` with real trainer processes, leaves the same status document after every step,
field by field (times aside; what a failed attempt's detail says is each backend's own: a pod
and its log command, or an exit status and a log file) and the same events."""

from __future__ import annotations

import copy
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from llava_operator.api import LlavaRun
from llava_operator.api.status import merge_patch
from llava_operator.local.processes import processes_with_env
from llava_operator.local.runner import LocalRun, read_json

from tests.helpers import ROOT
from tests.plan_world import World, run_body

pytestmark = [pytest.mark.trainer, pytest.mark.slow]
NAME = "story"
PLAN_FIELDS = ("observedGeneration", "phase", "stage", "currentJob", "stages", "conditions")
"""The status the plan writes (progress and results are the trainer's)."""
TIMES = {"lastTransitionTime", "startTime", "completionTime"}
FAILURE_DETAIL = re.compile(r"(job [a-z0-9-]+ failed: ).*")


def tiny_spec(**changes: Any) -> dict[str, Any]:
    spec = yaml.safe_load((ROOT / "examples" / "llavarun-tiny.yaml").read_text())["spec"]
    return {**spec, **changes}


def comparable(status: dict[str, Any]) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in TIMES}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str):
            return FAILURE_DETAIL.sub(r"\1<detail>", value)
        return value

    return {key: clean(status.get(key)) for key in PLAN_FIELDS}


class OnACluster:
    """The story on a cluster: the operator's plan; the training-operator starts pods at once."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.world = World(run_body(NAME, **spec))

    def settle(self) -> None:
        w = self.world
        for _ in range(20):
            p = w.reconcile()
            fresh = [
                n for n, j in w.jobs.items() if not j.get("status") and not j["spec"]["runPolicy"]["suspend"]
            ]
            for name in fresh:
                w.running(name)
            if not (p.status or p.create or p.patch or p.delete or fresh):
                return
        raise AssertionError("does not settle")

    def current(self) -> str:
        return self.world.status["currentJob"]

    def start(self) -> None:
        self.settle()

    def succeed(self) -> None:
        self.world.finish(self.current())
        self.settle()

    def fail(self) -> None:
        self.world.finish(self.current(), "Failed")
        self.settle()

    def suspend(self) -> None:
        self.world.edit(suspend=True)
        self.settle()

    def resume(self) -> None:
        self.world.edit(suspend=False)
        self.settle()

    def edit(self, **spec: Any) -> None:
        self.world.edit(**spec)
        self.settle()

    @property
    def status(self) -> dict[str, Any]:
        return self.world.status

    @property
    def events(self) -> list[str]:
        return self.world.reasons()

    def trainer_args(self, job: str) -> list[str]:
        return self.world.jobs[job]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
            "containers"
        ][0]["args"]

    def close(self) -> None:
        return None


class OnThisMachine:
    """The story with `llavarun local`: real trainer processes on the synthetic data_dir. A
    failure is the OOM killer's (SIGKILL to every process of the attempt); stopping and resuming
    are a stop signal and a rerun."""

    def __init__(self, spec: dict[str, Any], data_dir: Path) -> None:
        self.data_dir = data_dir
        self.body = {
            "apiVersion": "llavarun.io/v1alpha1",
            "kind": "LlavaRun",
            "metadata": {"name": NAME},
            "spec": spec,
        }
        self.reasons: list[str] = []
        self.local = self.invocation()

    def invocation(self) -> LocalRun:
        """What one `llavarun local` does before its loop: store the file's spec, adopt the jobs."""
        run = LlavaRun.from_k8s(copy.deepcopy(self.body))
        local = LocalRun(run, self.data_dir, on_event=lambda reason, message: self.reasons.append(reason))
        local.apply_spec(run.spec.to_k8s())
        local.jobs.adopt()
        return local

    def settle(self) -> None:
        for _ in range(20):
            p = self.local.reconcile()
            if not (p.status or p.create or p.patch or p.delete):
                return
        raise AssertionError("does not settle")

    def current(self) -> str:
        return self.status["currentJob"]

    def wait_until_ended(self, job: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while job in self.local.jobs.running:
            assert time.monotonic() < deadline, f"{job} still runs"
            self.local.jobs.poll(0.5)

    def start(self) -> None:
        self.settle()

    def succeed(self) -> None:
        job = self.current()
        self.wait_until_ended(job)
        assert self.local.jobs.get(job)["status"]["exitCode"] == 0, (
            self.data_dir / "Output" / "logs" / f"{job}.log"
        ).read_text()[-3000:]
        self.settle()

    def fail(self) -> None:
        job = self.current()
        report = str(self.local.paths.trainer_status(job))  # in the environment of its processes only
        victims = processes_with_env("LLAVARUN_STATUS_FILE", report)
        assert victims, f"no process of {job} runs"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        self.wait_until_ended(job)
        self.settle()

    def suspend(self) -> None:
        self.local.stop()  # what the first stop signal does
        self.settle()
        self.wait_until_ended(self.current())
        self.settle()

    def resume(self) -> None:
        self.local = self.invocation()  # the same command again
        self.settle()

    def edit(self, **spec: Any) -> None:
        stored = read_json(self.local.paths.run_file)["spec"]
        self.local.apply_spec(merge_patch(stored, spec))
        self.settle()

    @property
    def status(self) -> dict[str, Any]:
        return self.local.status()

    @property
    def events(self) -> list[str]:
        return self.reasons

    def trainer_args(self, job: str) -> list[str]:
        return self.local.jobs.get(job)["spec"]["command"]

    def close(self) -> None:
        self.local.jobs.signal_all(signal.SIGKILL)
        while self.local.jobs.running:
            self.local.jobs.poll(0.5)


Step = str | tuple[str, dict[str, Any]]
SCENARIOS: dict[str, tuple[dict[str, Any], list[Step], Callable[[dict[str, Any]], None]]] = {}


def scenario(name: str, spec: dict[str, Any], steps: list[Step]):
    def register(check: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        SCENARIOS[name] = (spec, steps, check)
        return check

    return register


def condition(status: dict[str, Any], ctype: str) -> tuple[str, str]:
    c = next(c for c in status["conditions"] if c["type"] == ctype)
    return c["status"], c["reason"]


@scenario(
    "stages succeed in order", tiny_spec(stages=["prepare", "pretrain"]), ["start", "succeed", "succeed"]
)
def _in_order(status: dict[str, Any]) -> None:
    assert status["phase"] == "Succeeded"
    assert [(s, r["phase"], r["attempts"]) for s, r in status["stages"].items()] == [
        ("prepare", "Succeeded", 1),
        ("pretrain", "Succeeded", 1),
    ]
    assert condition(status, "Succeeded") == ("True", "AllStagesSucceeded")


@scenario(
    "a failed attempt, then success", tiny_spec(stages=["prepare"], retries=1), ["start", "fail", "succeed"]
)
def _retried(status: dict[str, Any]) -> None:
    assert status["phase"] == "Succeeded"
    assert (status["stages"]["prepare"]["attempts"], status["currentJob"]) == (2, f"{NAME}-prepare-r1")


@scenario("retries exhausted", tiny_spec(stages=["prepare"], retries=1), ["start", "fail", "fail"])
def _exhausted(status: dict[str, Any]) -> None:
    assert status["phase"] == "Failed"
    assert condition(status, "Failed") == ("True", "BackoffLimitExceeded")
    assert status["stages"]["prepare"]["message"] == f"job {NAME}-prepare-r1 failed: <detail>"


@scenario("no retries", tiny_spec(stages=["prepare"], retries=0), ["start", "fail"])
def _no_retries(status: dict[str, Any]) -> None:
    assert condition(status, "Failed") == ("True", "StageFailed")


@scenario(
    "suspended (interrupted) and resumed",
    tiny_spec(stages=["prepare"]),
    ["start", "suspend", "resume", "succeed"],
)
def _resumed(status: dict[str, Any]) -> None:
    assert status["phase"] == "Succeeded"
    assert condition(status, "Suspended") == ("False", "Resumed")
    assert (status["observedGeneration"], status["stages"]["prepare"]["attempts"]) == (3, 1)


@scenario(
    "a stage edited before it starts",
    tiny_spec(stages=["prepare", "pretrain"]),
    ["start", ("edit", {"pretrain": {"learningRate": 0.0007}}), "succeed"],
)
def _edited(status: dict[str, Any]) -> None:
    assert (status["phase"], status["stage"], status["observedGeneration"]) == ("Running", "pretrain", 2)


@pytest.fixture
def stories(data_dir_copy: Path) -> Iterator[Callable[[dict[str, Any]], tuple[OnACluster, OnThisMachine]]]:
    made: list[OnThisMachine] = []

    def make(spec: dict[str, Any]) -> tuple[OnACluster, OnThisMachine]:
        local = OnThisMachine(spec, data_dir_copy)
        made.append(local)
        return OnACluster(spec), local

    yield make
    for local in made:
        local.close()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_story_leaves_the_same_status_on_a_cluster_and_on_this_machine(
    name: str, stories: Callable[[dict[str, Any]], tuple[OnACluster, OnThisMachine]]
) -> None:
    spec, steps, check = SCENARIOS[name]
    cluster, local = stories(spec)
    for step in steps:
        action, args = (step, {}) if isinstance(step, str) else step
        for place in (cluster, local):
            getattr(place, action)(**args)
        assert comparable(local.status) == comparable(cluster.status), f"after {action}"
        assert local.events == cluster.events, f"after {action}"
    check(comparable(cluster.status))
    if name == "a stage edited before it starts":
        for place in (cluster, local):
            args = place.trainer_args(f"{NAME}-pretrain")
            assert args[args.index("--learning-rate") + 1] == "0.0007"
