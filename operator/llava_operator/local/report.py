"""A run's report from its status: per stage time, samples/s, real tokens/s per chip, MFU in both
conventions, the accelerator and count, the data counts and MMMU; markdown (+ PNG loss curves
when the loss history is at hand) or JSON.

One module for both readers: `llavarun local` writes report.md at the end of a run
(`write_report`), `llavarun report` prints the same report for a finished or running LlavaRun
(`run_report` + `report_markdown`). FlagPerf's tables give tokens/s per chip on *padded* tokens
and MFU as 2N (pretrain) / 6N (finetune) per padded token: the `flagperf` columns are in those
terms (padded tokens/s derived from the FlagPerf MFU, the peak and FlagPerf's N).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..api.status import seconds_between

TRAINING = ("pretrain", "finetune")


def plot_loss(history: list[tuple[int, float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*history, strict=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, marker="o", markersize=3, linewidth=1.2)
    ax.set(title=title, xlabel="optimizer step", ylabel="loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_report(
    name: str,
    status: dict[str, Any],
    *,
    stage_order: list[str] | None = None,
    accelerator: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as data. `accelerator`: {"model", "devices": {stage: count}, "peakTflops",
    "flagperfN": {stage: N}} where known (from the spec)."""
    results, stages = status.get("results") or {}, status.get("stages") or {}
    accelerator = accelerator or {}
    order = stage_order or [
        s for s in ("prepare", "pretrain", "finetune", "evaluate") if s in stages or s in results
    ]
    rows: dict[str, Any] = {}
    for stage in order:
        entry, res = stages.get(stage) or {}, results.get(stage) or {}
        devices = (accelerator.get("devices") or {}).get(stage)
        row: dict[str, Any] = {
            "phase": entry.get("phase"),
            "attempts": entry.get("attempts"),
            "seconds": seconds_between(entry.get("startTime"), entry.get("completionTime"))
            or res.get("durationSeconds"),
        }
        if stage in TRAINING:
            tokens = res.get("tokensPerSecond")
            row |= {
                "devices": devices,
                "samplesPerSecond": res.get("samplesPerSecond"),
                "tokensPerSecondPerChip": tokens / devices if tokens is not None and devices else None,
                "mfu": res.get("mfu"),
                "mfuFlagperf": res.get("mfuFlagperf"),
                "flagperfTokensPerSecondPerChip": _flagperf_tokens(
                    stage, res.get("mfuFlagperf"), accelerator
                ),
                "finalLoss": res.get("finalLoss"),
                "steps": res.get("steps"),
            }
        rows[stage] = row
    progress = status.get("progress") or {}
    report: dict[str, Any] = {
        "run": name,
        "phase": status.get("phase"),
        "accelerator": {k: v for k, v in accelerator.items() if k in ("model", "peakTflops", "source")},
        "stages": rows,
    }
    if status.get("phase") not in ("Succeeded", "Failed") and progress:
        report["progress"] = progress
    if results.get("prepare"):
        report["data"] = results["prepare"]
    if results.get("evaluate"):
        report["mmmu"] = results["evaluate"]
    return report


def _flagperf_tokens(stage: str, mfu_flagperf: float | None, accelerator: dict[str, Any]) -> float | None:
    """Padded tokens/s per chip from FlagPerf's MFU: mfu x peak / (2N or 6N)."""
    peak, n = accelerator.get("peakTflops"), (accelerator.get("flagperfN") or {}).get(stage)
    if mfu_flagperf is None or not peak or not n:
        return None
    return mfu_flagperf / 100 * peak * 1e12 / ((2 if stage == "pretrain" else 6) * n)


def _num(value: Any, spec: str = ".4g") -> str:
    return "—" if value is None else format(value, spec)


def report_markdown(report: dict[str, Any]) -> list[str]:
    """The report's markdown lines (without loss curves)."""
    acc = report.get("accelerator") or {}
    lines = [f"# LlavaRun {report['run']}", "", f"Phase: **{report.get('phase') or 'Unknown'}**"]
    if acc.get("model"):
        lines += ["", f"Accelerator: {acc['model']} (peak {_num(acc.get('peakTflops'), 'g')} TFLOP/s bf16)"]
    lines += [
        "",
        "| stage | phase | attempts | time (s) | devices | samples/s | real tokens/s/chip | MFU % | "
        "FlagPerf MFU % | FlagPerf tokens/s/chip | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["stages"].items():
        lines.append(
            f"| {name} | {row.get('phase') or ''} | {_num(row.get('attempts'), 'd')} | "
            f"{_num(row.get('seconds'), '.1f')} | {_num(row.get('devices'), 'd')} | "
            f"{_num(row.get('samplesPerSecond'), '.3g')} | {_num(row.get('tokensPerSecondPerChip'), '.4g')} | "
            f"{_num(row.get('mfu'), '.3g')} | {_num(row.get('mfuFlagperf'), '.3g')} | "
            f"{_num(row.get('flagperfTokensPerSecondPerChip'), '.4g')} | {_num(row.get('finalLoss'))} |"
        )
    progress = report.get("progress")
    if progress:
        lines += [
            "",
            f"Running: {progress.get('stage')} step {progress.get('step')}/{progress.get('totalSteps')}, "
            f"loss {_num(progress.get('loss'))}, MFU {_num(progress.get('mfu'), '.3g')} %, "
            f"ETA {_num(progress.get('etaSeconds'), 'd')} s",
        ]
    prep = report.get("data")
    if prep:
        lines += ["", "## Data (prepare)", "", "| source | samples |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted((prep.get("samples") or {}).items())]
        lines += [
            "",
            f"Missing images: {prep.get('missingImages', 0)}, corrupt: {prep.get('corruptImages', 0)}, "
            f"OCR-VQA not .jpg: {prep.get('ocrVqaNotJpg', 0)}.",
        ]
    ev = report.get("mmmu")
    if ev:
        lines += [
            "",
            f"## MMMU ({ev.get('split', 'validation')}, {ev.get('questions', '?')} questions)",
            "",
            "| discipline | accuracy % |",
            "|---|---|",
        ]
        lines += [f"| {d} | {_num(a, '.1f')} |" for d, a in sorted((ev.get("disciplines") or {}).items())]
        lines += [f"| **overall** | **{_num(ev.get('overall'), '.1f')}** |"]
    return lines


def write_report(
    out_dir: Path,
    run_name: str,
    stage_order: list[str],
    status: dict[str, Any],
    history: dict[str, list[tuple[int, float]]],
    accelerator: dict[str, Any] | None = None,
) -> Path:
    """Write report.md (+ loss_<stage>.png) into out_dir and return the markdown path; stage times
    come from the status's stage records."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = status.get("stages") or {}
    order = [s for s in stage_order if s in stages]
    report = run_report(run_name, status, stage_order=order, accelerator=accelerator)
    lines = report_markdown(report)
    for name, points in history.items():
        if len(points) >= 1 and name in TRAINING:
            png = out_dir / f"loss_{name}.png"
            plot_loss(points, f"{run_name} {name} loss", png)
            lines += ["", f"## {name} loss", "", f"![{name} loss]({png.name})"]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
