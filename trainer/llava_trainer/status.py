"""Reports a stage's progress and results into the LlavaRun status.

The trainer owns only `status.progress` and `status.results`; the operator owns the rest, and both
write JSON merge patches on their own subtrees so neither overwrites the other. Everything written
is validated against the API's pydantic models first: the apiserver prunes undeclared fields
silently, so an undeclared field would otherwise vanish without a trace.

Where the reporter writes is decided by the environment the operator (or the local runner) sets:

- `LLAVARUN_NAME` + `LLAVARUN_NAMESPACE` and Kubernetes credentials (in-cluster service account,
  or a kubeconfig from `LLAVARUN_KUBECONFIG` / `KUBECONFIG`): merge-patch the `llavaruns/status`
  subresource of that one run;
- `LLAVARUN_STATUS_FILE`: merge into that JSON file (atomically: temporary file + rename);
- `KUBEFLOW_TRAINER_SERVER_URL` (+ `_CA_CERT`, `_TOKEN` file paths), injected by Kubeflow Trainer
  v2 into a TrainJob's pods when its `TrainJobStatus` feature gate is on: also post the progress
  to the TrainJob's `status.trainerStatus`, so Kubeflow's own tools show it (the LlavaRun status
  stays the one users read);
- none: do nothing. Only global rank 0 reports (`RANK` unset or 0).

`LLAVARUN_STAGE` and `LLAVARUN_ATTEMPT` fill `progress.stage` / `progress.attempt`; `LLAVARUN_JOB`
names the PyTorchJob in log messages.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, get_args

from llava_operator.api.status import Progress, Results, merge_patch, timestamp
from llava_operator.apiserver import patch_run_status
from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger(__name__)

MIN_PATCH_INTERVAL_S = 10.0
"""At most one progress patch per this many seconds, so thousands of ranks never load the apiserver."""
MIN_FILE_INTERVAL_S = 1.0
"""Local JSON file writes are cheap; refresh them more often so progress bars move."""
REQUEST_TIMEOUT_S = 5.0
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def _results_models() -> dict[str, type[BaseModel]]:
    """stage -> results model, read off `Results` so a new stage needs no change here."""
    models = {}
    for name, field in Results.model_fields.items():
        model = next(
            a for a in get_args(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)
        )
        models[name] = model
    return models


RESULTS_MODELS = _results_models()


def validated(model: type[BaseModel], fields: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`fields` (snake_case or camelCase) as camelCase JSON, keeping only what `model` declares.

    Unknown fields and invalid values are dropped with a warning rather than raised: a typo in a
    status field must not kill a training run hours in.
    """
    values = dict(fields)
    while True:
        try:
            obj = model.model_validate(values)
            return obj.model_dump(by_alias=True, exclude_unset=True, mode="json")
        except ValidationError as err:
            bad = {str(e["loc"][0]) for e in err.errors() if e["loc"]}
            if not bad or not bad & set(values):
                log.warning("status: dropping %s %s: %s", what, sorted(values), err)
                return {}
            for key in bad & set(values):
                log.warning("status: dropping undeclared or invalid %s field %r=%r", what, key, values[key])
                del values[key]


class StatusSink(Protocol):
    min_interval: float

    def write(self, status_patch: dict[str, Any]) -> None:
        """Apply a merge patch to the run's `status`; raise on failure."""


class FileSink:
    """The local runner's status file: the LlavaRun status as JSON, merged atomically."""

    min_interval = MIN_FILE_INTERVAL_S

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, status_patch: dict[str, Any]) -> None:
        current: dict[str, Any] = {}
        if self.path.exists():
            try:
                current = json.loads(self.path.read_text() or "{}")
            except json.JSONDecodeError:
                log.warning("status: %s is not JSON; starting it afresh", self.path)
        current = merge_patch(current, status_patch)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(current, f, indent=2, sort_keys=True)
        os.replace(tmp, self.path)

    def __repr__(self) -> str:
        return f"FileSink({self.path})"


