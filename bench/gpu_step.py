"""One-GPU step throughput and MFU of LLaVA-1.5 at the real 7B and 13B shapes (random weights).

    python bench/gpu_step.py                 # 7B and 13B, pretrain and finetune, JSON on stdout
    python bench/gpu_step.py --tiny          # tiny shapes, for CPU (tests)

What a step is, per stage (LLaVA-1.5 recipe, bf16, gradient checkpointing on the LLM):

- pretrain: CLIP ViT-L/14-336 and the LLM frozen, the 2-layer projector trained; every sample one
  image (576 tokens) plus `--pretrain-text` caption tokens.
- finetune: LLM and projector trained, CLIP frozen; 576 image tokens plus `--finetune-text`.
  Full AdamW state for a whole 7B/13B LLM does not fit one 80 GB card (16 bytes/parameter), so the
  finetune step keeps parameters, gradients and AdamW moments in bf16 (8 bytes/parameter) and, when
  even that does not fit, uses the first K decoder layers at the real width (K reported as
  `layers`). Per-layer work is what MFU measures; fewer layers make the embedding/LM-head share a
  little larger.

MFU uses llava_trainer.flops (4N/6N per real token + attention + CLIP forward) and
FlagPerf's 2N/6N per padded token (here real = padded: no padding). Self-contained on purpose: it
needs torch and transformers only, no DeepSpeed or pydantic, so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

import torch

# Pure Python FLOP accounting (imports neither DeepSpeed nor pydantic), shared with the trainer.
from llava_trainer.flops import LlavaShape, flagperf_params, mfu_percent, sample_flops


def _accelerator_table() -> Any:
    """llava_operator/api/profiles.py, the one peak table, loaded by path: importing it as a
    package module would run llava_operator.api's __init__, which needs pydantic."""
    path = Path(__file__).resolve().parents[1] / "operator" / "llava_operator" / "api" / "profiles.py"
    spec = importlib.util.spec_from_file_location("llavarun_accelerator_profiles", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def device_peak_tflops(device_name: str) -> float | None:
    device = _accelerator_table().known_device(device_name)
    return device.peak_tflops if device else None


VICUNA = {
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "13b": {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
    },
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}
CLIP_TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
}
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
VOCAB = 32064  # Vicuna's 32000 + <image> + <pad>, padded to a multiple of 64 (HF llava-1.5)
IMAGE_TOKEN = 32000


@dataclass
class Case:
    model: str
    stage: str
    micro_batch: int
    text_tokens: int
    layers: int | None = None  # None: the full depth
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    model: str
    stage: str
    layers: int
    full_layers: int
    micro_batch: int
    seq_len: int
    image_tokens: int
    steps: int
    step_seconds: float
    samples_per_second: float
    tokens_per_second: float
    model_tflops_per_second: float
    mfu: float | None
    mfu_flagperf: float | None
    flagperf_n: float
    memory_gib: float | None
    loss: float
    attention: str
    optimizer: str
    notes: list[str]


def device_and_dtype(tiny: bool) -> tuple[torch.device, torch.dtype, str]:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, torch.cuda.get_device_name()
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        device = accelerator.current_accelerator()
        return torch.device(device.type, 0), torch.bfloat16, device.type
    if not tiny:
        raise SystemExit("gpu_step: no accelerator found; use --tiny to try the script on CPU")
    return torch.device("cpu"), torch.float32, platform.processor() or "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize()


