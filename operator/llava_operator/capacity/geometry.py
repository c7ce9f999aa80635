"""What the capacity plan needs to know about the model: sizes, from checkpoints or a table.

The FLOP side is `llava_trainer.flops.LlavaShape` (the trainer's own accounting); this module
adds what memory needs beyond it: the vision tower's parameter count and the largest single
module (what ZeRO-3 gathers at once). Built from the two checkpoints' `config.json` files when a
data_dir is given, else from a built-in table of the recipe's models. Plain Python: no torch, no
pydantic (bench/gpu_check.sh uses it on a bare GPU machine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llava_trainer.flops import LlavaShape
from llava_trainer.tokenizer import IMAGE_TOKEN, PAD_TOKEN

ADDED_TOKENS = len((IMAGE_TOKEN, PAD_TOKEN))
"""The trainer extends Vicuna's tokenizer with <image> and <pad> (llava_trainer.tokenizer)."""
EMBEDDING_MULTIPLE = 64
"""Embedding rows are padded to a multiple of 64 (llava_trainer.model.EMBEDDING_MULTIPLE; a
trainer-tier test checks the two agree, that module imports torch)."""


@dataclass(frozen=True)
class Geometry:
    """A LLaVA-1.5 model's sizes: the FLOP shape plus the parameter counts memory needs."""

    name: str
    shape: LlavaShape

    @property
    def llm_params(self) -> int:
        return self.shape.llm_params

    @property
    def projector_params(self) -> int:
        return self.shape.projector_params

    @property
    def vision_params(self) -> int:
        """CLIPVisionModel: patch embedding (no bias), class and position embeddings, pre- and
        post-layernorm, and per layer q/k/v/out with biases, two layernorms, fc1/fc2 with biases."""
        s = self.shape
        d, f = s.vision_hidden, s.vision_intermediate
        embeddings = s.channels * s.patch_size**2 * d + d + (s.image_tokens + 1) * d
        layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)
        return embeddings + 2 * d + s.vision_layers * layer + 2 * d

    @property
    def total_params(self) -> int:
        return self.llm_params + self.projector_params + self.vision_params

    @property
    def largest_module_params(self) -> int:
        """Parameters held directly by the largest module (embedding, LM head, a linear layer):
        the most ZeRO-3 ever gathers for one module."""
        s = self.shape
        q_out, d, f = s.heads * s.head_dim, s.vision_hidden, s.vision_intermediate
        return max(
            s.vocab * s.hidden,
            s.hidden * s.intermediate,
            s.hidden * q_out,
            d * f + f,
            (s.image_tokens + 1) * d,
            s.channels * s.patch_size**2 * d,
            d * s.feature_layers * s.hidden + s.hidden,
            s.hidden * s.hidden + s.hidden,
        )


def for_stage(geometry: Geometry, spec: Any, stage: str) -> Geometry:
    """The geometry a stage trains: a LoRA finetune (`spec.finetune.lora`) adds its adapters
    (`shape.adapter_params`, as the trainer counts them for MFU)."""
    lora = spec.finetune.lora if stage == "finetune" else None
    if lora is None:
        return geometry
    adapters = geometry.shape.lora_params(lora.r, [str(t) for t in lora.target_modules])
    return replace(geometry, shape=replace(geometry.shape, adapter_params=adapters))


def model_vocab(tokenizer_vocab: int) -> int:
    """Embedding rows after the trainer's resize: tokenizer + <image>, <pad>, padded to 64."""
    rows = tokenizer_vocab + ADDED_TOKENS
    return -(-rows // EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE


def geometry_from_configs(name: str, llm: dict[str, Any], vision: dict[str, Any]) -> Geometry:
    """From the two checkpoints' config.json contents (a CLIPConfig's vision_config or a
    CLIPVisionConfig; transformers' defaults where a key is absent). The tokenizer is assumed to
    have the config's vocab_size entries, as Vicuna's does."""
    vision = vision.get("vision_config", vision)
    heads = int(llm["num_attention_heads"])
    hidden = int(llm["hidden_size"])
    shape = LlavaShape(
        hidden=hidden,
        layers=int(llm["num_hidden_layers"]),
        intermediate=int(llm["intermediate_size"]),
        heads=heads,
        kv_heads=int(llm.get("num_key_value_heads") or heads),
        head_dim=int(llm.get("head_dim") or hidden // heads),
        vocab=model_vocab(int(llm["vocab_size"])),
        vision_hidden=int(vision.get("hidden_size", 768)),
        vision_layers=int(vision.get("num_hidden_layers", 12)),
        vision_intermediate=int(vision.get("intermediate_size", 3072)),
        image_size=int(vision.get("image_size", 224)),
        patch_size=int(vision.get("patch_size", 32)),
        channels=int(vision.get("num_channels", 3)),
    )
    return Geometry(name, shape)


VICUNA = {
    "vicuna-7b-v1.5": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32},
    "vicuna-13b-v1.5": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40},
}
"""The recipe's language models (Llama-2 architecture, 32000-entry vocabulary, MHA)."""
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "image_size": 336,
    "patch_size": 14,
}
"""openai/clip-vit-large-patch14-336's vision tower."""


def recipe_geometry(language_model: str) -> Geometry | None:
    """The built-in geometry for a language-model path whose last component names a recipe
    model (vicuna-7b-v1.5, vicuna-13b-v1.5) with CLIP ViT-L/14-336; None when it names none."""
    name = Path(language_model).name.lower()
    for model, sizes in VICUNA.items():
        if name == model or name.startswith(model.removesuffix("-v1.5")):
            heads = sizes["hidden_size"] // 128
            llm = {**sizes, "num_attention_heads": heads, "vocab_size": 32000}
            return geometry_from_configs(f"{model} + clip-vit-large-patch14-336", llm, CLIP_L_336)
    return None


def read_geometry(language_model: Path, vision_tower: Path) -> Geometry:
    """The edge: both checkpoints' config.json (FileNotFoundError names the missing one)."""
    configs = []
    for directory in (language_model, vision_tower):
        path = directory / "config.json"
        try:
            configs.append(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing (the plan reads the model's sizes from it)") from None
        except ValueError as err:
            raise ValueError(f"{path}: not JSON ({err})") from None
    return geometry_from_configs(f"{language_model.name} + {vision_tower.name}", *configs)
