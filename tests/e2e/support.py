"""Shared helpers of the control-plane and end-to-end tiers (and of bench/scale.py).

The chart is installed with helm (`replicas=0`: CRD + RBAC, no Deployment) and the operator runs
as a local `llavarun operator` process authenticated with a TokenRequest token of the chart's
ServiceAccount, so every call it makes is authorised exactly as in a cluster. PyTorchJobs go
through the real training-operator to real pods that kwok runs on fake GPU nodes; a pod's fate is
steered by kwok annotations (run time) and labels (outcome=fail|hang) — see tests/cluster/README.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes import client, watch
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from tests.cluster import (
    FULL,
    OUTCOME_LABEL,
    RUN_DURATION_ANNOTATION,
    TRAINER_STACK,
    Cluster,
    wait_for,
)
from tests.cluster.processes import Process, free_port

if TYPE_CHECKING:
    import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "llavarun-operator"
RELEASE = OPERATOR_NAMESPACE = OPERATOR_SERVICE_ACCOUNT = "llavarun-operator"
CRD = "llavaruns.llavarun.io"
GROUP, VERSION, PLURAL = "llavarun.io", "v1alpha1", "llavaruns"
KUBEFLOW = ("kubeflow.org", "v1", "pytorchjobs")
LABEL_RUN, LABEL_STAGE, LABEL_ATTEMPT = "llavarun.io/run", "llavarun.io/stage", "llavarun.io/attempt"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"  # "master" / "worker", set by the training-operator
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
POLL = 0.2
TEAM_TAINT = "dedicated.example.com/team"
"""A taint of extra kwok GPU pools that a scenario's run does not tolerate (until it does)."""
POOL_LABEL = "e2e.llavarun.io/pool"
ALL_STAGES = ("prepare", "pretrain", "finetune", "evaluate")


# --- the control plane and the chart ---------------------------------------------------------------


def prepare_cluster(cluster: Cluster, trainer: bool = False) -> Cluster:
    """Everything up (GC, scheduler, kwok GPU nodes, training-operator; with `trainer`, JobSet and
    Kubeflow Trainer v2 too) and running.

    A control-plane test module pauses the training-operator while it plays it by hand; bring it
    back (and any other component) if it is still stopped.
    """
    components = tuple(dict.fromkeys((*FULL, *(TRAINER_STACK if trainer else ()))))
    cluster.ensure(*components)
    for component in components:
        if not cluster.procs[component].alive():
            cluster.restart(component)
    return cluster


def install_chart(cluster: Cluster, trainjob: bool = False) -> subprocess.CompletedProcess[str]:
    """`helm upgrade --install` of our chart with replicas=0 (CRD + RBAC only); idempotent.
    With `trainjob`, the TrainJob backend too (its ClusterTrainingRuntime and RBAC; needs the
    Trainer v2 CRDs).

    Returns helm's answer (its output shows the chart's NOTES)."""
    if cluster.kubectl("get", "crd", CRD, check=False).returncode == 0:
        # A CRD applied by an earlier test (or release) is handed over to this release.
        cluster.kubectl("label", "crd", CRD, "app.kubernetes.io/managed-by=Helm", "--overwrite")
        cluster.kubectl(
            "annotate", "crd", CRD, f"meta.helm.sh/release-name={RELEASE}",
            f"meta.helm.sh/release-namespace={OPERATOR_NAMESPACE}", "--overwrite",
        )  # fmt: skip
    installed = cluster.helm(
        "upgrade", "--install", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
        "--set", "replicas=0", "--set", f"backends.trainJob.enabled={str(trainjob).lower()}",
        "--wait", "--timeout", "120s",
    )  # fmt: skip
    cluster.wait_crd_established(CRD)
    wait_for(
        lambda: cluster.kubectl("get", "llavaruns", "-A", check=False).returncode == 0,
        timeout=30,
        interval=POLL,
        what="the llavaruns API being served",
    )
    return installed


