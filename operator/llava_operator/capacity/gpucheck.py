"""bench/gpu_check.sh's second half: bench/gpu_step.py's measurements beside the plan's numbers
for the same configuration (one device, its micro batch, sequence length and layer count).

    python -m llava_operator.capacity.gpucheck gpu_step.json [--json]

Predicted memory is what torch's allocator should report at peak (model states + activations;
no CUDA context), with gpu_step's optimizer (torch AdamW, weights, gradients and moments in the weights' dtype); predicted step time is at the plan's default MFU. Torch, transformers and
bench/gpu_step.py (loaded by path) build each case's config; no pydantic, no DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from llava_trainer.flops import LlavaShape, sample_flops

from .geometry import Geometry
from .memory import GIB, step_memory
from .timing import DEFAULT_MFU

GPU_STEP = Path(__file__).resolve().parents[3] / "bench" / "gpu_step.py"


def _gpu_step() -> Any:
    spec = importlib.util.spec_from_file_location("llavarun_gpu_step", GPU_STEP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def predict(
    result: dict[str, Any], shape: LlavaShape, *, peak: float | None, checkpointing: bool
) -> dict[str, Any]:
    """The plan's numbers for one measured case."""
    stage = result["stage"]
    memory = step_memory(
        Geometry(result["model"], shape),
        stage,
        precision="bf16" if result.get("dtype", "bfloat16") != "float32" else "fp32",
        zero_stage=0,
        devices=1,
        micro_batch=result["micro_batch"],
        seq_len=result["seq_len"],
        images_per_sample=1,
        checkpointing=checkpointing,
        optimizer="torch",
        context_gib=0.0,
    )
    flops = result["micro_batch"] * sample_flops(shape, stage, result["seq_len"], 1)
    step = flops / (peak * 1e12 * DEFAULT_MFU / 100) if peak else None
    full = shape if result["layers"] >= result["full_layers"] else None
    states = memory.states
    return {
        "memory_gib": round(memory.allocated / GIB, 4),
        "memory_bytes": {
            "parameters": states.parameters,
            "gradients": states.gradients,
            "optimizer": states.optimizer,
            "activations": memory.activations.peak,
        },
        "activation_parts_gib": memory.parts(),
        "step_seconds_at_default_mfu": round(step, 4) if step else None,
        "default_mfu": DEFAULT_MFU,
        "full_depth": full is not None,
    }


def compare(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measured case: measured and predicted side by side."""
    gpu_step = _gpu_step()
    tiny = report.get("tiny") or all(r.get("model") == "tiny" for r in report["results"])
    rows = []
    for result in report["results"]:
        if "error" in result or "skipped" in result:
            rows.append({**result})
            continue
        config = gpu_step.llava_config(result["model"], result["layers"], tiny)
        shape = LlavaShape.from_config(config)
        predicted = predict(
            {**result, "dtype": report.get("dtype")},
            shape,
            peak=report.get("peak_tflops"),
            checkpointing=report.get("gradient_checkpointing", True),
        )
        row = {
            "case": f"{result['model']} {result['stage']}",
            "layers": f"{result['layers']}/{result['full_layers']}",
            "micro_batch": result["micro_batch"],
            "seq_len": result["seq_len"],
            "tokens_per_second": result["tokens_per_second"],
            "mfu": result["mfu"],
            "mfu_flagperf": result["mfu_flagperf"],
            "step_seconds": result["step_seconds"],
            "memory_gib": result["memory_gib"],
            "plan": predicted,
        }
        if result["layers"] < result["full_layers"]:
            full = gpu_step.llava_config(result["model"], None, tiny)
            per_sample = sample_flops(shape, result["stage"], result["seq_len"], 1)
            full_sample = sample_flops(LlavaShape.from_config(full), result["stage"], result["seq_len"], 1)
            row["full_depth_tokens_per_second_at_measured_mfu"] = round(
                result["tokens_per_second"] * per_sample / full_sample, 1
            )
        rows.append(row)
    return rows


def render(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"GPU check on {report.get('device')} (peak {report.get('peak_tflops')} TFLOP/s), "
        f"{report.get('dtype')}, torch {report.get('torch')}, transformers {report.get('transformers')}",
        f"{'case':<16} {'layers':>7} {'mb x seq':>10} {'tok/s':>9} {'MFU %':>6} {'FP MFU %':>8} "
        f"{'step s':>7} {'plan s':>7} {'mem GiB':>8} {'plan GiB':>8}",
    ]
    for row in rows:
        if "case" not in row:
            lines.append(f"{row.get('model')} {row.get('stage')}: {row.get('error') or row.get('skipped')}")
            continue
        plan = row["plan"]
        lines.append(
            f"{row['case']:<16} {row['layers']:>7} {row['micro_batch']:>4} x {row['seq_len']:<4} "
            f"{row['tokens_per_second']:>9.1f} {_fmt(row['mfu']):>6} {_fmt(row['mfu_flagperf']):>8} "
            f"{row['step_seconds']:>7.3f} {_fmt(plan['step_seconds_at_default_mfu'], '.3f'):>7} "
            f"{_fmt(row['memory_gib']):>8} {plan['memory_gib']:>8.2f}"
        )
        if "full_depth_tokens_per_second_at_measured_mfu" in row:
            lines.append(
                f"{'':<16} full depth at the measured MFU: "
                f"{row['full_depth_tokens_per_second_at_measured_mfu']:.1f} tokens/s (per-layer extrapolation)"
            )
    lines.append(
        f"plan s: step time at the plan's default MFU ({DEFAULT_MFU:g}%); plan GiB: allocator peak predicted"
    )
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="bench/gpu_step.py's JSON report")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    rows = compare(report)
    sys.stdout.write(json.dumps(rows, indent=2) + "\n" if args.json else render(report, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
