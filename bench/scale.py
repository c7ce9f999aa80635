"""Control-plane scale: many LlavaRuns on many fake GPU nodes, end to end.

Starts its own control plane from tests/cluster (etcd, kube-apiserver, scheduler,
controller-manager, kwok with `--nodes` GPU nodes of 8 GPUs each, the Kubeflow training-operator),
installs the chart with replicas=0 and runs `llavarun operator` as a local process under the
chart's ServiceAccount token (as tests/e2e does). Then it creates `--runs` LlavaRuns at once, each
with `--stages` (1 node x 8 GPUs per training stage; kwok ends every pod after `--run-duration`),
and waits for all of them to finish. Reported (JSON on stdout):

- apply → first PyTorchJob of the run (seen by a watch), p50/p90/p99/max, target p99 < 2 s;
- a stage's job Succeeded → the next stage's job created, p50/p99;
- the operator's CPU seconds and peak RSS (/proc: utime+stime, VmHWM), target RSS < 200 MB;
- reconcile errors and reconciles by trigger (the operator's /metrics), ERROR log lines;
- correctness: every run Succeeded with exactly one PyTorchJob per stage (none lost, none duplicated);
- CPU seconds of every control-plane component (they share the machine with the operator).

    .venv/bin/python bench/scale.py [--runs 200 --nodes 128]   # the documented benchmark
    .venv/bin/python bench/scale.py --runs 10 --nodes 8        # quick mode (an e2e smoke test)
    .venv/bin/python bench/scale.py --steady                   # 800 finished + 200 running runs, no events:
                                                               # the operator's CPU in % of one core (< 5 %)

Exit status 0 when every run finished correctly (targets are reported, not enforced, unless
`--strict`); 1 otherwise. The cluster's logs are kept (path on stderr) when it fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(ROOT))

from tests.cluster import FULL, Cluster  # noqa: E402
from tests.e2e.support import (  # noqa: E402
    ALL_STAGES,
    GROUP,
    KUBEFLOW,
    LABEL_RUN,
    PLURAL,
    VERSION,
    Kube,
    OperatorProcess,
    Watcher,
    install_chart,
    iter_stage_jobs,
    job_state,
    llavarun,
    operator_kubeconfig,
)

NAMESPACE = "scale"
TARGET_P99_FIRST_JOB_S = 2.0
TARGET_PEAK_RSS_MB = 200.0
TARGET_STEADY_CPU_PERCENT = 5.0


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:  # nearest rank
        return round(ordered[max(1, math.ceil(q * len(ordered))) - 1], 3)

    return {
        "n": len(values),
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": round(ordered[-1], 3),
    }


def hardware() -> dict[str, Any]:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), ""
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    mem_kb = next(
        (
            int(ln.split()[1])
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal")
        ),
        0,
    )
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def process_cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process and its reaped children (/proc/<pid>/stat)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = sum(int(f) for f in fields[11:15])
    return round(ticks / os.sysconf("SC_CLK_TCK"), 2)


def _samples(text: str, metric: str) -> dict[str, float]:
    """`{labels} -> value` of one metric family in a Prometheus text dump."""
    out = {}
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels, _, value = line[len(metric) :].rpartition(" ")
            out[labels] = float(value)
    return out


def _label(labels: str, name: str) -> str:
    return labels.split(f'{name}="', 1)[1].split('"', 1)[0] if f'{name}="' in labels else ""


def apiserver_stats(before: str, after: str, top: int = 12) -> dict[str, Any]:
    """What kube-apiserver spent its time on between two /metrics dumps: requests by verb and
    resource (count, seconds in total, mean ms; watches excluded) and API Priority and Fairness
    queueing by priority level."""
    requests: dict[str, list[float]] = {}
    count_before = _samples(before, "apiserver_request_duration_seconds_count")
    sum_before = _samples(before, "apiserver_request_duration_seconds_sum")
    for labels, total in _samples(after, "apiserver_request_duration_seconds_sum").items():
        verb = _label(labels, "verb")
        if verb in ("WATCH", "CONNECT"):
            continue
        resource = _label(labels, "resource") + (
            f"/{_label(labels, 'subresource')}" if _label(labels, "subresource") else ""
        )
        count = _samples(after, "apiserver_request_duration_seconds_count").get(labels, 0) - count_before.get(
            labels, 0
        )
        seconds = total - sum_before.get(labels, 0)
        if count:
            entry = requests.setdefault(f"{verb} {resource}", [0, 0.0])
            entry[0] += count
            entry[1] += seconds
    ranked = sorted(requests.items(), key=lambda kv: -kv[1][1])
    waits: dict[str, float] = {}
    wait_before = _samples(before, "apiserver_flowcontrol_request_wait_duration_seconds_sum")
    for labels, total in _samples(after, "apiserver_flowcontrol_request_wait_duration_seconds_sum").items():
        level = _label(labels, "priority_level")
        waits[level] = round(waits.get(level, 0.0) + total - wait_before.get(labels, 0.0), 1)
    return {
        "requests": sum(int(c) for c, _ in requests.values()),
        "request_seconds": round(sum(s for _, s in requests.values()), 1),
        "top_by_seconds": [
            {"request": k, "count": int(c), "seconds": round(t, 1), "mean_ms": round(1000 * t / c, 1)}
            for k, (c, t) in ranked[:top]
        ],
        "flowcontrol_wait_seconds": {k: v for k, v in sorted(waits.items()) if v},
    }


class JobLog:
    """First sight of every PyTorchJob (by run and stage) and of its success, from a watch."""

    def __init__(self) -> None:
        self.first_job: dict[str, float] = {}
        self.added: dict[tuple[str, str, int], float] = {}
        self.succeeded: dict[tuple[str, str, int], float] = {}

    def __call__(self, job: dict[str, Any], seen_at: float) -> None:
        labels = job["metadata"].get("labels") or {}
        run = labels.get(LABEL_RUN)
        if run is None:
            return
        key = next(iter_stage_jobs({"job": job}))
        self.first_job.setdefault(run, seen_at)
        self.added.setdefault(key, seen_at)
        if job_state(job) == "Succeeded":
            self.succeeded.setdefault(key, seen_at)

    def stage_advances(self, stages: list[str]) -> list[float]:
        """Seconds from a job's success to the next stage's job, over every run and stage pair."""
        out = []
        for (run, stage, attempt), done in self.succeeded.items():
            i = stages.index(stage)
            if i + 1 < len(stages) and (run, stages[i + 1], 0) in self.added and attempt == 0:
                out.append(self.added[(run, stages[i + 1], 0)] - done)
        return out


def run_benchmark(args: argparse.Namespace, cluster: Cluster, workdir: Path) -> dict[str, Any]:
    stages = [s for s in args.stages.split(",") if s]
    t0 = time.monotonic()
    install_chart(cluster)
    kube = Kube.for_cluster(cluster)
    cluster.kubectl("create", "namespace", NAMESPACE)
    operator = OperatorProcess(
        operator_kubeconfig(cluster), workdir / "operator.log", resync_seconds=args.resync_seconds
    )
    if args.operator_pythonpath:
        env = operator.process.env or {}
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(args.operator_pythonpath), env.get("PYTHONPATH")])
        )
    operator.start()
    log(f"chart installed, operator pid {operator.pid} up in {time.monotonic() - t0:.1f}s")
    time.sleep(1)  # let the operator settle (initial lists) before measuring it
    cpu_components_before = {n: process_cpu_seconds(p.pid) for n, p in cluster.procs.items()}
    operator_cpu_before = operator.cpu_seconds()
    metrics_before = cluster.kubectl("get", "--raw", "/metrics").stdout

    jobs = JobLog()
    run_phases: dict[str, str] = {}
    list_jobs = partial(kube.custom.list_namespaced_custom_object, *KUBEFLOW[:2], NAMESPACE, KUBEFLOW[2])
    list_runs = partial(kube.custom.list_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL)

    def on_run(run: dict[str, Any], _seen_at: float) -> None:
        run_phases[run["metadata"]["name"]] = (run.get("status") or {}).get("phase") or "None"

    applied: dict[str, float] = {}
    names = [f"run-{i:04d}" for i in range(args.runs)]
    # Watches, not polling: the benchmark must not load the apiserver it measures.
    with Watcher(list_jobs, jobs) as job_watcher, Watcher(list_runs, on_run) as run_watcher:
        start = time.monotonic()
        for name in names:
            manifest = llavarun(name, NAMESPACE, stages, run_duration=args.run_duration, retries=0)
            applied[name] = time.monotonic()
            kube.create_run(manifest)
        apply_seconds = time.monotonic() - start
        log(f"{args.runs} runs created in {apply_seconds:.1f}s")

        deadline = start + args.timeout
        phases: Counter[str] = Counter()
        last_report = 0.0
        while time.monotonic() < deadline:
            phases = Counter(run_phases.get(name, "None") for name in names)
            if phases["Succeeded"] + phases["Failed"] == args.runs:
                break
            if time.monotonic() - last_report > 10:
                log(f"phases {dict(phases)}, jobs seen {len(jobs.added)}")
                last_report = time.monotonic()
            time.sleep(0.2)
        finished = time.monotonic() - start
        log(f"finished: {dict(phases)} after {finished:.1f}s")
        time.sleep(2)  # a late duplicate would show up now
        watch_errors = [*job_watcher.errors, *run_watcher.errors]

    all_jobs = kube.jobs(NAMESPACE)
    per_run: dict[str, list[tuple[str, int]]] = {name: [] for name in names}
    for run, stage, attempt in iter_stage_jobs(all_jobs):
        per_run.setdefault(run, []).append((stage, attempt))
    lost = sorted(n for n, got in per_run.items() if {s for s, _ in got} != set(stages))
    duplicated = sorted(
        n for n, got in per_run.items() if len(got) != len({s for s, _ in got}) or len(got) > len(stages)
    )

    first_job = [jobs.first_job[n] - applied[n] for n in names if n in jobs.first_job]
    operator_cpu = operator.cpu_seconds() - operator_cpu_before
    peak_rss_mb = operator.peak_rss_bytes() / 2**20
    metrics_text = operator.metrics()
    reconciles: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("llavarun_reconciles_total{"):
            trigger = line.split('trigger="', 1)[1].split('"', 1)[0]
            reconciles[trigger] = float(line.rsplit(" ", 1)[1])
    reconcile_errors = operator.metric_sum("llavarun_reconcile_errors_total")
    error_lines = operator.errors()
    components_cpu = {
        n: round((process_cpu_seconds(p.pid) or 0) - (cpu_components_before.get(n) or 0), 1)
        for n, p in cluster.procs.items()
    }
    components_cpu["llavarun-operator"] = round(operator_cpu, 1)
    apiserver = apiserver_stats(metrics_before, cluster.kubectl("get", "--raw", "/metrics").stdout)
    operator.stop()

    first = percentiles(first_job)
    ok = phases["Succeeded"] == args.runs and not lost and not duplicated and len(first_job) == args.runs
    return {
        "ok": ok,
        "runs": args.runs,
        "nodes": args.nodes,
        "stages": stages,
        "run_duration": args.run_duration,
        "resync_seconds": args.resync_seconds,
        "operator_pythonpath": str(args.operator_pythonpath or ""),
        "apply_seconds": round(apply_seconds, 2),
        "wall_seconds_to_all_finished": round(finished, 1),
        "phases": dict(phases),
        "pytorchjobs": len(all_jobs),
        "lost_stage_runs": lost,
        "duplicated_stage_runs": duplicated,
        "first_job_seconds": first,
        "stage_advance_seconds": percentiles(jobs.stage_advances(stages)),
        "operator": {
            "cpu_seconds": round(operator_cpu, 1),
            "cpu_utilisation": round(operator_cpu / finished, 3) if finished else None,
            "peak_rss_mb": round(peak_rss_mb, 1),
            "reconcile_errors": reconcile_errors,
            "reconciles": reconciles,
            "error_log_lines": len(error_lines),
            "first_error_lines": error_lines[:3],
        },
        "control_plane_cpu_seconds": components_cpu,
        "apiserver": apiserver,
        "watch_errors": watch_errors[:5],
        "targets": {
            "first_job_p99_seconds": {
                "target": TARGET_P99_FIRST_JOB_S,
                "value": first["p99"],
                "met": first["p99"] is not None and first["p99"] < TARGET_P99_FIRST_JOB_S,
            },
            "operator_peak_rss_mb": {
                "target": TARGET_PEAK_RSS_MB,
                "value": round(peak_rss_mb, 1),
                "met": peak_rss_mb < TARGET_PEAK_RSS_MB,
            },
        },
        "hardware": hardware(),
        "kubernetes": cluster.expected_version,
        "operator_log": str(operator.log),
    }


def wait_phases(phases: dict[str, str], want: Counter[str], timeout: float) -> Counter[str]:
    """Until the watched runs' phases count at least `want` (or the timeout): the counts."""
    deadline, seen, last_report = time.monotonic() + timeout, Counter(), 0.0
    while time.monotonic() < deadline:
        seen = Counter(phases.values())
        if all(seen[phase] >= n for phase, n in want.items()):
            break
        if time.monotonic() - last_report > 10:
            log(f"phases {dict(seen)}, waiting for {dict(want)}")
            last_report = time.monotonic()
        time.sleep(0.5)
    return seen


