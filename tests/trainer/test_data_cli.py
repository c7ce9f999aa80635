"""`llava-trainer synth | prepare | inspect` from the command line, and what synth writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from llava_trainer.cli import main

pytestmark = pytest.mark.trainer

PRETRAIN = "LLaVA-Pretrain"
FINETUNE = "LLaVA-Finetune"
VICUNA = f"{PRETRAIN}/checkpoints/vicuna-13b-v1.5"
CLIP = f"{PRETRAIN}/checkpoints/clip-vit-large-patch14-336"


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")  # the fixture's completion marker
    }


def test_synth_is_deterministic_per_seed(synth_dir, tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "again"), "--samples", "24", "--seed", "7"]) == 0
    assert "pretrain 24, finetune 24" in capsys.readouterr().out
    assert digest(tmp_path / "again") == digest(synth_dir)


def test_synth_writes_the_case_layout(synth_dir):
    for path in (
        f"{PRETRAIN}/blip_laion_cc_sbu_558k.json",
        f"{FINETUNE}/llava_v1_5_mix665k.json",
        *(f"{FINETUNE}/data/{d}" for d in ("coco/train2017", "gqa/images", "ocr_vqa/images")),
        *(f"{FINETUNE}/data/{d}" for d in ("textvqa/train_images", "vg/VG_100K", "vg/VG_100K_2")),
        "MMMU/MMMU/Accounting/validation-00000-of-00001.parquet",
        "MMMU/MMMU/Art/dev-00000-of-00001.parquet",
        "Output",
    ):
        assert (synth_dir / path).exists(), path
    pretrain = json.loads((synth_dir / PRETRAIN / "blip_laion_cc_sbu_558k.json").read_text())
    for record in pretrain:
        assert record["image"] == f"{record['id'][:5]}/{record['id']}.jpg"
        assert (synth_dir / PRETRAIN / "images" / record["image"]).is_file()
        assert [t["from"] for t in record["conversations"]] == ["human", "gpt"]
        assert "<image>" in record["conversations"][0]["value"]


def test_synth_finetune_json_has_every_source_text_only_and_multi_turn(synth_dir):
    records = json.loads((synth_dir / FINETUNE / "llava_v1_5_mix665k.json").read_text())
    images = [r["image"] for r in records if "image" in r]
    for prefix in (
        "coco/train2017/",
        "gqa/images/",
        "ocr_vqa/images/",
        "textvqa/train_images/",
        "vg/VG_100K",
    ):
        assert any(i.startswith(prefix) for i in images), prefix
    assert all((synth_dir / FINETUNE / "data" / i).is_file() for i in images)
    assert all(i.endswith(".jpg") for i in images)
    assert any("image" not in r for r in records)
    assert any(len(r["conversations"]) >= 4 for r in records)


def test_synth_checkpoints_load_with_transformers(synth_dir):
    from llava_trainer.tokenizer import load_tokenizer
    from transformers import CLIPImageProcessor, CLIPVisionModel, GenerationConfig, LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(str(synth_dir / VICUNA))
    tokenizer = load_tokenizer(synth_dir / VICUNA)
    assert llama.config.vocab_size == tokenizer.convert_tokens_to_ids("<image>")  # Vicuna: 32000 == <image>
    assert tokenizer.pad_token_id == llama.config.vocab_size + 1
    assert (synth_dir / VICUNA / "model.safetensors").is_file() and (
        synth_dir / VICUNA / "tokenizer.model"
    ).is_file()
    assert GenerationConfig.from_pretrained(str(synth_dir / VICUNA)).eos_token_id == 2
    clip = CLIPVisionModel.from_pretrained(str(synth_dir / CLIP))
    assert (clip.config.image_size, clip.config.patch_size) == (56, 14)
    processor = CLIPImageProcessor.from_pretrained(str(synth_dir / CLIP))
    assert processor.crop_size["height"] == 56
    assert list(processor.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_prepare_then_inspect_from_the_command_line(data_dir_copy, capsys):
    assert main(["prepare", "--data-dir", str(data_dir_copy)]) == 0
    assert (data_dir_copy / "Output/prepare/index.json").is_file()
    capsys.readouterr()
    assert (
        main(["inspect", "--data-dir", str(data_dir_copy), "--stage", "finetune", "--index", "0", "--json"])
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    image_id = 600  # the synthetic vocabulary's size
    assert shown["num_image_tokens"] == 16 and shown["pixel_values_shape"] == [1, 3, 56, 56]
    assert len(shown["input_ids"]) == len(shown["labels"]) == len(shown["tokens"]) == shown["num_tokens"]
    assert all(
        label == -100
        for token, label in zip(shown["input_ids"], shown["labels"], strict=True)
        if token == image_id
    )
    assert shown["num_trained"] == sum(label != -100 for label in shown["labels"]) > 0


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_inspect_shows_people_what_is_trained(synth_dir, capsys, stage):
    assert (
        main(["inspect", "--data-dir", str(synth_dir), "--stage", stage, "--index", "1", "--color", "never"])
        == 0
    )
    out = capsys.readouterr().out
    assert "<image x16>" in out and "trained" in out and "masked" in out


def test_inspect_colours_trained_tokens_when_asked(synth_dir, capsys):
    main(
        ["inspect", "--data-dir", str(synth_dir), "--stage", "pretrain", "--index", "0", "--color", "always"]
    )
    assert "\x1b[1;32m" in capsys.readouterr().out  # bold green: trained


def test_inspect_explains_a_bad_request(synth_dir, capsys):
    assert main(["inspect", "--data-dir", str(synth_dir), "--stage", "pretrain", "--index", "999"]) == 2
    assert "out of range" in capsys.readouterr().err


def finetune_json(data_dir: Path) -> Path:
    return data_dir / FINETUNE / "llava_v1_5_mix665k.json"


BETWEEN_RECORDS = "\n  },\n  {"  # how synth (json.dumps indent=2) separates records


def cut_between_records(text: str) -> str:
    return text[: text.index(BETWEEN_RECORDS, len(text) // 2) + 4]


def drop_a_comma(text: str) -> str:
    at = text.index(BETWEEN_RECORDS, len(text) // 2)
    return text[:at] + BETWEEN_RECORDS.replace(",", "") + text[at + len(BETWEEN_RECORDS) :]


@pytest.mark.parametrize(
    ("damage", "warning"),
    [
        (cut_between_records, "unexpected end of file"),  # a copy cut short
        (lambda text: text[: len(text) // 2], "Unterminated string"),  # cut inside a record
        (drop_a_comma, "expected ',' or ']'"),
        (lambda text: text + "\n{}", "data after the end of the array"),
    ],
)
def test_inspect_warns_when_the_file_it_reads_is_truncated_or_invalid(data_dir_copy, capsys, damage, warning):
    """Record 0 still reads, but prepare and training would refuse the file: inspect says so."""
    path = finetune_json(data_dir_copy)
    path.write_text(damage(path.read_text()))
    args = ["inspect", "--data-dir", str(data_dir_copy), "--stage", "finetune", "--index", "0", "--json"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert f"WARNING {path}: invalid JSON array at byte" in err and warning in err
    assert warning in json.loads(out)["file_warning"]


def test_inspect_reads_a_valid_file_without_warning(synth_dir, capsys):
    args = ["inspect", "--data-dir", str(synth_dir), "--stage", "finetune", "--index", "2", "--json"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["file_warning"] is None and "WARNING" not in err


def test_inspect_never_opens_an_image_outside_the_image_folder(data_dir_copy, capsys):
    """The record's path is refused as training refuses it, although a real image lies there."""
    path = finetune_json(data_dir_copy)
    records = json.loads(path.read_text())
    outside = data_dir_copy / "outside.jpg"
    outside.write_bytes((data_dir_copy / FINETUNE / "data" / records[0]["image"]).read_bytes())
    records[0]["image"] = "../../outside.jpg"
    path.write_text(json.dumps(records))
    assert main(["inspect", "--data-dir", str(data_dir_copy), "--stage", "finetune", "--index", "0"]) == 1
    out = capsys.readouterr().out
    assert "record 0 is not trained on (malformed)" in out
    assert "image path '../../outside.jpg' leaves the image folder" in out
