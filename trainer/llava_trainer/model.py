"""LlavaForConditionalGeneration assembled from the local Vicuna and CLIP checkpoints (or loaded whole,
for a task finetune); freezing per stage; the projector file; the exported Hugging Face model
directory. LoRA adapters on top are `llava_trainer.lora`'s.

Assembly keeps one copy of the weights: the LLM and the vision tower are each loaded once by
`from_pretrained` (straight to the device, or partitioned under `deepspeed.zero.Init` when
ZeRO-3 is on, through HF's `HfDeepSpeedConfig`), the LLaVA shell is built on the meta device and
the loaded modules are moved into it. Only the projector (~21M parameters at 7B, ~31M at 13B) is new.

Projector files: `mm_projector.bin` uses LLaVA's keys (`model.mm_projector.0.weight`, `.0.bias`,
`.2.weight`, `.2.bias`) so the original LLaVA code and FlagPerf can read it too; loading also
accepts the Hugging Face names (`[model.]multi_modal_projector.linear_{1,2}.*`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EMBEDDING_MULTIPLE = 64
"""New vocabulary rows padded to a multiple of 64, as HF's llava-1.5 conversion does (32064)."""
LLAVA_PROJECTOR_KEYS = {
    "linear_1.weight": "model.mm_projector.0.weight",
    "linear_1.bias": "model.mm_projector.0.bias",
    "linear_2.weight": "model.mm_projector.2.weight",
    "linear_2.bias": "model.mm_projector.2.bias",
}


def choose_precision(requested: str, device_type: str) -> tuple[str, str | None]:
    """The precision to train in, and why it differs from the request (CPU: always fp32, since
    bf16 matmuls there are slow and emulated, and tests compare losses)."""
    if device_type == "cpu" and requested != "fp32":
        return "fp32", f"accelerator is CPU: training in fp32 instead of {requested}"
    return requested, None