def run_steady_state(args: argparse.Namespace, cluster: Cluster, workdir: Path) -> dict[str, Any]:
    """What the operator costs between events with many runs present: `--steady-finished` runs
    done, `--steady-running` runs whose pods run for an hour, then `--steady-seconds` of quiet in
    which only the operator's resync loop works; its CPU over that window, in % of one core."""
    install_chart(cluster)
    kube = Kube.for_cluster(cluster)
    cluster.kubectl("create", "namespace", NAMESPACE)
    operator = OperatorProcess(
        operator_kubeconfig(cluster), workdir / "operator.log", resync_seconds=args.resync_seconds
    )
    operator.start()
    phases: dict[str, str] = {}
    list_runs = partial(kube.custom.list_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL)

    def on_run(run: dict[str, Any], _seen_at: float) -> None:
        phases[run["metadata"]["name"]] = (run.get("status") or {}).get("phase") or "None"

    with Watcher(list_runs, on_run):
        t0 = time.monotonic()
        for i in range(args.steady_finished + args.steady_running):
            done = i < args.steady_finished
            kube.create_run(
                llavarun(
                    f"run-{i:04d}", NAMESPACE, ["prepare"], run_duration="1s" if done else "1h", retries=0
                )
            )
        log(f"{len(phases)} runs seen after creating them in {time.monotonic() - t0:.1f}s")
        want = Counter({"Succeeded": args.steady_finished, "Running": args.steady_running})
        reached = wait_phases(phases, want, args.timeout)
        settled = time.monotonic() - t0
        log(
            f"steady state {dict(reached)} after {settled:.1f}s; settling, then measuring {args.steady_seconds}s"
        )
        time.sleep(max(5.0, args.resync_seconds / 2))
        reconciles_before = operator.metric_sum("llavarun_reconciles_total")
        cpu_before, window_start = operator.cpu_seconds(), time.monotonic()
        time.sleep(args.steady_seconds)
        cpu = operator.cpu_seconds() - cpu_before
        window = time.monotonic() - window_start
        reconciles = operator.metric_sum("llavarun_reconciles_total") - reconciles_before
        end_phases = Counter(phases.values())
    rss_mb = operator.peak_rss_bytes() / 2**20
    errors = operator.metric_sum("llavarun_reconcile_errors_total")
    operator.stop()
    utilisation = 100.0 * cpu / window
    ok = all(reached[p] >= n for p, n in want.items()) and end_phases == reached
    return {
        "ok": ok,
        "mode": "steady-state",
        "runs": {"finished": args.steady_finished, "running": args.steady_running},
        "phases": dict(end_phases),
        "seconds_to_steady_state": round(settled, 1),
        "window_seconds": round(window, 1),
        "resync_seconds": args.resync_seconds,
        "operator": {
            "cpu_seconds_in_window": round(cpu, 2),
            "cpu_percent_of_one_core": round(utilisation, 2),
            "reconciles_in_window": reconciles,
            "peak_rss_mb": round(rss_mb, 1),
            "reconcile_errors": errors,
        },
        "targets": {
            "steady_cpu_percent": {
                "target": TARGET_STEADY_CPU_PERCENT,
                "value": round(utilisation, 2),
                "met": utilisation < TARGET_STEADY_CPU_PERCENT,
            },
            "operator_peak_rss_mb": {
                "target": TARGET_PEAK_RSS_MB,
                "value": round(rss_mb, 1),
                "met": rss_mb < TARGET_PEAK_RSS_MB,
            },
        },
        "hardware": hardware(),
        "kubernetes": cluster.expected_version,
        "operator_log": str(operator.log),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=128, help="fake GPU nodes (8 x nvidia.com/gpu each)")
    parser.add_argument("--stages", default=",".join(ALL_STAGES), help="comma-separated stages of every run")
    parser.add_argument("--run-duration", default="1s", help="how long kwok lets each pod run (Go duration)")
    parser.add_argument(
        "--resync-seconds", type=float, default=30.0, help="the operator's resync period (chart default 30)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for every run to finish")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument(
        "--operator-pythonpath",
        type=Path,
        help="run the operator with this directory first on PYTHONPATH (A/B a patched llava_operator copy)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the workdir (logs) even on success")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed too")
    parser.add_argument(
        "--steady", action="store_true", help="measure the steady state instead: many runs present, no events"
    )
    parser.add_argument("--steady-finished", type=int, default=800, help="finished runs in the steady state")
    parser.add_argument("--steady-running", type=int, default=200, help="running runs in the steady state")
    parser.add_argument(
        "--steady-seconds", type=float, default=120.0, help="length of the measured quiet window"
    )
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="llavarun-scale-"))
    cluster = Cluster(workdir=workdir / "cluster", gpu_nodes=args.nodes)
    ok = False
    try:
        t0 = time.monotonic()
        log(f"starting the control plane with {args.nodes} GPU nodes in {workdir}")
        cluster.start(FULL)
        log(f"control plane up in {time.monotonic() - t0:.1f}s")
        summary = (run_steady_state if args.steady else run_benchmark)(args, cluster, workdir)
        ok = summary["ok"] and (not args.strict or all(t["met"] for t in summary["targets"].values()))
        text = json.dumps(summary, indent=2)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
    finally:
        cluster.stop(remove_workdir=False)
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept logs in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