class KubernetesSink:
    """Merge patches on the `status` subresource of one LlavaRun (RBAC allows only that one),
    through the operator's own status writer (`llava_operator.apiserver.patch_run_status`)."""

    min_interval = MIN_PATCH_INTERVAL_S

    def __init__(self, name: str, namespace: str, api_client: ApiClient) -> None:
        self.name, self.namespace, self.api = name, namespace, api_client

    @classmethod
    def connect(cls, name: str, namespace: str, kubeconfig: str | None = None) -> KubernetesSink:
        """Credentials from `kubeconfig` if given, else the pod's service account."""
        from kubernetes import client, config

        if kubeconfig:
            api_client = config.new_client_from_config(config_file=kubeconfig)
        else:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api_client = client.ApiClient(configuration)
        return cls(name, namespace, api_client)

    def write(self, status_patch: dict[str, Any]) -> None:
        """Raises `ApiError` when the apiserver refuses the patch."""
        patch_run_status(self.api, self.namespace, self.name, status_patch, timeout=REQUEST_TIMEOUT_S)

    def __repr__(self) -> str:
        return f"KubernetesSink({self.namespace}/{self.name})"


TRAINER_STATUS_FIELDS = {"percent": "progressPercentage", "etaSeconds": "estimatedRemainingSeconds"}
"""Progress fields with a place of their own in a TrainJob's trainerStatus; the other numbers of
`Progress` (loss, learningRate, samplesPerSecond, mfu, ...) become its `metrics`."""
TRAINER_STATUS_SKIPPED = {"stage", "attempt", "lastUpdate"}
MAX_METRICS = 256  # the TrainJob API's limits: 256 metrics, names and values of 1-64 characters
MAX_METRIC_TEXT = 64


