"""`prepare` catches data that lies, and fails exactly when the next training stage would."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from llava_trainer.config import FinetuneConfig, PrepareConfig
from llava_trainer.prepare import prepare, run

sys.path.insert(0, str(Path(__file__).parent))
from image_fixtures import claims_size

pytestmark = pytest.mark.trainer

PRETRAIN_JSON = "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
FINETUNE_JSON = "LLaVA-Finetune/llava_v1_5_mix665k.json"
FINETUNE_IMAGES = "LLaVA-Finetune/data"


def config(data_dir: Path, **overrides) -> PrepareConfig:
    return PrepareConfig(data_dir=data_dir, **{"workers": 1, "stages": ["finetune"], **overrides})


def edit_records(data_dir: Path, name: str, change: Callable[[list[dict]], None]) -> list[dict]:
    path = data_dir / name
    records = json.loads(path.read_text())
    change(records)
    path.write_text(json.dumps(records))
    return records


def first_with(records: list[dict], prefix: str) -> dict:
    return next(r for r in records if r.get("image", "").startswith(prefix))


def test_image_paths_outside_the_image_folder_are_malformed_and_never_opened(data_dir_copy):
    """A readable image outside the folder is refused for its path alone, with record and path."""
    outside = data_dir_copy / "outside.jpg"
    shutil.copy(next((data_dir_copy / FINETUNE_IMAGES / "coco/train2017").glob("*.jpg")), outside)

    def escape(records: list[dict]) -> None:
        records[0]["image"] = "../../outside.jpg"
        records[1]["image"] = str(outside)

    records = edit_records(data_dir_copy, FINETUNE_JSON, escape)
    outcome = prepare(config(data_dir_copy))
    info, results = outcome["report"]["datasets"]["finetune"], outcome["results"]
    assert info["malformed"] == 2
    first, second = info["malformed_examples"]
    assert first.startswith(f"record 0 (id {records[0]['id']!r}, byte 1): ")
    assert "image path '../../outside.jpg' leaves the image folder" in first
    assert second.startswith("record 1 (id ") and f"image path {str(outside)!r} is absolute" in second
    assert (results["missing_images"], results["corrupt_images"]) == (0, 0)


def test_records_whose_image_tags_lie_are_malformed(data_dir_copy):
    def lie(records: list[dict]) -> None:
        untagged = first_with(records, "coco/")["conversations"][0]
        untagged["value"] = untagged["value"].replace("<image>", "").strip()
        first_with(records, "gqa/")["conversations"][0]["value"] += " <image>"

    edit_records(data_dir_copy, FINETUNE_JSON, lie)
    info = prepare(config(data_dir_copy))["report"]["datasets"]["finetune"]
    assert info["malformed"] == 2
    assert "the first human turn has no <image> tag" in info["malformed_examples"][0]
    assert "2 <image> tags for 1 image(s)" in info["malformed_examples"][1]


def test_a_too_large_image_is_listed_with_its_size(data_dir_copy):
    path = next((data_dir_copy / FINETUNE_IMAGES / "gqa/images").glob("*.jpg"))
    claims_size(path, 20000, 20000)
    outcome = prepare(config(data_dir_copy))
    assert outcome["results"]["corrupt_images"] == 1
    (listed,) = outcome["report"]["corrupt_images"]
    assert listed.startswith(f"gqa/images/{path.name}: too large: 20000x20000 ")


def unlink_first(folder: str) -> Callable[[Path], str]:
    def change(data_dir: Path) -> str:
        image = next((data_dir / folder).rglob("*.jpg"))
        image.unlink()
        return image.name

    return change


def break_every_finetune_record(data_dir: Path) -> str:
    def unknown_role(records: list[dict]) -> None:
        for record in records:
            record["conversations"] = [{"from": "robot", "value": "?"}]

    edit_records(data_dir, FINETUNE_JSON, unknown_role)
    return "from is 'robot'"


def too_large(data_dir: Path) -> str:
    return claims_size(next((data_dir / FINETUNE_IMAGES / "vg").rglob("*.jpg")), 20000, 20000).name


@pytest.mark.parametrize(
    ("change", "flags", "exit_code", "last_line"),
    [
        (
            unlink_first(FINETUNE_IMAGES),
            {},
            1,
            (
                "finetune would stop at start-up: 1 samples of",
                "or set bad_images: skip",
                "spec.finetune.badImages",
            ),
        ),
        (unlink_first(FINETUNE_IMAGES), {"finetune_bad_images": "skip"}, 0, ("prepare: index ",)),
        (too_large, {}, 1, ("finetune would stop at start-up", "--finetune-bad-images")),
        (too_large, {"finetune_bad_images": "skip"}, 0, ("prepare: index ",)),
        (
            break_every_finetune_record,
            {},
            1,
            (
                "finetune would have nothing to train on",
                "none is usable (24 malformed); fix the data listed above",
            ),
        ),
        (
            unlink_first("LLaVA-Pretrain/images"),
            {"stages": ["pretrain", "finetune"], "finetune_bad_images": "skip"},
            1,
            ("pretrain would stop at start-up", "spec.pretrain.badImages"),
        ),
        (
            unlink_first("LLaVA-Pretrain/images"),
            {"stages": ["pretrain", "finetune"], "pretrain_bad_images": "skip"},
            0,
            ("prepare: index ",),
        ),
    ],
)
def test_prepare_exits_non_zero_when_the_next_stage_would_stop(
    data_dir_copy, capsys, change, flags, exit_code, last_line
):
    """The last line says what stops the stage and what to fix; results and index are still written."""
    changed = change(data_dir_copy)
    assert run(config(data_dir_copy, **flags)) == exit_code
    lines = capsys.readouterr().out.strip().splitlines()
    assert all(fragment in lines[-1] for fragment in last_line), lines[-1]
    if exit_code:
        assert lines[-1].startswith("prepare: FAILED: ")
        assert changed in "\n".join(lines)  # the file or field that broke it is named
    assert (data_dir_copy / "Output/prepare/results.json").is_file()
    assert (data_dir_copy / "Output/prepare/index.json").is_file()


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_prepare_fails_exactly_when_the_training_loader_would(data_dir_copy, policy):
    """One rule: prepare's verdict is the loader's start-up check on the index prepare wrote."""
    from llava_trainer.data.loader import build_train_loader
    from llava_trainer.tokenizer import llava_tokens, load_tokenizer
    from transformers import CLIPImageProcessor

    unlink_first(FINETUNE_IMAGES)(data_dir_copy)
    prepare_code = run(config(data_dir_copy, finetune_bad_images=policy))
    train = FinetuneConfig(
        data_dir=data_dir_copy,
        bad_images=policy,
        micro_batch_size=4,
        global_batch_size=8,
        dataloader_workers=0,
    )
    tokenizer = load_tokenizer(train.resolve(train.language_model))
    tokens = llava_tokens(tokenizer, train.resolve(train.vision_tower))
    processor = CLIPImageProcessor.from_pretrained(str(train.resolve(train.vision_tower)))
    try:
        build_train_loader(
            train,
            tokenizer,
            processor,
            rank=0,
            world_size=1,
            num_image_tokens=tokens.num_image_tokens,
            image_token_id=tokens.image_token_id,
        )
        loader_stops = False
    except RuntimeError:
        loader_stops = True
    assert (prepare_code == 1) == loader_stops == (policy == "error")
