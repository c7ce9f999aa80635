"""The end-of-run report: markdown with per-stage times, throughput and MMMU, PNG loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .runner import StageOutcome


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


def _num(value: Any, spec: str = ".4g") -> str:
    return "—" if value is None else format(value, spec)


def write_report(
    out_dir: Path,
    run_name: str,
    stage_order: list[str],
    status: dict[str, Any],
    outcomes: list[StageOutcome],
    history: dict[str, list[tuple[int, float]]],
) -> Path:
    """Write report.md (+ loss_<stage>.png) into out_dir and return the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = status.get("results") or {}
    stages = status.get("stages") or {}
    lines = [
        f"# LlavaRun {run_name}",
        "",
        f"Phase: **{status.get('phase', 'Unknown')}**",
        "",
        "| stage | phase | attempts | time (s) | samples/s | real tokens/s | MFU % | final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    seconds = {o.stage.value: o.seconds for o in outcomes}
    for name in [s for s in stage_order if s in stages]:
        entry, res = stages[name], results.get(name) or {}
        lines.append(
            f"| {name} | {entry.get('phase', '')} | {entry.get('attempts', '')} | "
            f"{_num(seconds.get(name) or res.get('durationSeconds'), '.1f')} | "
            f"{_num(res.get('samplesPerSecond'), '.3g')} | {_num(res.get('tokensPerSecond'), '.4g')} | "
            f"{_num(res.get('mfu'), '.3g')} | {_num(res.get('finalLoss'))} |"
        )
    prep = results.get("prepare")
    if prep:
        lines += ["", "## Data (prepare)", "", "| source | samples |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted((prep.get("samples") or {}).items())]
        lines += [
            "",
            f"Missing images: {prep.get('missingImages', 0)}, corrupt: {prep.get('corruptImages', 0)}, "
            f"OCR-VQA not .jpg: {prep.get('ocrVqaNotJpg', 0)}.",
        ]
    ev = results.get("evaluate")
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
    for name, points in history.items():
        if len(points) >= 1 and name in ("pretrain", "finetune"):
            png = out_dir / f"loss_{name}.png"
            plot_loss(points, f"{run_name} {name} loss", png)
            lines += ["", f"## {name} loss", "", f"![{name} loss]({png.name})"]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
