"""Prometheus metrics of the operator: what a platform team alerts on.

- `llavarun_runs{phase}`: runs by phase (from the operator's view of every run);
- `llavarun_stage_duration_seconds{stage,result}`: how long stages (and failed attempts) took;
- `llavarun_reconcile_errors_total{trigger}` and `llavarun_reconciles_total{trigger}`;
- `llavarun_transitions_total{reason}`: every Event the operator emitted, by reason.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .api import Phase
from .plan import Plan

REGISTRY = CollectorRegistry(auto_describe=True)

RUNS = Gauge("llavarun_runs", "LlavaRuns by phase", ["phase"], registry=REGISTRY)
STAGE_DURATION = Histogram(
    "llavarun_stage_duration_seconds",
    "Wall time of finished stages (result=succeeded|failed) and of failed attempts (result=retried)",
    ["stage", "result"],
    buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800, 57600, 115200, 230400, float("inf")),
    registry=REGISTRY,
)
RECONCILES = Counter(
    "llavarun_reconciles_total", "Reconciliations by trigger", ["trigger"], registry=REGISTRY
)
RECONCILE_ERRORS = Counter(
    "llavarun_reconcile_errors_total",
    "Reconciliations that raised, by trigger",
    ["trigger"],
    registry=REGISTRY,
)
TRANSITIONS = Counter(
    "llavarun_transitions_total", "Events emitted, by reason", ["reason"], registry=REGISTRY
)


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Expose /metrics on a background thread (0 disables)."""
    if port:
        start_http_server(port, addr=address, registry=REGISTRY)


def set_run_phases(phases: Iterable[str | None]) -> None:
    """Replace the runs-by-phase gauge; every known phase is exported, zeros included."""
    counts = Tally(p or Phase.PENDING.value for p in phases)
    for phase in {*(p.value for p in Phase), *counts}:
        RUNS.labels(phase=phase).set(counts.get(phase, 0))


def record_plan(plan: Plan) -> None:
    """Count what an applied plan did."""
    for result in plan.finished:
        STAGE_DURATION.labels(stage=result.stage, result=result.result).observe(result.seconds)
    for event in plan.events:
        TRANSITIONS.labels(reason=event.reason).inc()