def attention_implementation(device_type: str, precision: str) -> str:
    """FlashAttention-2 where it is installed and usable (CUDA, 16-bit), else PyTorch SDPA."""
    if device_type == "cuda" and precision in ("bf16", "fp16"):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def build_llava(
    *,
    language_model: Path,
    vision_tower: Path,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int | None,
    precision: str,
    device: torch.device,
    zero3_config: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 from the two local checkpoints, embeddings resized to the extended tokenizer.

    With `zero3_config` (a ZeRO-3 DeepSpeed config) the weights are partitioned across ranks as
    they load; otherwise they load straight onto `device`.
    """
    dtype = DTYPES[precision]
    placement: dict[str, Any] = {} if zero3_config else {"device_map": {"": device}}
    common = {"dtype": dtype, "attn_implementation": attn_implementation, **placement}
    with _zero3_loading(zero3_config):
        llm = _load_complete(AutoModelForCausalLM, language_model, common)
        vision = _load_complete(CLIPVisionModel, vision_tower, common)
        # New rows (<image>, <pad>) sampled around the mean of the existing embeddings, as HF's
        # llava-1.5 conversion does.
        llm.resize_token_embeddings(vocab_size, pad_to_multiple_of=EMBEDDING_MULTIPLE, mean_resizing=True)

    config = LlavaConfig(
        vision_config=vision.config,
        text_config=llm.config,
        image_token_index=image_token_id,
        image_seq_length=(vision.config.image_size // vision.config.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.pad_token_id = pad_token_id
    config.text_config.pad_token_id = pad_token_id
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    # A fresh projector with nn.Linear's default init (as LLaVA's); under ZeRO-3, DeepSpeed
    # partitions it at initialize time with the rest.
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(device=device, dtype=dtype)
    model.generation_config = llm.generation_config
    model.generation_config.pad_token_id = pad_token_id
    model.config.use_cache = False
    _set_attention(model, attn_implementation)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"LLaVA assembly left tensors on the meta device: {leftovers[:5]}")
    return model


def load_llava(
    path: Path,
    *,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int | None,
    precision: str,
    device: torch.device,
    zero3_config: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
) -> LlavaForConditionalGeneration:
    """A whole Hugging Face LLaVA model (task finetune: e.g. llava-hf/llava-1.5-7b-hf), loaded as
    `build_llava` loads its parts; it must agree with its own tokenizer on the <image> id."""
    placement: dict[str, Any] = {} if zero3_config else {"device_map": {"": device}}
    common = {"dtype": DTYPES[precision], "attn_implementation": attn_implementation, **placement}
    with _zero3_loading(zero3_config):
        model = _load_complete(LlavaForConditionalGeneration, path, common)
    config = model.config
    if config.image_token_index != image_token_id:
        raise ValueError(
            f"{path}: config.json's image_token_index {config.image_token_index} is not the id of its "
            f"tokenizer's <image> token ({image_token_id}); the directory mixes two models"
        )
    if config.text_config.vocab_size < vocab_size:
        raise ValueError(
            f"{path}: the language model has {config.text_config.vocab_size} embedding rows but its "
            f"tokenizer {vocab_size} tokens; the directory mixes two models"
        )
    if pad_token_id is not None:
        config.pad_token_id = config.text_config.pad_token_id = pad_token_id
        model.generation_config.pad_token_id = pad_token_id
    config.use_cache = False
    _set_attention(model, attn_implementation)
    return model


@contextmanager
def _zero3_loading(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """While an HfDeepSpeedConfig is alive, HF's from_pretrained loads under deepspeed.zero.Init
    (each rank keeps its partition only). Scoped to loading: the LLaVA shell built afterwards on
    the meta device must not go through HF's ZeRO-3 weight initialisation."""
    if ds_config is None:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


def _load_complete(cls: Any, path: Path, kwargs: dict[str, Any]) -> Any:
    """from_pretrained that fails on missing weights (a wrong directory must not silently train a
    random model) and keeps quiet about unused ones (CLIP's text half, when the vision tower is read
    from a full CLIP checkpoint as openai/clip-vit-large-patch14-336 is)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise RuntimeError(
            f"{path}: checkpoint lacks {len(missing)} weights of {cls.__name__}, e.g. {missing[:5]}"
        )
    return model


def _set_attention(model: torch.nn.Module, implementation: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = implementation


def freeze_for_stage(
    model: LlavaForConditionalGeneration, stage: str, *, lora: bool = False
) -> dict[str, int]:
    """Pretrain trains the projector only; finetune the LLM and the projector, or with `lora` the
    projector only (the adapters added afterwards train too). The vision tower is always frozen.
    Returns trainable parameter counts per part (for the log)."""
    llm_trains = stage == "finetune" and not lora
    parts = {
        "vision_tower": (model.model.vision_tower, False),
        "projector": (model.model.multi_modal_projector, True),
        "language_model": (model.model.language_model, llm_trains),
        "lm_head": (model.lm_head, llm_trains),
    }
    counts = {}
    for name, (module, trainable) in parts.items():
        module.requires_grad_(trainable)
        counts[name] = sum(_numel(p) for p in module.parameters()) if trainable else 0
    return counts


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions hold a slice


def enable_gradient_checkpointing(model: LlavaForConditionalGeneration) -> None:
    """Recompute LLM layer activations in backward (the vision tower runs without grad anyway)."""
    model.model.language_model.activation_checkpointing_enable({"use_reentrant": False})


def with_blank_image_row(
    inputs: dict[str, torch.Tensor], image_token_id: int, pad_token_id: int, num_image_tokens: int
) -> dict[str, torch.Tensor]:
    """`inputs` plus a row holding one image's tokens and nothing to learn: all its labels are
    ignored and rows do not attend to each other, so the loss is unchanged and the gradients
    reaching the vision tower and projector through it are exactly zero (train_parts.forward_loss)."""
    rows, length = inputs["input_ids"].shape
    width = max(length, num_image_tokens)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    out = {}
    for key, tensor in inputs.items():
        grown = torch.full((rows + 1, width), fill[key], dtype=tensor.dtype)
        grown[:rows, :length] = tensor
        out[key] = grown
    out["input_ids"][rows, :num_image_tokens] = image_token_id
    out["attention_mask"][rows, :num_image_tokens] = 1
    return out


def normalise_projector_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaVA (`model.mm_projector.0.*`) or HF (`[model.]multi_modal_projector.linear_1.*`) keys ->
    the projector module's own keys (`linear_1.weight`, ...)."""
    from_llava = {v: k for k, v in LLAVA_PROJECTOR_KEYS.items()}
    out = {}
    for key, value in state.items():
        if key in from_llava:
            out[from_llava[key]] = value
        elif "multi_modal_projector." in key:
            out[key.split("multi_modal_projector.", 1)[1]] = value
        elif key in LLAVA_PROJECTOR_KEYS:
            out[key] = value
    missing = set(LLAVA_PROJECTOR_KEYS) - set(out)
    if missing:
        raise ValueError(
            f"projector file has no {sorted(missing)}; expected LLaVA keys {list(LLAVA_PROJECTOR_KEYS.values())} "
            f"or Hugging Face keys multi_modal_projector.linear_1/2.*; found {sorted(state)[:8]}"
        )
    return out


def load_projector(model: LlavaForConditionalGeneration, path: Path) -> None:
    """Initialise the projector from pretrain's `mm_projector.bin` (before DeepSpeed wraps it)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained projector {path} not found: run the pretrain stage first, or pass "
            "--pretrained-projector PATH (LLaVA's mm_projector.bin)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    projector = model.model.multi_modal_projector
    weights = normalise_projector_keys(state)
    for name, param in projector.named_parameters():
        if tuple(weights[name].shape) != tuple(param.shape):
            raise ValueError(
                f"{path}: {name} has shape {tuple(weights[name].shape)}, the model needs {tuple(param.shape)} "
                "(a projector from a different LLM or vision tower?)"
            )
    projector.load_state_dict({k: v.to(next(projector.parameters()).dtype) for k, v in weights.items()})


def projector_state_dict(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaVA-keyed projector weights out of a full LLaVA state dict."""
    return {LLAVA_PROJECTOR_KEYS[k]: v for k, v in normalise_projector_keys(model_state).items()}


def save_projector(model_state: Mapping[str, torch.Tensor], path: Path) -> None:
    state = {k: v.detach().cpu().clone() for k, v in projector_state_dict(model_state).items()}
    _atomic_torch_save(state, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def build_processor(
    tokenizer: Any, image_processor: Any, config: LlavaConfig, aspect_ratio: str = "square"
) -> LlavaProcessor:
    """The processor HF's llava-1.5 checkpoints ship: expands "<image>" into patch tokens. With
    "pad" (finetune) the image processor pads to a square with the mean colour first, which is
    LLaVA's expand2square, so inference sees images as training did."""
    if aspect_ratio == "pad":
        image_processor = _padding_image_processor(image_processor)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS; dropped by the "default" strategy
        image_token=tokenizer.convert_ids_to_tokens(config.image_token_index),
    )


def _padding_image_processor(clip_processor: Any) -> Any:
    try:  # the PIL backend works without torchvision; the saved type is LlavaImageProcessor either way
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as Padding
    except ImportError:
        from transformers import LlavaImageProcessor as Padding
    keys = (
        "size",
        "crop_size",
        "do_resize",
        "do_center_crop",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "resample",
        "do_convert_rgb",
    )
    settings = clip_processor.to_dict()
    return Padding(**{k: settings[k] for k in keys if k in settings}, do_pad=True)


def export_model(
    model: LlavaForConditionalGeneration,
    state_dict: Mapping[str, torch.Tensor],
    processor: LlavaProcessor,
    out_dir: Path,
) -> None:
    """A standard HF model directory (config, safetensors, tokenizer, processor), written to a
    temporary directory and renamed, so a kill never leaves a half export."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True
    model.save_pretrained(tmp, state_dict=dict(state_dict), safe_serialization=True)
    model.config.use_cache = False
    processor.save_pretrained(tmp)
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def language_model_config(path: Path) -> Any:
    """The language model's config, from its own checkpoint or from a whole LLaVA model's."""
    config = AutoConfig.from_pretrained(path)
    return getattr(config, "text_config", config)