def operator_kubeconfig(cluster: Cluster, expiration_seconds: int = 3600) -> Path:
    """A kubeconfig with a TokenRequest token of the chart's ServiceAccount (the operator's identity)."""
    token = cluster.create_token(
        OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, expiration_seconds=expiration_seconds
    )
    return cluster.kubeconfig_for_token(token)


# --- the operator as a local process ---------------------------------------------------------------


class OperatorProcess:
    """`llavarun operator` as a supervised child process (own process group, dies with us).

    Its log is JSON lines; liveness and metrics listen on free loopback ports.
    """

    def __init__(
        self,
        kubeconfig: Path,
        log: Path,
        resync_seconds: float = 2.0,
        backends: str = "PyTorchJob",
        backend: str = "PyTorchJob",
    ) -> None:
        self.resync_seconds = resync_seconds
        self.liveness_port = free_port()
        self.metrics_port = free_port()
        argv = [
            str(Path(sys.executable).parent / "llavarun"), "operator", "--all-namespaces",
            f"--liveness-port={self.liveness_port}", f"--metrics-port={self.metrics_port}",
            "--bind-address=127.0.0.1", f"--resync-seconds={resync_seconds}", "--log-format=json",
            f"--backend={backend}", f"--backends={backends}",
        ]  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
        env.pop("LLAVARUN_KUBECONFIG", None)
        self.process = Process("llavarun-operator", argv, log, env=env, stop_timeout=20)

    @property
    def log(self) -> Path:
        return self.process.log

    @property
    def pid(self) -> int:
        assert self.process.pid is not None, "operator not running"
        return self.process.pid

    def start(self, timeout: float = 60) -> None:
        self.process.start()
        self.process.wait_until(self.healthy, timeout, "operator /healthz")

    def healthy(self) -> bool:
        return self.process.alive() and self._get(self.liveness_port, "/healthz") is not None

    def stop(self) -> None:
        """SIGTERM (kopf's graceful shutdown), SIGKILL after the timeout."""
        self.process.stop()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as when a node dies or the OOM killer strikes."""
        if self.process.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.process.stop(timeout=5)

    def metrics(self) -> str:
        return self._get(self.metrics_port, "/metrics") or ""

    def metric_sum(self, name: str) -> float:
        """Sum of every sample of a Prometheus metric (all label sets)."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def cpu_seconds(self) -> float:
        """User + system CPU time of the operator process so far (/proc/<pid>/stat)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_bytes(self) -> int:
        """High-water mark of the resident set (VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/<pid>/status")

    def log_mark(self) -> int:
        """The log's current length in lines, for `errors(since=...)`."""
        return len(self.log.read_text(errors="replace").splitlines()) if self.log.exists() else 0

    def errors(self, since: int = 0) -> list[str]:
        """ERROR/CRITICAL log records after line `since`, minus handler failures kopf retries
        ("will retry", "will try again": e.g. while kube-apiserver restarts)."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines()[since:]:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            message = str(rec.get("message", ""))
            retried = "will retry" in message or "will try again" in message
            if rec.get("severity", "").lower() in ("error", "critical") and not retried:
                out.append(line)
        return out

    def tail(self, lines: int = 80) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    @staticmethod
    def _get(port: int, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
                return resp.read().decode()
        except OSError:
            return None


@contextmanager
def operator_running(
    cluster: Cluster,
    log: Path,
    session: pytest.Session,
    resync_seconds: float = 2.0,
    backends: str = "PyTorchJob",
    backend: str = "PyTorchJob",
) -> Iterator[OperatorProcess]:
    """The operator under the chart's ServiceAccount for a fixture's lifetime (serving `backends`,
    `backend` its default); its log tail is printed when tests failed meanwhile."""
    proc = OperatorProcess(operator_kubeconfig(cluster), log, resync_seconds, backends, backend)
    failed_before = session.testsfailed
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        if session.testsfailed > failed_before:
            print(f"\noperator log {proc.log}, last lines:\n{proc.tail(120)}")


# --- LlavaRuns ------------------------------------------------------------------------------------


def llavarun(
    name: str,
    namespace: str,
    stages: tuple[str, ...] | list[str] = ALL_STAGES,
    *,
    run_duration: str = "1s",
    nodes: Mapping[str, int] | None = None,
    retries: int = 2,
    pod_annotations: Mapping[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """An example-like LlavaRun (13B recipe, 8 GPUs per node) sized for the kwok GPU nodes.

    `nodes` gives a stage's node count (default 1); kwok ends each pod after `run_duration`.
    """
    nodes = dict(nodes or {})

    def resources(stage: str) -> dict[str, Any]:
        return {"nodes": nodes.get(stage, 1), "gpusPerNode": 8, "cpu": "16", "memory": "64Gi"}

    pretrain_gpus = nodes.get("pretrain", 1) * 8
    body: dict[str, Any] = {
        "stages": list(stages),
        "image": "ghcr.io/llavarun/llava-trainer:0.1.0",
        "retries": retries,
        "storage": {"data": {"source": {"emptyDir": {}}}},
        "placement": {
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "podAnnotations": {RUN_DURATION_ANNOTATION: run_duration, **(pod_annotations or {})},
        },
        "pretrain": {"globalBatchSize": 32 * pretrain_gpus, "resources": resources("pretrain")},
        "finetune": {
            "globalBatchSize": 16 * 8 * nodes.get("finetune", 1),
            "resources": resources("finetune"),
        },
        "evaluate": {"resources": resources("evaluate")},
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LlavaRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def tiny_pretrain(namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    """examples/llavarun-tiny.yaml's pretrain on one CPU process, 2 optimizer steps (on the data of
    `synth_data_dir`); its kwok pod "trains" for 10 minutes."""
    return llavarun(
        name, namespace, ["pretrain"], run_duration="10m",
        accelerator={"profile": "cpu"},
        # CPU pods may use the (tainted) GPU nodes: kwok has no others.
        placement={"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        paths={"languageModel": "LLaVA-Pretrain/checkpoints/vicuna-13b-v1.5",
               "visionTower": "LLaVA-Pretrain/checkpoints/clip-vit-large-patch14-336"},
        pretrain={"globalBatchSize": 4, "microBatchSize": 4, "maxSteps": 3, "maxLength": 256, "precision": "fp32",
                  "gradientCheckpointing": False, "dataloaderWorkers": 0, "saveSteps": 2,
                  "resources": {"nodes": 1, "gpusPerNode": 1, "cpu": "2", "memory": "4Gi", "shmSize": "256Mi"}},
        **spec,
    )  # fmt: skip


def synth_data_dir(parent: Path, samples: int = 8) -> Path:
    """A tiny data_dir in the real layout (`llava-trainer synth`) under `parent`."""
    out = parent / "data"
    subprocess.run(
        [str(Path(sys.executable).parent / "llava-trainer"), "synth", "--out", str(out), "--samples", str(samples)],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    return out


def trainer_pod_argv(run_body: Mapping[str, Any], stage: str, data_dir: Path) -> list[str]:
    """A stage's trainer as its pod runs it (the operator's flags, `data_dir` for the data_dir),
    under `torchrun --standalone` on this machine."""
    from llava_operator.api import LlavaRun, Stage
    from llava_operator.trainer_command import trainer_args

    run = LlavaRun.model_validate(dict(run_body))  # as the apiserver defaulted it
    args = trainer_args(run.spec, Stage(stage), data_dir_override=str(data_dir))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "-m", "llava_trainer", *args]  # fmt: skip


def trainer_pod_env(pod_env: Mapping[str, str]) -> dict[str, str]:
    """Our environment with the pod's literal `pod_env` on top; torchrun's own (PET_*, which a
    TrainJob's pods get) stays ours: --standalone here."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "LLAVARUN_STATUS_FILE")}
    env.update({k: v for k, v in pod_env.items() if not k.startswith("PET_")})
    env.update({"OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"})
    return env


def play_trainer_pod(
    run_body: Mapping[str, Any], stage: str, data_dir: Path, pod_env: Mapping[str, str], log: Path
) -> dict[str, str]:
    """Run one stage's trainer as its pod would (`trainer_pod_argv`, `trainer_pod_env`) and assert
    it succeeded; returns the environment it ran with."""
    env = trainer_pod_env(pod_env)
    with log.open("wb") as out:
        proc = subprocess.run(
            trainer_pod_argv(run_body, stage, data_dir), env=env, stdout=out, stderr=subprocess.STDOUT,
            timeout=240, check=False,
        )  # fmt: skip
    assert proc.returncode == 0, f"trainer failed, log {log}:\n{log.read_text()[-4000:]}"
    return env


def run_token_kubeconfig(cluster: Cluster, namespace: str, run: str) -> Path:
    """A kubeconfig with a token of the run's operator-made ServiceAccount (`<run>-trainer`), once
    that token may write the run's status (the Role and RoleBinding follow the first job)."""
    token = cluster.create_token(namespace, f"{run}-trainer", expiration_seconds=600)
    kubeconfig = cluster.kubeconfig_for_token(token, namespace=namespace)
    with cluster.api_client(kubeconfig) as api:
        custom = client.CustomObjectsApi(api)
        wait_for(
            lambda: custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, run, {}),
            timeout=30,
            interval=0.2,
            what=f"{run}-trainer allowed to patch its run's status",
        )
    return kubeconfig


