"""FLOP accounting and MFU: what a sample costs, and what fraction of the peak a run reached.

Two MFU conventions are reported side by side:

- ours: model FLOPs actually needed per sample, on real (unpadded) tokens. LLM dense matmuls
  4·N·T in pretrain (frozen LLM: forward 2N plus the activation-gradient backward 2N that the
  projector's gradients need) or 6·N·T in finetune; a LoRA finetune is the frozen LLM's 4·N·T
  plus 6·N_a·T for the N_a adapter parameters (forward, activation and weight gradients); attention QKᵀ and AV 12·T²·d·L (forward and
  backward, both stages); the CLIP forward for every image; the trained projector 6·N_proj per
  image token. Gradient-checkpoint recomputation is not counted (that would be HFU).
- FlagPerf's: 2·N (pretrain) or 6·N (finetune, LoRA too) per *padded* token, N the nominal LLM
  size (7e9, 13e9), nothing else; so numbers compare with the published FlagPerf tables.

N here counts the LLM's matmul weights: every linear layer plus the LM head, not the input
embedding (a lookup) or the norms. The peak per device, MFU's denominator, comes from the one
accelerator table (llava_operator.api.profiles). This module is plain Python at import time
(the table loads lazily) so bench/gpu_step.py and the operator's capacity plan use it without
torch, DeepSpeed or pydantic.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Stage = Literal["pretrain", "finetune"]


@dataclass(frozen=True)
class LlavaShape:
    """The dimensions FLOP counting needs, from a LlavaConfig (or any config shaped like one)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    channels: int = 3
    feature_layers: int = 1
    adapter_params: int = 0
    """Trained LoRA adapter parameters on the LLM (its own weights then frozen); 0: no adapters."""

    @classmethod
    def from_config(cls, config: Any) -> LlavaShape:
        text, vision = config.text_config, config.vision_config
        heads = text.num_attention_heads
        layer = getattr(config, "vision_feature_layer", -2)
        return cls(
            hidden=text.hidden_size,
            layers=text.num_hidden_layers,
            intermediate=text.intermediate_size,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab=text.vocab_size,
            vision_hidden=vision.hidden_size,
            vision_layers=vision.num_hidden_layers,
            vision_intermediate=vision.intermediate_size,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            channels=getattr(vision, "num_channels", 3),
            feature_layers=1 if isinstance(layer, int) else len(layer),
        )

    @property
    def image_tokens(self) -> int:
        """LLM tokens per image: one per patch (CLS dropped, 'default' select strategy)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def llm_matmul_params(self) -> int:
        """N: attention and MLP (SwiGLU) weights of every layer plus the LM head."""
        per_layer = sum(d_in * d_out for d_in, d_out in self.decoder_linears().values())
        return self.layers * per_layer + self.hidden * self.vocab

    def decoder_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer, by module name (LLaMA's)."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q_out),
            "k_proj": (self.hidden, kv_out),
            "v_proj": (self.hidden, kv_out),
            "o_proj": (q_out, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }

    def lora_params(self, r: int, targets: Sequence[str] = ()) -> int:
        """Parameters of rank-`r` adapters on the `targets` linear layers (empty: all of them) of
        every decoder layer: r x (in + out) each (A is r x in, B is out x r)."""
        linears = self.decoder_linears()
        chosen = targets or list(linears)
        return self.layers * sum(r * sum(linears[name]) for name in chosen)

    @property
    def llm_params(self) -> int:
        """All LLM parameters (adds the input embedding and the RMSNorm weights)."""
        return self.llm_matmul_params + self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    @property
    def projector_params(self) -> int:
        d_in = self.vision_hidden * self.feature_layers
        return d_in * self.hidden + self.hidden + self.hidden * self.hidden + self.hidden

    def clip_forward_flops(self) -> float:
        """One image through CLIP: patch embedding, every encoder layer's matmuls and attention."""
        tokens = self.image_tokens + 1  # + CLS
        d, ffn = self.vision_hidden, self.vision_intermediate
        patch_embed = 2 * self.channels * self.patch_size**2 * d * self.image_tokens
        layer_matmuls = 2 * (4 * d * d + 2 * d * ffn) * tokens
        attention = 4 * tokens**2 * d
        return patch_embed + self.vision_layers * (layer_matmuls + attention)


def flagperf_params(llm_params: int) -> float:
    """FlagPerf's fixed N: the LLM size rounded to whole billions (6.74e9 -> 7e9, 13.0e9 -> 13e9),
    as its case hard-codes 7e9 / 13e9; exact below one billion (tiny test models)."""
    return float(round(llm_params / 1e9) * 1e9) if llm_params >= 1e9 else float(llm_params)


def sample_flops(shape: LlavaShape, stage: Stage, tokens: int, images: int) -> float:
    """Model FLOPs of one training sample of `tokens` real LLM tokens (images included) (ours)."""
    if stage == "pretrain":
        dense = 4 * shape.llm_matmul_params * tokens
    elif shape.adapter_params:  # LoRA: the frozen LLM computes no weight gradients; the adapters do
        dense = (4 * shape.llm_matmul_params + 6 * shape.adapter_params) * tokens
    else:
        dense = 6 * shape.llm_matmul_params * tokens
    attention = 12 * tokens**2 * shape.hidden * shape.layers
    vision = images * (shape.clip_forward_flops() + 6 * shape.projector_params * shape.image_tokens)
    return float(dense + attention + vision)


def batch_flops(shape: LlavaShape, stage: Stage, sample_tokens: list[int], images: int) -> float:
    """Model FLOPs of a micro-batch: per-sample LLM terms (attention is quadratic per sample)."""
    llm = sum(sample_flops(shape, stage, t, 0) for t in sample_tokens)
    return llm + sample_flops(shape, stage, 0, images)


def flagperf_flops(shape: LlavaShape, stage: Stage, padded_tokens: int) -> float:
    """FlagPerf's model FLOPs: 2N (pretrain) or 6N (finetune) per padded token."""
    return (2 if stage == "pretrain" else 6) * flagperf_params(shape.llm_params) * padded_tokens


def resolve_peak_tflops(
    configured: float, device_name: str, profile: str | None = None
) -> tuple[float | None, str]:
    """Per-device peak TFLOP/s for MFU and where it came from: the flag, LLAVARUN_PEAK_TFLOPS, else
    the accelerator table (the device's row, else the profile's default; None when neither)."""
    if configured > 0:
        return configured, "--peak-tflops"
    env = os.environ.get("LLAVARUN_PEAK_TFLOPS", "")
    if env:
        try:
            if float(env) > 0:
                return float(env), "LLAVARUN_PEAK_TFLOPS"
        except ValueError:
            print(f"llava-trainer: ignoring LLAVARUN_PEAK_TFLOPS={env!r} (not a number)", file=sys.stderr)
    # Imported here: bench/gpu_step.py imports this module where the API package's pydantic is absent.
    from llava_operator.api.profiles import device_peak_tflops

    return device_peak_tflops(profile, device_name)


def mfu_percent(flops: float, seconds: float, devices: int, peak_tflops: float | None) -> float | None:
    if not peak_tflops or seconds <= 0 or devices <= 0:
        return None
    return 100.0 * flops / (seconds * devices * peak_tflops * 1e12)
