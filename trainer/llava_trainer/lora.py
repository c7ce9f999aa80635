"""LoRA finetune through peft, as LLaVA-1.5's finetune_lora.sh: adapters on the LLM's linear layers.

The LLM's own weights (and the LM head) stay frozen; the adapters train at their own learning
rate and the projector trains fully at the stage's. peft builds the adapters (`get_peft_model`)
and merges them for the export (`merge_and_unload`). Under ZeRO-3 the adapters are created
beside partitioned base weights and DeepSpeed partitions them at initialize time, as it does the
projector. The export never needs a second copy of the model: the gathered state dict is loaded
into a shell built on the meta device, wrapped by peft the same way, and merged there.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from llava_operator.api.stage_params import LoraParams
from transformers import LlavaForConditionalGeneration

ADAPTER_NAME = "default"
ADAPTER_DIR = "adapter"
"""peft's adapter directory (adapter_config.json, adapter_model.safetensors) in a LoRA finetune's output."""


def is_adapter(name: str) -> bool:
    """Whether a parameter name is one of peft's LoRA adapter weights."""
    return ".lora_A." in name or ".lora_B." in name


def unwrap(model: torch.nn.Module) -> LlavaForConditionalGeneration:
    """The LLaVA model inside a peft wrapper (or the model itself)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def target_modules(model: LlavaForConditionalGeneration, targets: list[str]) -> list[str]:
    """Full names of the LLM's linear layers that get adapters: those whose own name is in
    `targets`, every one when it is empty. The LM head sits outside the LLM and never gets one."""
    llm = model.model.language_model
    prefix = next(name for name, module in model.named_modules() if module is llm)
    linears = [f"{prefix}.{name}" for name, m in llm.named_modules() if isinstance(m, torch.nn.Linear)]
    present = {name.rsplit(".", 1)[-1] for name in linears}
    unknown = sorted(set(targets) - present)
    if unknown:
        raise ValueError(
            f"lora.targetModules {unknown}: the language model has no such linear layer; it has {sorted(present)}"
        )
    return [name for name in linears if not targets or name.rsplit(".", 1)[-1] in targets]


def _peft_config(params: LoraParams, modules: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=modules,
        bias="none",
    )


def apply_lora(model: LlavaForConditionalGeneration, params: LoraParams) -> tuple[torch.nn.Module, int]:
    """`model` (frozen as the stage says) with LoRA adapters on its LLM, and their parameter count.
    peft freezes everything but the adapters; the projector is made trainable again."""
    from peft import get_peft_model

    trainable_before = [p for p in model.parameters() if p.requires_grad]
    wrapped = get_peft_model(model, _peft_config(params, target_modules(model, params.target_modules)))
    for param in trainable_before:
        param.requires_grad_(True)
    adapters = sum(_numel(p) for n, p in wrapped.named_parameters() if is_adapter(n))
    return wrapped, adapters


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions hold a slice


def merged_for_export(
    wrapped: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_dir: Path
) -> LlavaForConditionalGeneration:
    """A plain LLaVA model with the adapters merged into the LLM's weights (peft's merge), built
    from the gathered 16-bit `state_dict` (peft's key names) on the meta device, so no second copy
    of the weights is made: the merge writes into the state dict's tensors, so this is the last use
    of them. The adapters alone are saved to `adapter_dir` first, in peft's format (a temporary
    directory, then renamed, as the model export)."""
    from peft import get_peft_model

    base = unwrap(wrapped)
    with torch.device("meta"):
        shell = LlavaForConditionalGeneration(base.config)
    shell = get_peft_model(shell, wrapped.peft_config[ADAPTER_NAME])
    shell.load_state_dict(dict(state_dict), strict=True, assign=True)
    tmp = adapter_dir.with_name(f".{adapter_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shell.save_pretrained(tmp)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
    merged = shell.merge_and_unload()
    merged.generation_config = base.generation_config
    return merged