def job_name(run: str, stage: str, attempt: int = 0) -> str:
    return f"{run}-{stage}" if attempt == 0 else f"{run}-{stage}-r{attempt}"


def job_state(job: Mapping[str, Any]) -> str | None:
    """The training-operator's verdict on a PyTorchJob: the last true condition type."""
    true = [c["type"] for c in (job.get("status") or {}).get("conditions") or [] if c["status"] == "True"]
    return true[-1] if true else None


def condition(status: Mapping[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})


# --- reading the cluster ---------------------------------------------------------------------------


@dataclass
class Kube:
    """Admin reads and writes through the python client (cheaper than a kubectl per poll)."""

    api: ApiClient

    @classmethod
    def for_cluster(cls, cluster: Cluster) -> Kube:
        return cls(cluster.api_client())

    @cached_property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @cached_property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @cached_property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api)

    @cached_property
    def rbac(self) -> client.RbacAuthorizationV1Api:
        return client.RbacAuthorizationV1Api(self.api)

    def create_run(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        ns = manifest["metadata"]["namespace"]
        return dict(self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, dict(manifest)))

    def run(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return dict((self.run(namespace, name) or {}).get("status") or {})

    def patch_run(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, dict(patch))

    def delete_run(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def jobs(self, namespace: str, run: str | None = None) -> dict[str, dict[str, Any]]:
        """PyTorchJobs by name (of one run, by its label)."""
        selector = f"{LABEL_RUN}={run}" if run else None
        items = self.custom.list_namespaced_custom_object(
            *KUBEFLOW[:2], namespace, KUBEFLOW[2], label_selector=selector
        )
        return {j["metadata"]["name"]: j for j in items["items"]}

    def patch_job(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(*KUBEFLOW[:2], namespace, KUBEFLOW[2], name, dict(patch))

    def pods(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        return self._list(self.core.list_namespaced_pod, namespace, selector)

    def services(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        return self._list(self.core.list_namespaced_service, namespace, selector)

    def events(self, namespace: str, run: str) -> list[str]:
        """Reasons of the Events on a LlavaRun, roughly oldest first (timestamps have 1 s resolution)."""
        return [e["reason"] for e in self._run_events(namespace, run)]

    def event_messages(self, namespace: str, run: str, reason: str) -> list[str]:
        return [e.get("message", "") for e in self._run_events(namespace, run) if e["reason"] == reason]

    def _run_events(self, namespace: str, run: str) -> list[dict[str, Any]]:
        selector = f"involvedObject.name={run},involvedObject.kind=LlavaRun"
        items = self._list(self.core.list_namespaced_event, namespace, field_selector=selector)
        items.sort(key=lambda e: (e.get("lastTimestamp") or e.get("eventTime") or "", e["metadata"]["name"]))
        return items

    def exists(self, kind: str, namespace: str, name: str) -> bool:
        read = {
            "serviceaccount": self.core.read_namespaced_service_account,
            "role": self.rbac.read_namespaced_role,
            "rolebinding": self.rbac.read_namespaced_role_binding,
        }[kind]
        try:
            read(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def _list(
        self,
        fn: Callable[..., Any],
        namespace: str,
        selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        kwargs = {"label_selector": selector} if selector else {}
        if field_selector:
            kwargs["field_selector"] = field_selector
        resp = fn(namespace, _preload_content=False, **kwargs)
        return list(json.loads(resp.data)["items"])


def wait_run(
    kube: Kube, namespace: str, name: str, what: str, timeout: float = 60, **fields: Any
) -> dict[str, Any]:
    """Poll the run's status until every given top-level field has the given value; returns the status."""

    def match() -> dict[str, Any] | None:
        st = kube.status(namespace, name)
        return st if all(st.get(k) == v for k, v in fields.items()) else None

    try:
        return dict(wait_for(match, timeout=timeout, interval=POLL, what=f"{namespace}/{name} {what}"))
    except TimeoutError as err:
        raise TimeoutError(f"{err}: wanted {fields}, last status {kube.status(namespace, name)}") from None


def wait_job(
    kube: Kube, namespace: str, name: str, timeout: float = 60, state: str | None = None
) -> dict[str, Any]:
    """Wait for a PyTorchJob to exist (and, with `state`, to reach that condition)."""

    def found() -> dict[str, Any] | None:
        job = kube.jobs(namespace).get(name)
        return job if job and (state is None or job_state(job) == state) else None

    return dict(
        wait_for(found, timeout=timeout, interval=POLL, what=f"PyTorchJob {namespace}/{name} {state or ''}")
    )


def wait_events(kube: Kube, namespace: str, run: str, reason: str, timeout: float = 20) -> list[str]:
    """Events are posted right after the status that records them: wait for `reason` to show up."""
    return list(
        wait_for(
            lambda: (got := kube.events(namespace, run)) and reason in got and got,
            timeout=timeout,
            interval=POLL,
            what=f"event {reason} on {namespace}/{run}",
        )
    )


def wait_pods(
    kube: Kube, namespace: str, selector: str, phase: str, count: int = 1, timeout: float = 60
) -> list[dict[str, Any]]:
    """Wait until `count` pods matching `selector` are in `phase`."""

    def ready() -> list[dict[str, Any]] | None:
        pods = [p for p in kube.pods(namespace, selector) if (p.get("status") or {}).get("phase") == phase]
        return pods if len(pods) >= count else None

    return list(wait_for(ready, timeout=timeout, interval=POLL, what=f"{count} {phase} pod(s) {selector}"))


# --- watching and steering pods --------------------------------------------------------------------


class Watcher:
    """A background list+watch calling `on_object(obj, seen_at)` for every ADDED/MODIFIED object
    (a dict; `seen_at` is time.monotonic() when it arrived). `list_fn` is a list call of the python
    client with everything but the keyword arguments bound, e.g.
    `functools.partial(core.list_namespaced_pod, "ns")`."""

    def __init__(
        self,
        list_fn: Callable[..., Any],
        on_object: Callable[[dict[str, Any], float], None],
        label_selector: str | None = None,
    ) -> None:
        self.list_fn, self.on_object, self.label_selector = list_fn, on_object, label_selector
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="e2e-watch", daemon=True)
        self._watch: watch.Watch | None = None

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        self._thread.join(timeout=10)

    def _call(self, **kwargs: Any) -> Any:
        if self.label_selector:
            kwargs["label_selector"] = self.label_selector
        return self.list_fn(**kwargs)

    def _loop(self) -> None:
        version: str | None = None  # None: (re)list first
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = json.loads(self._call(_preload_content=False).data)
                    for obj in listed["items"]:
                        self._handle(obj)
                    version = listed["metadata"]["resourceVersion"]
                # Short watches (so stop() is prompt) resumed from the last version seen: no re-list.
                self._watch = watch.Watch()
                stream = self._watch.stream(
                    self._call, resource_version=version, timeout_seconds=2, allow_watch_bookmarks=True,
                    deserialize=False,
                )  # fmt: skip
                for event in stream:
                    version = event["object"]["metadata"].get("resourceVersion") or version
                    if self._stop.is_set():
                        break
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._handle(event["object"])
            except Exception as err:  # an apiserver restart, 410 Gone: list again
                if self._stop.is_set():
                    break
                self.errors.append(repr(err))
                version = None
                self._stop.wait(POLL)

    def _handle(self, obj: dict[str, Any]) -> None:
        try:
            self.on_object(obj, time.monotonic())
        except Exception as err:
            self.errors.append(f"{obj['metadata'].get('name')}: {err!r}")


PodRule = Callable[[dict[str, Any]], Mapping[str, Any] | None]


@dataclass
class PodSteerer:
    """Steers pods of a namespace as soon as they appear by patching their metadata for kwok.

    `rule(pod)` returns a metadata patch (see `fail` and `hang`) or None; each pod (by uid) is
    considered once. Patch latency on a busy machine is up to ~0.5 s, so give steered runs a run
    time of a few seconds: kwok re-plans a pod's pending stage on each change of it, counting the
    run time from the change.
    """

    kube: Kube
    namespace: str
    rule: PodRule
    steered: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._watcher = Watcher(partial(self.kube.core.list_namespaced_pod, self.namespace), self._on_pod)

    def __enter__(self) -> PodSteerer:
        self._watcher.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._watcher.stop()

    def _on_pod(self, pod: dict[str, Any], _seen_at: float) -> None:
        meta = pod["metadata"]
        if meta["uid"] in self._seen or meta.get("deletionTimestamp"):
            return
        self._seen.add(meta["uid"])
        patch = self.rule(pod)
        if patch:
            with suppress(ApiException):  # gone already
                self.kube.core.patch_namespaced_pod(meta["name"], self.namespace, {"metadata": dict(patch)})
                self.steered[meta["name"]] = patch


def fail() -> dict[str, Any]:
    """kwok ends the pod with an error (exit code: annotation kwok.llavarun.test/exit-code, default 1)."""
    return {"labels": {OUTCOME_LABEL: "fail"}}


def hang() -> dict[str, Any]:
    """The pod keeps Running (until deleted). Not the outcome=hang label: a pod that already runs
    has its success queued, and kwok cancels that only for another matching stage, such as the same
    success an hour later."""
    return {"annotations": {RUN_DURATION_ANNOTATION: "1h"}}


def first_pods_hang(count: int) -> PodRule:
    """The first `count` pods keep Running until something deletes them; later pods (their
    replacements, whatever their names: a PyTorchJob's keep theirs, a JobSet's are new) finish
    normally."""
    seen: list[str] = []

    def rule(pod: dict[str, Any]) -> Mapping[str, Any] | None:
        seen.append(pod["metadata"]["name"])
        return hang() if len(seen) <= count else None

    return rule


def pod_labels(pod: Mapping[str, Any]) -> dict[str, str]:
    return dict(pod["metadata"].get("labels") or {})


def iter_stage_jobs(jobs: Mapping[str, Mapping[str, Any]]) -> Iterator[tuple[str, str, int]]:
    """(run, stage, attempt) of each job, from its labels."""
    for job in jobs.values():
        labels = job["metadata"]["labels"]
        yield labels[LABEL_RUN], labels[LABEL_STAGE], int(labels[LABEL_ATTEMPT])
