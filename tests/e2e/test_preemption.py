"""Preemption keeps the work: a suspended stage leaves a complete checkpoint, and the resumed
attempt starts from it.

The pretrain stage's pod is played by a local process, as a kubelet would run it: the trainer
command the operator rendered (data_dir moved to a tiny local one), the pod's environment, and
on the pod's deletion SIGTERM to the whole process group, then SIGKILL once the pod's
`terminationGracePeriodSeconds` have passed. kwok runs the real pod for 10 minutes meanwhile.
On each backend: a suspended PyTorchJob keeps its pod names, a resumed TrainJob's JobSet makes new
pods.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import wait_for

from .childkinds import ChildKind
from .support import (
    Kube,
    OperatorProcess,
    job_name,
    llavarun,
    synth_data_dir,
    trainer_pod_argv,
    trainer_pod_env,
    wait_pods,
    wait_run,
)

pytestmark = pytest.mark.e2e

RUN = "preempted"
GRACE = 120


def tiny_pretrain(namespace: str, backend: str) -> dict[str, Any]:
    """examples/llavarun-tiny.yaml's pretrain on one CPU process, long enough to be interrupted
    (100 epochs); no periodic checkpoint (saveSteps beyond the run), so only the SIGTERM save exists."""
    return llavarun(
        RUN, namespace, ["pretrain"], run_duration="10m", retries=0, backend=backend,
        accelerator={"profile": "cpu"},
        placement={"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        pretrain={"globalBatchSize": 4, "microBatchSize": 4, "epochs": 100, "maxLength": 256,
                  "precision": "fp32", "gradientCheckpointing": False, "dataloaderWorkers": 0,
                  "saveSteps": 100000, "loggingSteps": 1,
                  "resources": {"nodes": 1, "gpusPerNode": 1, "cpu": "2", "memory": "4Gi", "shmSize": "256Mi",
                                "terminationGracePeriodSeconds": GRACE}},
    )  # fmt: skip


class PlayedPod:
    """One pod's trainer as a local process group, stopped the way a kubelet stops a pod."""

    def __init__(self, pod: dict[str, Any], container: str, argv: list[str], log: Path) -> None:
        (spec,) = [c for c in pod["spec"]["containers"] if c["name"] == container]
        literal = {e["name"]: e["value"] for e in spec.get("env", []) if "value" in e}
        env = trainer_pod_env({**literal, "LLAVARUN_KUBECONFIG": ""})
        self.env, self.log = env, log
        self.grace = pod["spec"]["terminationGracePeriodSeconds"]
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"event": "{name}"' in line:
                found.append(json.loads(line))
        return found

    def terminate(self) -> int:
        """SIGTERM to every process of the pod, SIGKILL after the grace period: the exit code."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()
        finally:
            self._out.close()


def play(kube: Kube, backend: ChildKind, namespace: str, data_dir: Path, log: Path) -> PlayedPod:
    (pod,) = wait_pods(kube, namespace, backend.pods_of(job_name(RUN, "pretrain")), "Running", count=1)
    argv = trainer_pod_argv(kube.run(namespace, RUN), "pretrain", data_dir)  # type: ignore[arg-type]
    return PlayedPod(pod, backend.container, argv, log)


def wait_step(pod: PlayedPod, step: int, timeout: float = 240) -> None:
    def reached() -> bool:
        assert pod.proc.poll() is None, f"trainer exited early:\n{pod.log.read_text()[-3000:]}"
        return any(e.get("step", 0) >= step for e in pod.events("step"))

    wait_for(reached, timeout=timeout, interval=0.5, what=f"trainer step {step}")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh data_dir per scenario: no checkpoint of another one to resume from."""
    return synth_data_dir(tmp_path, samples=64)


def test_a_suspended_stage_saves_on_sigterm_and_the_resumed_pod_starts_from_that_checkpoint(
    kube: Kube,
    running_operator: OperatorProcess,
    cluster_namespace: str,
    data_dir: Path,
    tmp_path: Path,
    backend: ChildKind,
) -> None:
    ns, job = cluster_namespace, job_name(RUN, "pretrain")
    kube.create_run(tiny_pretrain(ns, backend.kind))
    first = play(kube, backend, ns, data_dir, tmp_path / "attempt-0.log")
    assert first.grace == GRACE  # the pod's, which the kubelet honours...
    assert first.env["LLAVARUN_GRACE_SECONDS"] == str(GRACE)  # ...and the trainer's: one value
    wait_step(first, 3)
    kube.patch_run(ns, RUN, {"spec": {"suspend": True}})
    # The job's controller deletes the suspended job's pods; the kubelet then stops the containers.
    wait_for(lambda: not kube.pods(ns, backend.pods_of(job)), timeout=60, interval=0.2, what="pods deleted")
    # torchrun re-raises the signal (exit 1) once its worker has saved and exited 143: in time,
    # not SIGKILLed at the end of the grace period.
    assert first.terminate() != -signal.SIGKILL, first.log.read_text()[-3000:]
    (stopped,) = first.events("terminated")
    assert stopped["checkpoint_saved"] is True, stopped
    saved_step = stopped["step"]
    checkpoint = data_dir / "Output" / "checkpoints_pretrain"
    complete = sorted(p.parent.name for p in checkpoint.rglob("COMPLETE"))
    assert complete == [f"checkpoint-{saved_step}"], complete
    wait_run(kube, ns, RUN, "suspended", phase="Suspended")

    kube.patch_run(ns, RUN, {"spec": {"suspend": False}})
    second = play(kube, backend, ns, data_dir, tmp_path / "attempt-0-resumed.log")
    try:
        wait_for(
            lambda: second.events("resume"), timeout=240, interval=0.5, what="the trainer's resume event"
        )
        (resumed,) = second.events("resume")
        assert resumed["step"] == saved_step and resumed["checkpoint"].endswith(f"checkpoint-{saved_step}")
        wait_step(second, saved_step + 1)
    finally:
        second.terminate()
    kube.delete_run(ns, RUN)