def trainer_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """A TrainJob's `trainerStatus` (Kubeflow Trainer v2, KEP-2779) from a LlavaRun status: its
    progress, and the numbers of the stage's results once written that progress has not (e.g.
    `finalLoss`, `steps`, MMMU's `overall`). Metric values are strings, 6 significant digits."""
    progress = dict(status.get("progress") or {})
    out: dict[str, Any] = {}
    metrics: dict[str, str] = {}
    for key, value in progress.items():
        if key in TRAINER_STATUS_FIELDS and value is not None:
            out[TRAINER_STATUS_FIELDS[key]] = max(0, int(value))
        elif (
            key not in TRAINER_STATUS_SKIPPED
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            metrics[key] = f"{value:.6g}"
    stage = progress.get("stage")
    results = (status.get("results") or {}).get(stage) or {} if stage else {}
    for key, value in results.items():  # a name both have keeps the progress' (the latest window)
        if key not in metrics and isinstance(value, int | float) and not isinstance(value, bool):
            metrics[key] = f"{value:.6g}"
    out["metrics"] = [
        {"name": k[:MAX_METRIC_TEXT], "value": v[:MAX_METRIC_TEXT]}
        for k, v in list(metrics.items())[:MAX_METRICS]
    ]
    if progress.get("lastUpdate"):
        out["lastUpdatedTime"] = progress["lastUpdate"]
    return out


class TrainerStatusSink:
    """POSTs `trainerStatus` to the status endpoint Kubeflow Trainer v2 injects into a TrainJob's
    pods (URL, CA file and a projected service-account token file whose audience is that TrainJob)."""

    min_interval = MIN_PATCH_INTERVAL_S

    def __init__(self, url: str, ca_file: str, token_file: str) -> None:
        self.url, self.ca_file, self.token_file = url, ca_file, token_file
        self.status: dict[str, Any] = {}
        """The LlavaRun status as far as this sink has been told (its patches merged)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TrainerStatusSink | None:
        url = env.get("KUBEFLOW_TRAINER_SERVER_URL")
        if not url:
            return None
        ca, token = env.get("KUBEFLOW_TRAINER_SERVER_CA_CERT"), env.get("KUBEFLOW_TRAINER_SERVER_TOKEN")
        if not ca or not token:
            log.warning(
                "status: KUBEFLOW_TRAINER_SERVER_URL without _CA_CERT and _TOKEN; not reporting there"
            )
            return None
        return cls(url, ca, token)

    def write(self, status_patch: dict[str, Any]) -> None:
        """Raises OSError (urllib's errors included) naming the endpoint's answer on failure."""
        self.status = merge_patch(self.status, status_patch)
        body = json.dumps({"trainerStatus": trainer_status(self.status)}).encode()
        # Read the token on every write: the kubelet rotates projected tokens.
        token = Path(self.token_file).read_text().strip()
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        context = ssl.create_default_context(cafile=self.ca_file)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S, context=context):
                pass
        except urllib.error.HTTPError as err:
            answer = err.read().decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):  # a metav1.Status says why
                answer = json.loads(answer).get("message") or answer
            raise OSError(f"{self.url} answered {err.code}: {answer[:300]}") from None

    def __repr__(self) -> str:
        return f"TrainerStatusSink({self.url})"


class StatusReporter:
    """Writes `status.progress` (throttled) and `status.results.<stage>` through its sinks."""

    def __init__(
        self,
        sinks: list[StatusSink] | None = None,
        *,
        stage: str | None = None,
        attempt: int | None = None,
        job: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sinks = list(sinks or [])
        self.stage, self.attempt, self.job = stage, attempt, job
        self._clock = clock
        # Per sink: the patch not yet written (nulls kept: they clear fields) and when it last wrote.
        self._pending: list[dict[str, Any]] = [{} for _ in self.sinks]
        self._last_write: list[float | None] = [None for _ in self.sinks]
        self._progress_started = False

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, kubeconfig: str | None = None
    ) -> StatusReporter:
        """The reporter the environment asks for (see the module docstring); a no-op off rank 0."""
        env = os.environ if env is None else env
        attempt = env.get("LLAVARUN_ATTEMPT", "")
        sinks: list[StatusSink] = []
        if env.get("RANK", "0") in ("", "0"):
            name, namespace = env.get("LLAVARUN_NAME"), env.get("LLAVARUN_NAMESPACE")
            kubeconfig = kubeconfig or env.get("LLAVARUN_KUBECONFIG") or env.get("KUBECONFIG")
            in_cluster = bool(env.get("KUBERNETES_SERVICE_HOST")) and SERVICE_ACCOUNT_TOKEN.exists()
            if name and namespace and (kubeconfig or in_cluster):
                try:
                    sinks.append(KubernetesSink.connect(name, namespace, kubeconfig))
                except Exception as err:  # a broken kubeconfig must not stop training
                    log.warning("status: cannot reach the apiserver for %s/%s: %s", namespace, name, err)
            if env.get("LLAVARUN_STATUS_FILE"):
                sinks.append(FileSink(Path(env["LLAVARUN_STATUS_FILE"])))
            if trainer_sink := TrainerStatusSink.from_env(env):
                sinks.append(trainer_sink)
            log.info("status: reporting to %s", sinks or "nowhere")
        return cls(
            sinks,
            stage=env.get("LLAVARUN_STAGE") or None,
            attempt=int(attempt) if attempt.isdigit() else None,
            job=env.get("LLAVARUN_JOB") or None,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    def progress(self, **fields: Any) -> None:
        """Update `status.progress` (Progress fields, snake_case); written at most once per interval."""
        if not self.enabled:
            return
        defaults = {"stage": self.stage, "attempt": self.attempt}
        fields = {**{k: v for k, v in defaults.items() if v is not None}, **fields}
        fields["last_update"] = timestamp()
        body = validated(Progress, fields, "progress")
        if not self._progress_started:
            # A stage's first write clears whatever the previous stage left in progress.
            body = {**{f.alias or n: None for n, f in Progress.model_fields.items()}, **body}
            self._progress_started = True
        self._queue({"progress": body})
        self._write(force=False)

    def results(self, stage: str, values: Mapping[str, Any]) -> None:
        """Set `status.results.<stage>` now (results are written once, at the end of a stage)."""
        if not self.enabled:
            return
        if stage not in RESULTS_MODELS:
            log.warning("status: no results declared for stage %r; not written", stage)
            return
        self._queue({"results": {stage: validated(RESULTS_MODELS[stage], values, f"{stage} results")}})
        self._write(force=True)

    def flush(self) -> None:
        """Write everything pending regardless of the interval (the final update of a stage)."""
        self._write(force=True)

    def _queue(self, patch: dict[str, Any]) -> None:
        for pending in self._pending:
            _deep_update(pending, patch)

    def _write(self, *, force: bool) -> None:
        now = self._clock()
        for i, sink in enumerate(self.sinks):
            last = self._last_write[i]
            if not self._pending[i] or (not force and last is not None and now - last < sink.min_interval):
                continue
            # A failure also counts as a write for throttling, so an unreachable apiserver costs
            # one timeout per interval at most; the patch stays pending for the next try.
            self._last_write[i] = now
            try:
                sink.write(self._pending[i])
                self._pending[i] = {}
            except Exception as err:
                log.warning("status: %r (job %s) failed to write: %s", sink, self.job, err)


def _deep_update(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """Merge `patch` into `target`, keeping nulls (they are part of the patch to send)."""
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
