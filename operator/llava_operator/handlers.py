"""kopf handlers: when to reconcile a LlavaRun. What to do is `plan.plan`, how is `kube.converge`.

Triggers, all converging through one per-run lock (so two triggers never interleave):
- the run is created, changes spec, or is seen at operator start (kopf changing handlers);
- one of its child jobs changes (the children index is already up to date when this fires);
- a resync loop every `--resync-seconds` over every unfinished run, the safety net for
  events kopf collapsed or missed. It is a plain task, not a kopf timer/daemon: those put a
  finalizer on every run, and `kubectl delete` would hang whenever the operator is down.
There is no delete handler: children go with their run by garbage collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import kopf

from . import metrics
from .api import GROUP, PLURAL, VERSION, Phase
from .backend import ClusterBackend
from .backends.pytorchjob import PYTORCHJOB
from .kube import Kube, converge
from .naming import LABEL_RUN

log = logging.getLogger("llavarun.operator")

REGISTRY = kopf.OperatorRegistry()
RUNS = (GROUP, VERSION, PLURAL)
PREFIX = GROUP  # kopf's progress/diff-base annotations: llavarun.io/..., never kopf.zalando.org
FINISHED = {Phase.SUCCEEDED.value, Phase.FAILED.value}
CHILD_RESOURCES: list[tuple[str, str, str]] = []
"""Kinds of children watched: those of the backends `serve_children` was given (a cluster without
the training-operator has no PyTorchJob API to watch)."""


@dataclass
class Context:
    """Operator-wide state shared through kopf's memo; none of it is the source of truth."""

    resync_seconds: float = 30.0
    api_workers: int = 32
    backend: ClusterBackend = PYTORCHJOB
    others: tuple[ClusterBackend, ...] = ()
    """Further backends served (a run's status.backend or spec.backend picks one)."""
    kube: Kube | None = None
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    pending_child_events: set[tuple[str, str]] = field(default_factory=set)
    resync: asyncio.Task[None] | None = None


def configure(settings: kopf.OperatorSettings) -> None:
    """Our annotations, no kopf finalizer name, quiet kopf events, server-side child filtering."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX)
    settings.persistence.finalizer = f"{PREFIX}/finalizer"  # never added: no delete handlers/timers
    settings.posting.level = logging.WARNING  # kopf's own "handler succeeded" events are noise
    settings.posting.reporting_component = "llavarun-operator"
    for resource in CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = LABEL_RUN
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


def llavarun_children(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """(namespace, run) -> the run's child jobs, as last seen by the watch."""
    keep = ("metadata", "spec", "status")
    child = {k: copy.deepcopy(dict(body.get(k) or {})) for k in keep}
    return {(namespace, labels[LABEL_RUN]): {"kind": body.get("kind"), **child}}


@kopf.index(*RUNS, registry=REGISTRY)
def llavarun_runs(
    namespace: str, name: str, meta: kopf.Meta, status: kopf.Status, **_: Any
) -> dict[Any, Any]:
    """(namespace, run) -> (phase, generation, observedGeneration): what the resync loop needs."""
    return {
        (namespace, name): (status.get("phase"), meta.get("generation"), status.get("observedGeneration"))
    }


async def reconcile(ctx: Context, namespace: str, name: str, children: kopf.Index, trigger: str) -> None:
    """One reconciliation of one run, serialised per run; the API calls run on a thread."""
    assert ctx.kube is not None
    lock = ctx.locks.setdefault((namespace, name), asyncio.Lock())
    async with lock:
        if trigger == "child":
            # Child events that arrive from here on schedule a new reconcile; the ones before
            # were coalesced into this one, whose snapshot (taken now) already includes them.
            ctx.pending_child_events.discard((namespace, name))
        snapshot = [dict(c) for c in children.get((namespace, name), [])]
        metrics.RECONCILES.labels(trigger=trigger).inc()
        try:
            result = await asyncio.to_thread(converge, ctx.kube, namespace, name, snapshot)
        except Exception:
            metrics.RECONCILE_ERRORS.labels(trigger=trigger).inc()
            raise
    if result is not None:
        metrics.record_plan(result)


@kopf.on.resume(*RUNS, backoff=5, registry=REGISTRY)
@kopf.on.create(*RUNS, backoff=5, registry=REGISTRY)
@kopf.on.update(*RUNS, field="spec", backoff=5, registry=REGISTRY)
async def run_changed(
    namespace: str, name: str, memo: kopf.Memo, llavarun_children: kopf.Index, **_: Any
) -> None:
    await reconcile(memo.ctx, namespace, name, llavarun_children, "run")


async def child_changed(
    namespace: str, labels: dict[str, str], memo: kopf.Memo, llavarun_children: kopf.Index, **_: Any
) -> None:
    ctx: Context = memo.ctx
    key = (namespace, labels[LABEL_RUN])
    if key in ctx.pending_child_events:
        return  # a reconcile of this run is already waiting and will see this event's state
    ctx.pending_child_events.add(key)
    try:
        await reconcile(ctx, namespace, labels[LABEL_RUN], llavarun_children, "child")
    except Exception as err:  # API or connection error (e.g. an apiserver restart): the resync retries
        log.warning("reconcile of %s/%s after a child event failed: %s", namespace, labels[LABEL_RUN], err)


async def resync_forever(ctx: Context, runs: kopf.Index, children: kopf.Index) -> None:
    """Reconcile every unfinished run periodically; also refresh the runs-by-phase gauge."""
    while True:
        await asyncio.sleep(ctx.resync_seconds)
        seen = {key: next(iter(store), (None, None, None)) for key, store in list(runs.items())}
        metrics.set_run_phases(phase for phase, _, _ in seen.values())
        for key in [k for k in ctx.locks if k not in seen and not ctx.locks[k].locked()]:
            del ctx.locks[key]  # runs that are gone
        for (namespace, name), (phase, generation, observed) in seen.items():
            if phase in FINISHED and generation == observed:
                continue
            try:
                await reconcile(ctx, namespace, name, children, "resync")
            except Exception as err:  # the next tick tries again
                log.warning("resync of %s/%s failed: %s", namespace, name, err)


def serve_children(backend: ClusterBackend) -> None:
    """Index and watch `backend`'s children (before `kopf.run`; once per served backend): every
    kind feeds the one children index and the one child handler."""
    resource = (backend.group, backend.version, backend.plural)
    if resource in CHILD_RESOURCES:
        return
    CHILD_RESOURCES.append(resource)
    selected = {LABEL_RUN: kopf.PRESENT}
    kopf.index(*resource, labels=selected, registry=REGISTRY, id="llavarun_children")(llavarun_children)
    kopf.on.event(*resource, labels=selected, registry=REGISTRY, id="child_changed")(child_changed)


@kopf.on.login(registry=REGISTRY)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The kubernetes client's view of credentials: in-cluster ServiceAccount or the kubeconfig."""
    return kopf.login_via_client(**kwargs)


@kopf.on.startup(registry=REGISTRY)
async def startup(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    llavarun_runs: kopf.Index,
    llavarun_children: kopf.Index,
    **_: Any,
) -> None:
    configure(settings)
    ctx: Context = memo.ctx
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=ctx.api_workers, thread_name_prefix="llavarun-api")
    )
    if ctx.kube is None:
        ctx.kube = await asyncio.to_thread(Kube.from_environment, ctx.backend, ctx.others)
    ctx.resync = asyncio.create_task(resync_forever(ctx, llavarun_runs, llavarun_children))


@kopf.on.cleanup(registry=REGISTRY)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    ctx: Context = memo.ctx
    if ctx.resync is not None:
        ctx.resync.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ctx.resync
