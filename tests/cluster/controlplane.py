"""A real Kubernetes control plane on loopback for tests.

etcd + kube-apiserver always; kube-scheduler, kube-controller-manager, kwok
(fake GPU nodes), the Kubeflow training-operator and the Kubeflow Trainer v2
stack (JobSet controller + trainer controller manager, with their admission
webhooks) on request, added lazily with :meth:`Cluster.ensure` so that one
session only ever runs one control plane. Binaries come from
``tests/cluster/build`` (cached Go builds).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import pki as pki_mod
from .processes import Process, free_port, tail

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build"
VERSIONS_FILE = HERE / "versions.env"
STAGES_DIR = HERE / "stages"

SCHEDULER = "scheduler"
CONTROLLER_MANAGER = "controller-manager"
KWOK = "kwok"
TRAINING_OPERATOR = "training-operator"
JOBSET = "jobset"
TRAINER = "trainer"
#: Everything beyond etcd + apiserver, in start order (kcm first: adding it restarts the apiserver).
OPTIONAL_COMPONENTS = (CONTROLLER_MANAGER, SCHEDULER, KWOK, TRAINING_OPERATOR, JOBSET, TRAINER)
#: The PyTorchJob stack: what ``full_cluster`` runs.
FULL = (CONTROLLER_MANAGER, SCHEDULER, KWOK, TRAINING_OPERATOR)
#: Kubeflow Trainer v2: TrainJob -> JobSet -> Jobs -> pods on kwok GPU nodes (``trainer_cluster``).
TRAINER_STACK = (CONTROLLER_MANAGER, SCHEDULER, KWOK, JOBSET, TRAINER)
#: What a component cannot run without (added by :meth:`Cluster.ensure`).
REQUIRES = {TRAINER: (JOBSET,)}

SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.128.0.0/16"  # fake pod IPs handed out by kwok
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
#: Label a test puts on a pod (template) to choose its fate under kwok: "fail" or "hang".
OUTCOME_LABEL = "kwok.llavarun.test/outcome"
RUN_DURATION_ANNOTATION = "kwok.llavarun.test/run-duration"
EXIT_CODE_ANNOTATION = "kwok.llavarun.test/exit-code"
KUBEFLOW_NAMESPACE = "kubeflow"
PYTORCHJOB_CRD = "pytorchjobs.kubeflow.org"
JOBSET_CRD = "jobsets.jobset.x-k8s.io"
TRAINER_CRDS = (
    "clustertrainingruntimes.trainer.kubeflow.org",
    "trainingruntimes.trainer.kubeflow.org",
    "trainjobs.trainer.kubeflow.org",
)
#: The RBAC users the JobSet and trainer controllers run as (client certificates from the test
#: PKI), bound to the ClusterRoles their modules ship.
TRAINER_NAMESPACE = "kubeflow-system"
#: Port name of Trainer v2's runtime status server (TrainJobStatus) in ``Cluster.ports``.
TRAINER_STATUS_PORT = "trainer-status"
#: Where that server reads its serving certificate, whatever $TMPDIR says.
FIXED_CERT_DIR = "/tmp/k8s-webhook-server/serving-certs"
JOBSET_USER = "jobset-controller-manager"
TRAINER_USER = "kubeflow-trainer-controller-manager"


class BuildError(RuntimeError):
    """tests/cluster/build failed or no binaries are available."""


class CommandError(subprocess.CalledProcessError):
    """kubectl/helm failed; unlike CalledProcessError the message includes stderr."""

    def __str__(self) -> str:
        cmd = " ".join(str(a) for a in self.cmd[1:]) if isinstance(self.cmd, list) else self.cmd
        tool = Path(str(self.cmd[0])).name
        return f"{tool} {cmd} failed (rc={self.returncode}):\n{(self.stderr or '').strip()}"


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """The pinned versions (tests/cluster/versions.env) as a dict."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip('"')
    return out


