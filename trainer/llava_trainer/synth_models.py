"""The checkpoints of `llava-trainer synth`: random-init models and a tokenizer in the exact formats
of the real ones, loaded by the same code paths.

A Vicuna-style Llama with a SentencePiece tokenizer trained on the synthetic text (LLaMA-2's
settings), a CLIP vision tower at 56 px (16 image tokens) so CPU tests stay fast, and a whole
LLaVA model made of the two in llava-hf's format (what a task finetune starts from, as
llava-hf/llava-1.5-7b-hf would).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from .data.images import CLIP_MEAN, CLIP_STD
from .data.templates import VICUNA_SYSTEM

LANGUAGE_MODEL = "LLaVA-Pretrain/checkpoints/vicuna-13b-v1.5"
VISION_TOWER = "LLaVA-Pretrain/checkpoints/clip-vit-large-patch14-336"
LLAVA_MODEL = "LLaVA-Finetune/checkpoints/llava-1.5-7b-hf"
"""Where a released LLaVA-1.5 in Hugging Face format goes for a task finetune (the examples' path)."""
VISION_IMAGE_SIZE, VISION_PATCH_SIZE = 56, 14
TOKENIZER_VOCAB = 600


def write_llama_tokenizer(
    texts: list[str],
    out_dir: Path,
    *,
    vocab_size: int = TOKENIZER_VOCAB,
    seed: int = 42,
    save_pretrained: bool = False,
) -> Any:
    """Train a LLaMA-style SentencePiece BPE model on `texts` and save it in HF format.

    Same trainer settings as LLaMA-2's tokenizer (BPE, byte fallback, split digits, dummy prefix,
    identity normalisation, unk=0 bos=1 eos=2, no pad), so boundaries behave like the real one.
    Written as the Vicuna checkpoint has it (tokenizer.model + tokenizer_config.json, converted to
    a fast tokenizer on load); `save_pretrained` adds the fast tokenizer's own files instead.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer  # not AutoTokenizer: that imports the modelling stack (torch)

    out_dir.mkdir(parents=True, exist_ok=True)
    ascii_line = "".join(chr(c) for c in range(32, 127))
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([*texts, VICUNA_SYSTEM, "USER: ASSISTANT:", ascii_line]),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "padding_side": "right",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tokenizer = LlamaTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    if save_pretrained:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def write_base_models(out: Path, *, vocab_size: int, seed: int) -> None:
    """The random-init Vicuna-style Llama (2 layers, hidden 64) and CLIP vision tower (56 px,
    patch 14) under `out`'s checkpoint paths, saved with `save_pretrained`."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    )
    llama.generation_config = GenerationConfig(
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        max_length=4096,
        do_sample=True,
        temperature=0.9,
        top_p=0.6,
    )
    llama.save_pretrained(str(out / LANGUAGE_MODEL))
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=VISION_IMAGE_SIZE,
            patch_size=VISION_PATCH_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
        )
    )
    clip.save_pretrained(str(out / VISION_TOWER))
    CLIPImageProcessor(
        size={"shortest_edge": VISION_IMAGE_SIZE},
        crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=3,
        do_convert_rgb=True,
    ).save_pretrained(str(out / VISION_TOWER))


def write_llava_model(data_dir: Path, out: Path, *, seed: int = 42) -> Path:
    """A whole LLaVA-1.5 in llava-hf's format (LlavaForConditionalGeneration weights, the tokenizer
    with <image> and <pad>, the CLIP image processor) assembled from `data_dir`'s synthetic Vicuna
    and CLIP with a random projector: a stand-in for a released checkpoint."""
    import torch
    from transformers import CLIPImageProcessor

    from . import model as llava_model
    from .tokenizer import llava_tokens, load_tokenizer

    tokenizer = load_tokenizer(data_dir / LANGUAGE_MODEL)
    tokens = llava_tokens(tokenizer, data_dir / VISION_TOWER)
    torch.manual_seed(seed + 1)
    model = llava_model.build_llava(
        language_model=data_dir / LANGUAGE_MODEL,
        vision_tower=data_dir / VISION_TOWER,
        vocab_size=len(tokenizer),
        image_token_id=tokens.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        precision="fp32",
        device=torch.device("cpu"),
    )
    for part in (model.config.text_config, model.config.vision_config):
        part._name_or_path = ""  # no trace of where this data_dir was written: same bytes per seed
    image_processor = CLIPImageProcessor.from_pretrained(data_dir / VISION_TOWER)
    processor = llava_model.build_processor(tokenizer, image_processor, model.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    llava_model.export_model(model, model.state_dict(), processor, out)
    return out
