"""Training resolves image paths as prepare does: never outside the stage's image folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from llava_trainer.config import FinetuneConfig
from llava_trainer.data.dataset import build_sample
from llava_trainer.data.images import ImagePipeline
from llava_trainer.data.templates import SkipSample

pytestmark = pytest.mark.trainer

FINETUNE_JSON = "LLaVA-Finetune/llava_v1_5_mix665k.json"


def clip_processor(data_dir: Path):
    from transformers import CLIPImageProcessor

    config = FinetuneConfig(data_dir=data_dir)
    return CLIPImageProcessor.from_pretrained(str(config.resolve(config.vision_tower)))


def escape_first_record(data_dir: Path, image: str) -> dict:
    """Point record 0 at `image` and put a real JPEG there: only the path is wrong."""
    path = data_dir / FINETUNE_JSON
    records = json.loads(path.read_text())
    source = data_dir / "LLaVA-Finetune/data" / records[0]["image"]
    target = Path(image) if Path(image).is_absolute() else data_dir / "LLaVA-Finetune/data" / image
    shutil.copy(source, target)
    records[0]["image"] = image
    path.write_text(json.dumps(records))
    return records[0]


@pytest.mark.parametrize("outside", ["../../outside.jpg", "ABSOLUTE"])
def test_a_sample_whose_image_is_outside_the_folder_is_malformed(data_dir_copy, tokenizer, outside):
    image = str(data_dir_copy / "outside.jpg") if outside == "ABSOLUTE" else outside
    record = escape_first_record(data_dir_copy, image)
    with pytest.raises(SkipSample) as err:
        build_sample(
            record,
            template="vicuna_v1",
            tokenizer=tokenizer,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            num_image_tokens=4,
            max_length=2048,
            image_folder=data_dir_copy / "LLaVA-Finetune/data",
            images=ImagePipeline(clip_processor(data_dir_copy), "pad"),
        )
    assert err.value.reason == "malformed" and repr(image) in str(err.value)


def test_the_loader_excludes_it_before_training_starts(data_dir_copy):
    from llava_trainer.data.loader import build_train_loader
    from llava_trainer.tokenizer import llava_tokens, load_tokenizer

    escape_first_record(data_dir_copy, "../../outside.jpg")
    config = FinetuneConfig(
        data_dir=data_dir_copy,
        output_dir=data_dir_copy.parent / "no-index" / "checkpoints",  # no prepare index: the loader scans
        micro_batch_size=4,
        global_batch_size=8,
        dataloader_workers=0,
    )
    tokenizer = load_tokenizer(config.resolve(config.language_model))
    tokens = llava_tokens(tokenizer, config.resolve(config.vision_tower))
    loader = build_train_loader(
        config,
        tokenizer,
        clip_processor(data_dir_copy),
        rank=0,
        world_size=1,
        num_image_tokens=tokens.num_image_tokens,
        image_token_id=tokens.image_token_id,
    )
    assert loader.stats.skipped["malformed"] == 1
    assert sum(batch["num_samples"] for batch in loader) == 23