def build(quiet: bool = False) -> Path:
    """Run tests/cluster/build (seconds when cached) and return the bin dir.

    ``LLAVARUN_CLUSTER_BIN`` overrides the cache, e.g. for binaries built elsewhere.
    """
    override = os.environ.get("LLAVARUN_CLUSTER_BIN")
    if override:
        return Path(override)
    proc = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
    if not quiet and proc.stderr:
        print(proc.stderr, end="", flush=True)
    if proc.returncode != 0:
        raise BuildError(f"{BUILD_SCRIPT} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def cached_bin_dir() -> Path | None:
    """The bin dir if the cache already holds a complete build, else None (never builds)."""
    override = os.environ.get("LLAVARUN_CLUSTER_BIN")
    if override:
        return Path(override)
    ok = subprocess.run([str(BUILD_SCRIPT), "--check"], check=False).returncode == 0
    if not ok:
        return None
    out = subprocess.run([str(BUILD_SCRIPT), "--bin-dir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


# --- teardown of every live cluster, whatever ends the interpreter -------------------------------

_LIVE: weakref.WeakSet[Cluster] = weakref.WeakSet()
_handlers_installed = False


def _stop_all() -> None:
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster.stop()


def _install_exit_handlers() -> None:
    """Make SIGTERM/SIGHUP unwind like Ctrl-C so fixtures and atexit run (default would just die)."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_stop_all)
    if threading.current_thread() is not threading.main_thread():
        return

    def to_interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, to_interrupt)


class Cluster:
    """etcd + kube-apiserver on free loopback ports, plus optional components.

    Use as a context manager or call :meth:`start`/:meth:`stop`. All state
    (PKI, kubeconfigs, etcd data, logs) lives in :attr:`workdir`.
    """

    def __init__(
        self,
        bin_dir: Path | None = None,
        workdir: Path | None = None,
        gpu_nodes: int = 2,
        pytorchjob_crd: Path | None = None,
        verbosity: int = 1,
    ) -> None:
        self.bin_dir = bin_dir or build(quiet=True)
        self.versions = read_versions()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="llavarun-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs_dir = self.workdir / "logs"
        self.gpu_nodes = gpu_nodes
        self.verbosity = verbosity
        self.share_dir = self.bin_dir.parent / "share"
        self.pytorchjob_crd = pytorchjob_crd or (self.share_dir / "kubeflow.org_pytorchjobs.yaml")
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.pki = pki_mod.Pki(self.workdir / "pki")
        self.kwok_stages_dir = self.workdir / "kwok-stages"
        self.procs: dict[str, Process] = {}
        self.components: set[str] = set()
        self.ports: dict[str, int] = {}
        self.trainer_status_server = False
        """Whether Trainer v2 runs its runtime status server (TrainJobStatus; needs mount namespaces)."""
        self._service_account_admission = False
        self._lock = threading.RLock()

    # --- public API ------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        """The apiserver URL (https://127.0.0.1:<port>)."""
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def expected_version(self) -> str:
        """The pinned Kubernetes version, e.g. v1.37.2."""
        return self.versions["K8S_VERSION"]

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def service_account_admission(self) -> bool:
        """Whether pods need their ServiceAccount to exist (the controller-manager makes `default`)."""
        return self._service_account_admission

    def start(self, components: Iterable[str] = ()) -> Cluster:
        """Start etcd and kube-apiserver, then *components* (see :data:`OPTIONAL_COMPONENTS`)."""
        with self._lock:
            _install_exit_handlers()
            _LIVE.add(self)
            try:
                if "apiserver" not in self.procs:
                    self._start_core(service_account_admission=CONTROLLER_MANAGER in components)
                self.ensure(*components)
            except BaseException:
                self.stop()
                raise
            return self

    def ensure(self, *components: str) -> Cluster:
        """Add components that are not running yet (idempotent, in dependency order)."""
        unknown = set(components) - set(OPTIONAL_COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; choose from {OPTIONAL_COMPONENTS}")
        components = tuple(components) + tuple(d for c in components for d in REQUIRES.get(c, ()))
        with self._lock:
            if "apiserver" not in self.procs:
                return self.start(components)
            for name in OPTIONAL_COMPONENTS:
                if name in components and name not in self.components:
                    getattr(self, f"_start_{name.replace('-', '_')}")()
                    self.components.add(name)
            return self

    def stop(self, remove_workdir: bool = False) -> None:
        """Stop every process (reverse start order); keep logs unless *remove_workdir*."""
        with self._lock:
            for name in reversed(list(self.procs)):
                self.procs[name].stop()
            self.procs.clear()
            self.components.clear()
            _LIVE.discard(self)
            shutil.rmtree(self.workdir / "etcd-data", ignore_errors=True)
            if remove_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        """Environment for a subprocess talking to this cluster (KUBECONFIG, PATH with our binaries)."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        for var, sub in (
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ):
            env[var] = str(self.workdir / "helm" / sub)
        return env

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run the matching kubectl against this cluster; raises with stderr when *check* fails."""
        return self._run("kubectl", args, kubeconfig, input, check, timeout)

    def helm(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster (its caches live in the workdir, not in $HOME)."""
        return self._run("helm", args, kubeconfig, None, check, timeout)

    def apply(self, manifest: str | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Server-side apply YAML text or objects as the admin."""
        if not isinstance(manifest, str):
            docs = [manifest] if isinstance(manifest, Mapping) else list(manifest)
            manifest = yaml.safe_dump_all(docs)
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=manifest)

    def api_client(self, kubeconfig: Path | None = None) -> ApiClient:
        """A python ``kubernetes`` ApiClient for the admin (or for *kubeconfig*)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def restart_apiserver(self, downtime: float = 0.0) -> None:
        """Stop kube-apiserver, wait *downtime* seconds, start it on the same port and wait for /readyz.

        Clients see a real outage (connection refused, then their watches re-establish).
        """
        self._restart_apiserver(self._service_account_admission, downtime)

    def restart(self, component: str) -> None:
        """(Re)start one component ("etcd", "apiserver", or an optional one), stopped or not."""
        if component == "apiserver":
            self.restart_apiserver()
            return
        if component == KWOK:
            self._restart_kwok()
            return
        proc = self.procs[component]
        proc.stop()
        proc.start()
        self._wait_ready(component)

    def stop_component(self, component: str) -> None:
        """Stop one component (e.g. to simulate an outage); :meth:`restart` brings it back."""
        self.procs[component].stop()

    def create_token(
        self,
        namespace: str,
        service_account: str,
        expiration_seconds: int = 3600,
        audiences: Sequence[str] = (),
    ) -> str:
        """Mint a ServiceAccount token through the TokenRequest API."""
        from kubernetes import client

        body = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=list(audiences), expiration_seconds=expiration_seconds)
        )
        with self.api_client() as api:
            resp = client.CoreV1Api(api).create_namespaced_service_account_token(
                service_account, namespace, body
            )
        return str(resp.status.token)

    def kubeconfig_for_token(self, token: str, path: Path | None = None, namespace: str = "default") -> Path:
        """Write a kubeconfig that authenticates with a bearer *token*; returns its path."""
        if path is None:
            path = Path(tempfile.mkstemp(prefix="token-", suffix=".kubeconfig", dir=self.workdir)[1])
        self._write_kubeconfig(path, {"token": token}, namespace=namespace)
        return path

    def add_gpu_nodes(
        self,
        count: int,
        gpus: int = 8,
        resource: str = GPU_RESOURCE,
        taint_key: str | None = None,
        prefix: str = "gpu-node",
        labels: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> list[str]:
        """Create *count* kwok-managed nodes with *gpus* of *resource* each.

        They carry the taint ``<taint_key>=present:NoSchedule`` (taint_key defaults to the
        resource name) and the annotation kwok manages. Names continue after existing nodes
        with the same prefix. Needs kwok to become Ready.
        """
        self.ensure(KWOK)
        from kubernetes import client

        taint_key = taint_key or resource
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            existing = {n.metadata.name for n in core.list_node().items}
            names: list[str] = []
            i = 0
            while len(names) < count:
                name = f"{prefix}-{i}"
                i += 1
                if name in existing:
                    continue
                names.append(name)
                node_labels = {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    f"{resource}.present": "true",
                    **(labels or {}),
                }
                resources = {
                    "cpu": "96",
                    "memory": "1Ti",
                    "pods": "110",
                    "ephemeral-storage": "2Ti",
                    resource: str(gpus),
                }
                body = {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": node_labels,
                        "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    },
                    "spec": {
                        "providerID": f"kwok://{name}",
                        "taints": [{"key": taint_key, "value": "present", "effect": "NoSchedule"}],
                    },
                    "status": {"capacity": resources, "allocatable": resources},
                }
                core.create_node(body)
            if wait:
                self._wait_nodes_ready(core, names)
        return names

    def add_kwok_stages(self, stages: str | Path, name: str | None = None) -> Path:
        """Add Stage YAML (text or a file) to kwok's config and restart kwok so it takes effect.

        Extra stages compete with the defaults in tests/cluster/stages (same resource and a
        matching selector: kwok picks by weight), so give them selectors of their own.
        """
        text = stages.read_text() if isinstance(stages, Path) else stages
        if name is None:
            name = (
                stages.stem if isinstance(stages, Path) else f"extra-{len(list(self._extra_stage_files()))}"
            )
        self.kwok_stages_dir.mkdir(parents=True, exist_ok=True)
        path = self.kwok_stages_dir / f"{name}.yaml"
        path.write_text(text)
        if KWOK in self.procs:
            self._restart_kwok()
        return path

    def remove_kwok_stages(self, name: str) -> None:
        """Drop stages added with :meth:`add_kwok_stages` and restart kwok."""
        (self.kwok_stages_dir / f"{name}.yaml").unlink(missing_ok=True)
        if KWOK in self.procs:
            self._restart_kwok()

    def log_paths(self) -> dict[str, Path]:
        """Component name → log file."""
        return {name: p.log for name, p in self.procs.items()} or {
            p.stem: p for p in sorted(self.logs_dir.glob("*.log"))
        }

    def describe_logs(self, lines: int = 25) -> str:
        """Log paths and tails of every component, for failure reports."""
        parts = [f"control plane workdir: {self.workdir}  (KUBECONFIG={self.kubeconfig})"]
        for name, path in self.log_paths().items():
            parts.append(f"--- {name}: {path} (last {lines} lines)\n{tail(path, lines)}")
        return "\n".join(parts)

    # --- core: etcd + apiserver ------------------------------------------------------------------

    def _bin(self, name: str) -> str:
        path = self.bin_dir / name
        if not path.exists():
            raise BuildError(f"{path} is missing: run tests/cluster/build")
        return str(path)

    def _start_core(self, service_account_admission: bool) -> None:
        for name in ("etcd-client", "etcd-peer", "apiserver"):
            self.ports[name] = free_port()
        pki_mod.generate(self.pki.dir, service_ip=SERVICE_CIDR.replace("0.0/16", "0.1"))
        self._write_kubeconfig(
            self.kubeconfig,
            {
                "client-certificate-data": _b64(self.pki.admin_crt),
                "client-key-data": _b64(self.pki.admin_key),
            },
        )
        etcd_url = f"http://127.0.0.1:{self.ports['etcd-client']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        etcd = Process(
            "etcd",
            [
                self._bin("etcd"),
                "--name=test",
                f"--data-dir={self.workdir / 'etcd-data'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=test={peer_url}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
                "--quota-backend-bytes=4294967296",
            ],
            self.logs_dir / "etcd.log",
        )
        self.procs["etcd"] = etcd
        etcd.start()
        etcd.wait_until(lambda: _http_ok(f"{etcd_url}/health"), 30, "etcd /health")
        self._start_apiserver(service_account_admission)

    def _apiserver_argv(self, service_account_admission: bool) -> list[str]:
        p = self.pki
        argv = [
            self._bin("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd-client']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports['apiserver']}",
            f"--tls-cert-file={p.apiserver_crt}",
            f"--tls-private-key-file={p.apiserver_key}",
            f"--client-ca-file={p.ca_crt}",
            # The apiserver's own URL, so OIDC discovery of the issuer works from this host (Trainer
            # v2's status server verifies trainer tokens that way).
            f"--service-account-issuer={self.issuer}",
            f"--service-account-jwks-uri={self.issuer}/openid/v1/jwks",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            # The "kubernetes" Service endpoint would be 127.0.0.1, which Endpoints reject.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            f"--v={self.verbosity}",
        ]
        if not service_account_admission:
            # Nothing creates "default" ServiceAccounts without kube-controller-manager (as envtest).
            argv.append("--disable-admission-plugins=ServiceAccount")
        return argv

    def _start_apiserver(self, service_account_admission: bool) -> None:
        self._service_account_admission = service_account_admission
        proc = Process(
            "apiserver",
            self._apiserver_argv(service_account_admission),
            self.logs_dir / "kube-apiserver.log",
            # With watches open it can linger after "Stopped listening"; a restart need not wait.
            stop_timeout=3,
        )
        self.procs["apiserver"] = proc
        proc.start()
        self._wait_ready("apiserver")

    def _restart_apiserver(self, service_account_admission: bool, downtime: float = 0.0) -> None:
        with self._lock:
            old = self.procs["apiserver"]
            old.stop()
            time.sleep(downtime)
            old.argv = self._apiserver_argv(service_account_admission)
            self._service_account_admission = service_account_admission
            old.start()
            self._wait_ready("apiserver")

    # --- optional components ---------------------------------------------------------------------

    def _kube_component(self, name: str, binary: str, extra: list[str]) -> None:
        self.ports[name] = free_port()
        kc = str(self.kubeconfig)
        proc = Process(
            name,
            [
                self._bin(binary),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports[name]}",
                f"--cert-dir={self.workdir / name}",
                "--leader-elect=false",
                # No front-proxy CA is configured; skip reading it (avoids an error per second in the log).
                "--authentication-skip-lookup=true",
                f"--v={self.verbosity}",
                *extra,
            ],
            self.logs_dir / f"{binary}.log",
        )
        self.procs[name] = proc
        proc.start()
        self._wait_ready(name)

    def _start_scheduler(self) -> None:
        self._kube_component(SCHEDULER, "kube-scheduler", [])

    def _start_controller_manager(self) -> None:
        if not self._service_account_admission:
            # Pods now get their ServiceAccount checked and token mounted, as in a real cluster.
            self._restart_apiserver(service_account_admission=True)
        p = self.pki
        self._kube_component(
            CONTROLLER_MANAGER,
            "kube-controller-manager",
            [
                f"--root-ca-file={p.ca_crt}",
                f"--service-account-private-key-file={p.sa_key}",
                f"--cluster-signing-cert-file={p.ca_crt}",
                f"--cluster-signing-key-file={p.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--use-service-account-credentials=false",
            ],
        )

    def _kwok_argv(self) -> list[str]:
        stage_files = sorted(STAGES_DIR.glob("*.yaml")) + self._extra_stage_files()
        return [
            self._bin("kwok"),
            f"--kubeconfig={self.kubeconfig}",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            f"--cidr={POD_CIDR}",
            "--node-ip=10.255.0.1",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{self.ports[KWOK]}",
            *(f"--config={f}" for f in stage_files),
        ]

    def _extra_stage_files(self) -> list[Path]:
        return sorted(self.kwok_stages_dir.glob("*.yaml")) if self.kwok_stages_dir.exists() else []

    def _start_kwok(self) -> None:
        self.ports[KWOK] = free_port()
        home = self.workdir / "kwok-home"  # kwok also reads ~/.kwok/kwok.yaml: keep the user's out
        home.mkdir(exist_ok=True)
        env = dict(os.environ, HOME=str(home))
        proc = Process(KWOK, self._kwok_argv(), self.logs_dir / "kwok.log", env=env)
        self.procs[KWOK] = proc
        proc.start()
        self._wait_ready(KWOK)
        self.components.add(KWOK)  # add_gpu_nodes() calls ensure(KWOK)
        if self.gpu_nodes:
            self.add_gpu_nodes(self.gpu_nodes)

    def _restart_kwok(self) -> None:
        proc = self.procs[KWOK]
        proc.stop()
        # Each kwok process has a new identity and would wait for the old one's node Leases to
        # expire (40 s) before touching those nodes again; they are all ours, so drop them.
        self.kubectl("delete", "leases", "--all", "-n", "kube-node-lease", "--wait=false")
        proc.argv = self._kwok_argv()
        proc.start()
        self._wait_ready(KWOK)

    def _start_training_operator(self) -> None:
        ns = KUBEFLOW_NAMESPACE
        # The webhook cert rotator Gets this Secret first and stops the manager if it is missing;
        # it must also already hold certs that "are mounted" (see training_operator_webhook_certs).
        certs = pki_mod.training_operator_webhook_certs()
        self.apply(
            [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "training-operator-webhook-cert", "namespace": ns},
                    "data": {k: base64.b64encode(v).decode() for k, v in certs.items()},
                },
            ]
        )
        self.install_pytorchjob_crd()
        for port in ("to-metrics", "to-health", "to-webhook"):
            self.ports[port] = free_port()
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), MY_POD_NAMESPACE=ns)
        proc = Process(
            TRAINING_OPERATOR,
            [
                self._bin("training-operator"),
                f"--kubeconfig={self.kubeconfig}",
                "--enable-scheme=pytorchjob",
                f"--metrics-bind-address=127.0.0.1:{self.ports['to-metrics']}",
                f"--health-probe-bind-address=127.0.0.1:{self.ports['to-health']}",
                f"--webhook-server-port={self.ports['to-webhook']}",
                "--leader-elect=false",
                "--controller-threads=4",
                "--kube-api-qps=100",
                "--kube-api-burst=200",
            ],
            self.logs_dir / "training-operator.log",
            env=env,
        )
        self.procs[TRAINING_OPERATOR] = proc
        proc.start()
        self._wait_ready(TRAINING_OPERATOR)

    def install_pytorchjob_crd(self) -> None:
        """Install the PyTorchJob CRD server-side (it is too big for client-side apply) and wait for it."""
        if not self.pytorchjob_crd.exists():
            raise BuildError(f"{self.pytorchjob_crd} missing: run tests/cluster/build")
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(self.pytorchjob_crd))
        self.wait_crd_established(PYTORCHJOB_CRD)

    # --- Kubeflow Trainer v2: the JobSet controller and the trainer controller manager ----------
    #
    # Both run as local processes under their own identity (a client certificate from the test
    # PKI bound to the ClusterRole their module ships), with their cert management off: their
    # webhook servers listen on 127.0.0.1 with a serving certificate from the test PKI, and the
    # webhook configurations rendered from their modules are registered with that CA and a
    # https://127.0.0.1:<port> URL, so the apiserver calls them as in a real cluster.

    def _start_jobset(self) -> None:
        home = self.workdir / JOBSET
        self._install_crds([JOBSET_CRD])
        kubeconfig = self._controller_identity(JOBSET, JOBSET_USER, "jobset-clusterrole.yaml")
        cert_dir = home / "certs"
        self._serving_cert(cert_dir)
        for port in ("jobset-webhook", "jobset-health"):
            self.ports[port] = free_port()
        config = {
            "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
            "kind": "Configuration",
            "webhook": {"host": "127.0.0.1", "port": self.ports["jobset-webhook"], "certDir": str(cert_dir)},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports['jobset-health']}"},
            "metrics": {"bindAddress": "0"},  # off: nothing scrapes it
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
        }
        (home / "config.yaml").write_text(yaml.safe_dump(config))
        proc = Process(
            JOBSET,
            [
                self._bin("jobset-controller"),
                f"--config={home / 'config.yaml'}",
                f"--kubeconfig={kubeconfig}",
                "--zap-log-level=info",
            ],
            self.logs_dir / "jobset-controller.log",
        )
        self.procs[JOBSET] = proc
        proc.start()
        self._wait_ready(JOBSET)
        self._register_webhooks(
            self.share_dir / "jobset-webhooks.yaml", self.ports["jobset-webhook"], name_prefix="jobset-"
        )
        # The apiserver really calls it: only the JobSet defaulting webhook sets a restartPolicy.
        probe = yaml.safe_dump(_probe_jobset())

        def defaulted() -> bool:
            out = self.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=probe).stdout
            job = json.loads(out)["spec"]["replicatedJobs"][0]["template"]
            return bool(job["spec"]["template"]["spec"].get("restartPolicy") == "OnFailure")

        proc.wait_until(defaulted, 60, "the JobSet defaulting webhook")

    @property
    def issuer(self) -> str:
        """The service-account token issuer: this apiserver's URL."""
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def _start_trainer(self) -> None:
        home = self.workdir / TRAINER
        self._install_crds(TRAINER_CRDS)
        kubeconfig = self._controller_identity(TRAINER, TRAINER_USER, "trainer-clusterrole.yaml")
        # Its webhook server's cert dir is not configurable: controller-runtime's default,
        # $TMPDIR/k8s-webhook-server/serving-certs (where the Secret is mounted in its pod).
        tmp = home / "tmp"
        cert_dir = tmp / "k8s-webhook-server" / "serving-certs"
        self._serving_cert(cert_dir)
        for port in ("trainer-webhook", "trainer-health", TRAINER_STATUS_PORT):
            self.ports[port] = free_port()
        config = {
            "apiVersion": "config.trainer.kubeflow.org/v1alpha1",
            "kind": "Configuration",
            "webhook": {"host": "127.0.0.1", "port": self.ports["trainer-webhook"]},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports['trainer-health']}"},
            "metrics": {"bindAddress": "0"},
            "leaderElection": {"leaderElect": False},
            "certManagement": {"enable": False},
        }
        argv = [
            self._bin("trainer-controller-manager"),
            f"--config={home / 'config.yaml'}",
            f"--kubeconfig={kubeconfig}",
            "--zap-log-level=info",
        ]
        self.trainer_status_server = _can_unshare_mounts()
        if self.trainer_status_server:
            config["featureGates"] = {"TrainJobStatus": True}
            config["statusServer"] = {"port": self.ports[TRAINER_STATUS_PORT]}
            argv = self._trainer_status_wrapper(home, cert_dir, argv)
        (home / "config.yaml").write_text(yaml.safe_dump(config))
        proc = Process(
            TRAINER,
            argv,
            self.logs_dir / "trainer-controller-manager.log",
            env=dict(os.environ, TMPDIR=str(tmp)),
        )
        self.procs[TRAINER] = proc
        proc.start()
        self._wait_ready(TRAINER)
        self._register_webhooks(self.share_dir / "trainer-webhooks.yaml", self.ports["trainer-webhook"])
        # The apiserver really calls it: the TrainJob validating webhook refuses an unknown runtime.
        probe = yaml.safe_dump(_probe_trainjob())

        def refused() -> bool:
            res = self.kubectl("create", "--dry-run=server", "-f", "-", input=probe, check=False)
            return res.returncode != 0 and "admission webhook" in res.stderr and "denied" in res.stderr

        proc.wait_until(refused, 60, "the TrainJob validating webhook")

    def _trainer_status_wrapper(self, home: Path, cert_dir: Path, argv: list[str]) -> list[str]:
        """Run the manager with what its runtime status server (feature gate TrainJobStatus) reads
        from fixed in-pod paths: a service-account token (only its issuer is read, to discover the
        apiserver's OIDC keys), its namespace, and /tmp/k8s-webhook-server/serving-certs. They are
        mounted in a private mount namespace of the manager alone (a tmpfs over /run), never on
        this host, where the only trace is the empty mount point under /tmp.

        The webhook serving certificate's Secret in that namespace gives TrainJobs their CA
        (`<trainjob>-tls-config`); the manager's user may read the issuer's discovery documents."""
        self.apply(
            [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": TRAINER_NAMESPACE}},
                {"apiVersion": "v1", "kind": "ServiceAccount",
                 "metadata": {"name": TRAINER_USER, "namespace": TRAINER_NAMESPACE}},
                {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                 "metadata": {"name": "kubeflow-trainer-webhook-cert", "namespace": TRAINER_NAMESPACE},
                 "data": {"ca.crt": _b64(self.pki.ca_crt), "tls.crt": _b64(cert_dir / "tls.crt"),
                          "tls.key": _b64(cert_dir / "tls.key")}},
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                 "metadata": {"name": f"{TRAINER_USER}-issuer-discovery"},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                             "name": "system:service-account-issuer-discovery"},
                 "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": TRAINER_USER}]},
            ]
        )  # fmt: skip
        token = home / "sa-token"
        token.write_text(self.create_token(TRAINER_NAMESPACE, TRAINER_USER, expiration_seconds=86400))
        Path(FIXED_CERT_DIR).mkdir(parents=True, exist_ok=True)
        script = (
            "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/secrets/kubernetes.io/serviceaccount; "
            'cp "$1" /run/secrets/kubernetes.io/serviceaccount/token; '
            f"printf {TRAINER_NAMESPACE} > /run/secrets/kubernetes.io/serviceaccount/namespace; "
            f'mount --bind "$2" {FIXED_CERT_DIR}; shift 2; exec "$@"'
        )
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
                str(token), str(cert_dir), *argv]  # fmt: skip

    def _install_crds(self, names: Sequence[str]) -> None:
        """Server-side apply CRDs ``<plural>.<group>`` from share/ (``<group>_<plural>.yaml``), wait for them."""
        files = []
        for name in names:
            plural, group = name.split(".", 1)
            files.append(self.share_dir / f"{group}_{plural}.yaml")
            if not files[-1].exists():
                raise BuildError(f"{files[-1]} missing: run tests/cluster/build")
        self.kubectl("apply", "--server-side", "--force-conflicts", *(f"--filename={f}" for f in files))
        for name in names:
            self.wait_crd_established(name)

    def _controller_identity(self, component: str, user: str, clusterrole_file: str) -> Path:
        """A kubeconfig for *user* (client certificate), bound to the module's ClusterRole."""
        home = self.workdir / component
        crt, key = pki_mod.issue(self.pki, home / "client.crt", home / "client.key", user)
        kubeconfig = home / "kubeconfig"
        self._write_kubeconfig(
            kubeconfig, {"client-certificate-data": _b64(crt), "client-key-data": _b64(key)}
        )
        role = yaml.safe_load((self.share_dir / clusterrole_file).read_text())
        role["metadata"]["name"] = user
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": user},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }
        self.apply([role, binding])
        return kubeconfig

    def _serving_cert(self, cert_dir: Path) -> None:
        """tls.crt/tls.key for a webhook server on 127.0.0.1, signed by the cluster CA."""
        pki_mod.issue(
            self.pki,
            cert_dir / "tls.crt",
            cert_dir / "tls.key",
            "127.0.0.1",
            server=True,
            dns=["localhost"],
            ips=["127.0.0.1"],
        )

    def _register_webhooks(self, manifest: Path, port: int, name_prefix: str = "") -> None:
        """Apply a module's webhook configurations, each webhook pointed at https://127.0.0.1:<port>."""
        ca = _b64(self.pki.ca_crt)
        docs = []
        for doc in yaml.safe_load_all(manifest.read_text()):
            if not doc or doc["kind"] not in (
                "MutatingWebhookConfiguration",
                "ValidatingWebhookConfiguration",
            ):
                continue  # e.g. the Service the webhooks would sit behind in a cluster
            doc["metadata"]["name"] = name_prefix + doc["metadata"]["name"]
            for hook in doc["webhooks"]:
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca}
            docs.append(doc)
        if not docs:
            raise BuildError(f"{manifest} has no webhook configurations")
        self.apply(docs)

    def wait_crd_established(self, name: str, timeout: float = 60) -> None:
        """Wait until CRD *name* is Established (``kubectl wait`` errors while status is still empty)."""

        def established() -> bool:
            crd = json.loads(self.kubectl("get", "crd", name, "-o", "json").stdout)
            conds = crd.get("status", {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

        wait_for(established, timeout=timeout, interval=0.2, what=f"CRD {name} Established")

    # --- readiness -------------------------------------------------------------------------------

    def _wait_ready(self, name: str) -> None:
        proc = self.procs[name]
        if name == "etcd":
            url = f"http://127.0.0.1:{self.ports['etcd-client']}/health"
            proc.wait_until(lambda: _http_ok(url), 30, "etcd /health")
        elif name == "apiserver":
            ctx = self._admin_ssl_context()
            proc.wait_until(lambda: _http_ok(f"{self.server}/readyz", ctx), 90, "/readyz")
        elif name in (SCHEDULER, CONTROLLER_MANAGER):
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # self-signed serving cert; this is only a health probe
            url = f"https://127.0.0.1:{self.ports[name]}/healthz"
            proc.wait_until(lambda: _http_ok(url, ctx), 60, "/healthz")
        elif name == KWOK:
            url = f"http://127.0.0.1:{self.ports[KWOK]}/healthz"
            proc.wait_until(lambda: _http_ok(url), 60, "/healthz")
        elif name == TRAINING_OPERATOR:
            url = f"http://127.0.0.1:{self.ports['to-health']}/readyz"
            proc.wait_until(lambda: _http_ok(url), 90, "/readyz")
        elif name in (JOBSET, TRAINER):
            # /readyz: certificates loaded and the webhook server accepting connections.
            url = f"http://127.0.0.1:{self.ports[f'{name}-health']}/readyz"
            proc.wait_until(lambda: _http_ok(url), 90, "/readyz")
        else:
            raise ValueError(name)

    def _wait_nodes_ready(self, core: Any, names: list[str], timeout: float = 60) -> None:
        def ready() -> bool:
            for name in names:
                node = core.read_node(name)
                conds = {c.type: c.status for c in (node.status.conditions or [])}
                if conds.get("Ready") != "True":
                    return False
            return True

        self.procs[KWOK].wait_until(ready, timeout, f"nodes {names} Ready")

    def _admin_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        ctx.load_cert_chain(str(self.pki.admin_crt), str(self.pki.admin_key))
        return ctx

    # --- helpers ---------------------------------------------------------------------------------

    def _run(
        self,
        tool: str,
        args: Sequence[str],
        kubeconfig: Path | None,
        input: str | None,
        check: bool,
        timeout: float,
    ) -> subprocess.CompletedProcess[str]:
        argv = [self._bin(tool), *args]
        proc = subprocess.run(
            argv,
            env=self.env(kubeconfig),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def _write_kubeconfig(self, path: Path, user: dict[str, str], namespace: str = "default") -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "llavarun-test",
                    "cluster": {"server": self.server, "certificate-authority-data": _b64(self.pki.ca_crt)},
                }
            ],
            "users": [{"name": "user", "user": user}],
            "contexts": [
                {
                    "name": "llavarun-test",
                    "context": {"cluster": "llavarun-test", "user": "user", "namespace": namespace},
                }
            ],
            "current-context": "llavarun-test",
        }
        path.write_text(json.dumps(config, indent=1))
        path.chmod(0o600)


def _probe_jobset() -> dict[str, Any]:
    """A JobSet (for a server-side dry run) whose pod template has no restartPolicy."""
    pod = {"containers": [{"name": "c", "image": "busybox"}]}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": "admission-probe", "namespace": "default"},
        "spec": {"replicatedJobs": [{"name": "r", "template": {"spec": {"template": {"spec": pod}}}}]},
    }


def _probe_trainjob() -> dict[str, Any]:
    """A TrainJob (for a server-side dry run) naming a ClusterTrainingRuntime that does not exist."""
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "admission-probe", "namespace": "default"},
        "spec": {"runtimeRef": {"name": "llavarun-admission-probe-absent"}},
    }


def _can_unshare_mounts() -> bool:
    """Whether this process may make a private mount namespace and mount in it (root, or a
    kernel allowing it), which the Trainer v2 status server's wrapper needs."""
    try:
        probe = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", "mount -t tmpfs tmpfs /run"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3, context=ctx) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def wait_for(predicate: Any, timeout: float = 60, interval: float = 0.5, what: str = "condition") -> Any:
    """Poll *predicate* until it returns something truthy; return that, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(
        f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else "")
    )
