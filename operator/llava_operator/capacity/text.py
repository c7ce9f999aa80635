"""The plan as a person reads it: one table per stage, the verdict, the fix, the assumptions."""

from __future__ import annotations

from typing import Any

MEMORY_ROWS = (
    ("parameters", "parameters (16-bit; trained and frozen)"),
    ("gradients", "gradients (16-bit + fp32 partition)"),
    ("optimizer", "optimizer (fp32 master + Adam moments)"),
    ("activations", "activations (peak of the micro-batch)"),
    ("overhead", "overhead (ZeRO buckets, context)"),
    ("total", "total"),
    ("capacity", "device memory"),
)


def render_plan(plan: dict[str, Any]) -> str:
    device = plan["device"]
    lines = [
        f"LlavaRun {plan['run']}: {plan['model']} on {device['model']} "
        f"({device['memoryGiB']:g} GiB, {device['peakTflops']:g} TFLOP/s bf16; {device['source']})",
    ]
    for name, stage in plan["stages"].items():
        gib = stage["memoryGiB"]
        verdict = "fits" if stage["fits"] else "DOES NOT FIT"
        lines += [
            "",
            f"{name}: {stage['devices']} devices, micro batch {stage['microBatchSize']} x "
            f"{stage['sequenceLength']} tokens, ZeRO-{stage['zeroStage']}, {stage['precision']}, "
            f"gradient checkpointing {'on' if stage['gradientCheckpointing'] else 'off'}",
            "  memory per device                          GiB",
        ]
        lines += [f"    {label:<40} {gib[key]:>7.2f}" for key, label in MEMORY_ROWS]
        other = "without" if stage["gradientCheckpointing"] else "with"
        lines.append(
            f"    (activations {other} checkpointing: "
            f"{gib['activationsWithoutCheckpointing' if other == 'without' else 'activations']:.2f} GiB; "
            f"CLIP forward {gib['clipForward']:.2f} GiB, before the LLM's)"
        )
        lines.append(f"  verdict: {verdict} ({gib['total']:.1f} of {gib['capacity']:g} GiB)")
        fix = stage.get("fix")
        if not stage["fits"]:
            if fix:
                lines.append(
                    f"  cheapest fix: {fix['change']} -> {fix['memoryGiB']['total']:.1f} GiB per device "
                    f"on {fix['devices']} devices"
                )
            else:
                lines.append("  no single change fits (checkpointing, micro batch, ZeRO-3, up to 8x nodes)")
        lines += [
            f"  time: {stage['samples']:,} samples, mean {stage['meanTokens']:g} tokens, "
            f"{stage['teraflops'] / 1e6:.3g} EFLOP at {stage['mfu']:g}% MFU ({stage['mfuSource']})",
            f"        {stage['hours']:.1f} h wall, {stage['gpuHours']:.0f} GPU-hours, ends {stage['end']} "
            "if started now",
            "  assumptions:",
            *[f"    - {a}" for a in stage["assumptions"]],
        ]
    lines += ["", f"all training stages: {plan['hours']:.1f} h, {plan['gpuHours']:.0f} GPU-hours"]
    return "\n".join(lines) + "\n"