def attention_implementation(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def llava_config(model: str, layers: int | None, tiny: bool) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = dict(VICUNA[model])
    if layers is not None:
        text["num_hidden_layers"] = layers
    vision = CLIP_TINY if tiny else CLIP_L_336
    vocab = 256 if tiny else VOCAB
    return LlavaConfig(
        text_config=LlamaConfig(
            **text,
            vocab_size=vocab,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        vision_config=CLIPVisionConfig(**vision),
        image_token_index=vocab - 64 if tiny else IMAGE_TOKEN,
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def finetune_layers_that_fit(model: str, device: torch.device, bytes_per_param: int = 8) -> int | None:
    """Decoder layers whose bf16 weights + grads + AdamW moments fit ~65% of the card (None: all)."""
    if device.type != "cuda":
        return None
    spec = VICUNA[model]
    d, ffn, full = spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"]
    per_layer = 4 * d * d + 3 * d * ffn
    fixed = 2 * VOCAB * d
    budget = 0.65 * torch.cuda.get_device_properties(device).total_memory / bytes_per_param
    fits = int((budget - fixed) // per_layer)
    return None if fits >= full else max(1, fits)


def parts(model: Any) -> tuple[Any, Any, Any, Any]:
    """(vision tower, projector, decoder stack, LM head) across transformers layouts: >= 4.52 nests
    them under `model.model`; older versions keep a LlamaForCausalLM as `language_model`."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "vision_tower"):
        return inner.vision_tower, inner.multi_modal_projector, inner.language_model, model.lm_head
    language_model = model.language_model
    return model.vision_tower, model.multi_modal_projector, language_model.model, language_model.lm_head


def build(
    config: Any, stage: str, device: torch.device, dtype: torch.dtype, attention: str, checkpointing: bool
):
    from transformers import LlavaForConditionalGeneration

    config.text_config._attn_implementation = attention
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = LlavaForConditionalGeneration._from_config(config, torch_dtype=dtype)
    model.config.use_cache = False
    vision, projector, decoder, lm_head = parts(model)
    vision.requires_grad_(False)
    decoder.requires_grad_(stage == "finetune")
    lm_head.requires_grad_(stage == "finetune")
    projector.requires_grad_(True)
    if checkpointing:
        enable = getattr(decoder, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def batch(config: Any, micro_batch: int, text_tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One image per sample, placed first (as LLaVA's templates put it), then text; all real tokens."""
    image_tokens = config.image_seq_length
    vocab = config.text_config.vocab_size
    text = torch.randint(
        3, min(config.image_token_index, vocab) - 1, (micro_batch, text_tokens), device=device
    )
    images = torch.full((micro_batch, image_tokens), config.image_token_index, device=device)
    input_ids = torch.cat([text[:, :1], images, text[:, 1:]], dim=1)
    labels = input_ids.masked_fill(input_ids == config.image_token_index, -100)
    labels[:, :1] = -100
    size = config.vision_config.image_size
    pixel_values = torch.randn(micro_batch, 3, size, size, device=device, dtype=dtype)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


def train_step(model: Any, inputs: dict, trainable: list, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure(case: Case, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Result:
    config = llava_config(case.model, case.layers, args.tiny)
    full_layers = VICUNA[case.model]["num_hidden_layers"]
    attention = attention_implementation(device)
    model = build(config, case.stage, device, dtype, attention, not args.no_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0, fused=fused)
    inputs = batch(config, case.micro_batch, case.text_tokens, device, dtype)

    for _ in range(args.warmup):
        train_step(model, inputs, trainable, optimizer)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(model, inputs, trainable, optimizer)
    synchronize(device)
    seconds = (time.perf_counter() - started) / args.steps

    shape = LlavaShape.from_config(config)
    seq_len = int(inputs["input_ids"].shape[1])
    flops = case.micro_batch * sample_flops(shape, case.stage, seq_len, 1)  # type: ignore[arg-type]
    full_depth = case.layers is None or case.layers >= full_layers
    n_flagperf = flagperf_params(shape.llm_params) if full_depth else float(shape.llm_params)
    flagperf = (2 if case.stage == "pretrain" else 6) * n_flagperf * case.micro_batch * seq_len
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = Result(
        model=case.model,
        stage=case.stage,
        layers=shape.layers,
        full_layers=full_layers,
        micro_batch=case.micro_batch,
        seq_len=seq_len,
        image_tokens=shape.image_tokens,
        steps=args.steps,
        step_seconds=round(seconds, 4),
        samples_per_second=round(case.micro_batch / seconds, 3),
        tokens_per_second=round(case.micro_batch * seq_len / seconds, 1),
        model_tflops_per_second=round(flops / seconds / 1e12, 2),
        mfu=_round(mfu_percent(flops, seconds, 1, args.peak)),
        mfu_flagperf=_round(mfu_percent(flagperf, seconds, 1, args.peak)),
        flagperf_n=n_flagperf,
        memory_gib=round(memory, 2) if memory is not None else None,
        loss=round(float(loss), 4),
        attention=attention,
        optimizer=f"torch AdamW ({'fused, ' if fused else ''}{str(dtype).removeprefix('torch.')} states)",
        notes=case.notes,
    )
    del model, optimizer, inputs, trainable
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def run_case(case: Case, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Result | dict:
    """Measure, halving the micro batch on out-of-memory (noted in the result)."""
    while True:
        try:
            return measure(case, args, device, dtype)
        except OUT_OF_MEMORY:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if case.micro_batch == 1:
                return {"model": case.model, "stage": case.stage, "error": "out of memory at micro batch 1"}
            case.notes.append(f"micro batch {case.micro_batch} ran out of memory; halved")
            case.micro_batch //= 2


def cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    planned = []
    for model in args.models:
        for stage in args.stages:
            if stage == "pretrain":
                planned.append(Case(model, stage, args.pretrain_micro_batch, args.pretrain_text))
                continue
            layers = None if args.tiny else (args.finetune_layers or finetune_layers_that_fit(model, device))
            notes = []
            if layers is not None and layers < VICUNA[model]["num_hidden_layers"]:
                notes.append(
                    f"finetune uses {layers} of {VICUNA[model]['num_hidden_layers']} decoder layers at full width "
                    "so bf16 weights + grads + AdamW moments fit one card"
                )
            planned.append(Case(model, stage, args.finetune_micro_batch, args.finetune_text, layers, notes))
    return planned


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="7b,13b", help="comma-separated: 7b, 13b")
    parser.add_argument("--stages", default="pretrain,finetune", help="comma-separated: pretrain, finetune")
    parser.add_argument("--pretrain-micro-batch", type=int, default=32, help="FlagPerf's LBS (halved on OOM)")
    parser.add_argument("--finetune-micro-batch", type=int, default=16, help="FlagPerf's LBS (halved on OOM)")
    parser.add_argument(
        "--pretrain-text", type=int, default=32, help="text tokens per pretrain sample (+576)"
    )
    parser.add_argument(
        "--finetune-text", type=int, default=576, help="text tokens per finetune sample (+576)"
    )
    parser.add_argument(
        "--finetune-layers", type=int, default=0, help="decoder layers for finetune (0: auto)"
    )
    parser.add_argument("--steps", type=int, default=5, help="measured steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (allocator, kernels)")
    parser.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak (default: by name)")
    parser.add_argument("--time-budget", type=float, default=480.0, help="skip remaining cases after (s)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    args = parser.parse_args(argv)
    args.models = ["tiny"] if args.tiny else [m.strip() for m in args.models.split(",") if m.strip()]
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if args.tiny:
        args.pretrain_micro_batch, args.finetune_micro_batch = 2, 2
        args.pretrain_text, args.finetune_text = 8, 16
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    unknown = set(args.models) - set(VICUNA) | set(args.stages) - {"pretrain", "finetune"}
    if unknown:
        parser.error(f"unknown models/stages: {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    device, dtype, name = device_and_dtype(args.tiny)
    env_peak = os.environ.get("LLAVARUN_PEAK_TFLOPS")
    args.peak = args.peak_tflops or (float(env_peak) if env_peak else None) or device_peak_tflops(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    import transformers

    report: dict[str, Any] = {
        "device": name,
        "peak_tflops": args.peak,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "gradient_checkpointing": not args.no_checkpointing,
        "results": [],
    }
    for case in cases(args, device):
        if time.monotonic() - started > args.time_budget:
            report["results"].append({"model": case.model, "stage": case.stage, "skipped": "time budget"})
            continue
        result = run_case(case, args, device, dtype)
        report["results"].append(asdict(result) if isinstance(result, Result) else result)
        print(json.dumps(report["results"][-1]), file=sys.stderr, flush=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=2, allow_nan=False, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)
    ok = all("error" not in r and math.isfinite(r.get("loss", 0.0)) for r in report["results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
