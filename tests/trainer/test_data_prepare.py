"""`llava-trainer prepare`: layout checks, counts, image problems, lengths and the index."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from llava_trainer.config import PrepareConfig
from llava_trainer.data.formats import record_source
from llava_trainer.data.index import FLAG_MALFORMED, load_index
from llava_trainer.prepare import prepare, run

pytestmark = pytest.mark.trainer

FINETUNE_JSON = "LLaVA-Finetune/llava_v1_5_mix665k.json"


def config(data_dir: Path, out: Path | None = None, **overrides) -> PrepareConfig:
    extra = {"output_dir": out / "prepare"} if out is not None else {}
    return PrepareConfig(data_dir=data_dir, **{"workers": 1, **extra, **overrides})


def checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "Output" not in p.relative_to(root).parts
    }


@pytest.fixture(scope="module")
def prepared(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare(config(synth_dir, out))


def test_samples_are_counted_per_source(synth_dir, prepared):
    _, outcome = prepared
    expected: Counter[str] = Counter({"pretrain": 24, "mmmu": 4 * 6})
    for record in json.loads((synth_dir / FINETUNE_JSON).read_text()):
        expected[record_source(tuple(filter(None, [record.get("image")])), "finetune")] += 1
    assert outcome["results"]["samples"] == dict(expected)
    assert set(expected) >= {"coco", "gqa", "ocr_vqa", "textvqa", "vg", "text_only"}
    results = outcome["results"]
    assert (results["missing_images"], results["corrupt_images"], results["ocr_vqa_not_jpg"]) == (0, 0, 0)
    assert results["tokenization_mismatches"] == 0


def test_index_lengths_are_the_real_token_counts(synth_dir, prepared):
    from llava_trainer.data.dataset import tokenize_record
    from llava_trainer.tokenizer import load_tokenizer, tokenizer_fingerprint

    out, _ = prepared
    tokenizer = load_tokenizer(synth_dir / "LLaVA-Pretrain/checkpoints/vicuna-13b-v1.5")
    data_path = synth_dir / FINETUNE_JSON
    index, why = load_index(
        out / "prepare" / "index.json",
        data_path,
        template="vicuna_v1",
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
    assert index is not None, why
    for i, record in enumerate(json.loads(data_path.read_text())):
        _, tokens = tokenize_record(
            record, template="vicuna_v1", tokenizer=tokenizer, image_token_id=600, num_image_tokens=16
        )
        assert index.lengths(16)[i] == len(tokens.input_ids)
        assert index.image_end(16)[i] == tokens.image_end


def test_fast_tokenizer_matches_sentencepiece_on_the_data(prepared):
    check = prepared[1]["report"]["tokenizer_reference_check"]
    assert check["checked"] > 40 and check["differ"] == 0


def test_mmmu_subjects_and_splits_are_counted(prepared):
    mmmu = prepared[1]["report"]["mmmu"]
    assert mmmu["subjects"]["Art"] == {"dev": 3, "validation": 6}
    assert "Physics" in mmmu["missing_subjects"] and mmmu["corrupt_images"] == 0
    assert mmmu["images_checked"] > 4 * 9


def test_run_never_modifies_the_source_data_and_writes_results(data_dir_copy, capsys):
    before = checksums(data_dir_copy)
    assert run(config(data_dir_copy)) == 0
    assert checksums(data_dir_copy) == before
    results = json.loads((data_dir_copy / "Output/prepare/results.json").read_text())
    assert results["index"] == str(data_dir_copy / "Output/prepare/index.json")
    assert "prepare: samples pretrain 24" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("LLaVA-Finetune/data/gqa/images", "gqa/images"),
        ("LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", "blip_laion_cc_sbu_558k.json"),
        (
            "LLaVA-Pretrain/checkpoints/clip-vit-large-patch14-336/preprocessor_config.json",
            "preprocessor_config",
        ),
        ("MMMU", "MMMU/MMMU"),
    ],
)
def test_a_broken_layout_fails_naming_the_missing_path(data_dir_copy, capsys, remove, named):
    target = data_dir_copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert run(config(data_dir_copy)) == 2
    error = capsys.readouterr().err
    assert named in error and "expected" in error
    assert not (data_dir_copy / "Output/prepare/results.json").exists()


def test_only_the_run_stages_inputs_are_required(data_dir_copy, tmp_path):
    shutil.rmtree(data_dir_copy / "LLaVA-Finetune")
    outcome = prepare(config(data_dir_copy, tmp_path, stages=["pretrain"]))
    assert outcome["results"]["samples"] == {"pretrain": 24}


def test_missing_corrupt_and_non_jpeg_images_are_listed(data_dir_copy, tmp_path):
    data = data_dir_copy / "LLaVA-Finetune/data"
    missing = next((data / "coco/train2017").glob("*.jpg"))
    missing.unlink()
    corrupt = next((data / "gqa/images").glob("*.jpg"))
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    ocr = next((data / "ocr_vqa/images").glob("*.jpg"))
    ocr.rename(ocr.with_suffix(".gif"))  # what the OCR-VQA download script leaves behind
    outcome = prepare(config(data_dir_copy, tmp_path, stages=["finetune"]))
    results, report = outcome["results"], outcome["report"]
    assert (
        results["missing_images"] == 2 and results["corrupt_images"] == 1 and results["ocr_vqa_not_jpg"] == 1
    )
    assert f"coco/train2017/{missing.name}" in report["missing_images"]
    assert report["corrupt_images"][0].startswith(f"gqa/images/{corrupt.name}: corrupt: ")
    assert report["ocr_vqa_not_jpg"] == [f"ocr_vqa/images/{ocr.name}"]


def test_malformed_records_are_counted_and_flagged(data_dir_copy, tmp_path):
    path = data_dir_copy / FINETUNE_JSON
    records = json.loads(path.read_text())
    records.insert(3, {"id": "broken", "conversations": [{"from": "robot", "value": "?"}]})
    path.write_text(json.dumps(records))
    outcome = prepare(config(data_dir_copy, tmp_path, stages=["finetune"]))
    assert outcome["report"]["datasets"]["finetune"]["malformed"] == 1
    with np.load(tmp_path / "prepare" / "index-finetune.npz") as arrays:
        assert arrays["flags"][3] & FLAG_MALFORMED
        assert (arrays["flags"] & FLAG_MALFORMED).sum() == 1
        assert arrays["token_start"][4] == arrays["token_start"][3]  # no tokens for it


def test_worker_processes_build_the_same_index(synth_dir, prepared, tmp_path):
    prepare(config(synth_dir, tmp_path, workers=2), chunk_records=5)
    for name in ("pretrain", "finetune"):
        with (
            np.load(tmp_path / "prepare" / f"index-{name}.npz") as parallel,
            np.load(prepared[0] / "prepare" / f"index-{name}.npz") as inline,
        ):
            for key in inline.files:
                assert np.array_equal(parallel[key], inline[key]), key
        tokens = f"index-{name}-tokens.npy"
        assert np.array_equal(
            np.load(tmp_path / "prepare" / tokens), np.load(prepared[0] / "prepare" / tokens)
        )


def test_results_reach_the_status_reporter(data_dir_copy, tmp_path, monkeypatch):
    status = tmp_path / "status.json"
    monkeypatch.setenv("LLAVARUN_STATUS_FILE", str(status))
    monkeypatch.delenv("RANK", raising=False)
    assert run(config(data_dir_copy, tmp_path / "Output")) == 0
    written = json.loads(status.read_text())
    prepare_results = written["results"]["prepare"]
    assert prepare_results["samples"]["pretrain"] == 24 and prepare_results["missingImages"] == 0


def test_index_tokens_are_the_tokenized_samples(synth_dir, prepared):
    """The index's token table decodes to exactly what tokenizing the record gives, for any image
    token id and count; it is memory-mapped and not copied into pickles (DataLoader workers)."""
    import pickle

    from llava_trainer.data.dataset import tokenize_record
    from llava_trainer.tokenizer import load_tokenizer, tokenizer_fingerprint

    out, _ = prepared
    tokenizer = load_tokenizer(synth_dir / "LLaVA-Pretrain/checkpoints/vicuna-13b-v1.5")
    for data_path, template in (
        (synth_dir / FINETUNE_JSON, "vicuna_v1"),
        (synth_dir / "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", "plain"),
    ):
        index, why = load_index(
            out / "prepare" / "index.json",
            data_path,
            template=template,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        )
        assert index is not None and index.tokens is not None, why
        assert isinstance(index.tokens.codes, np.memmap) and index.tokens.codes.dtype == np.int16
        assert len(pickle.dumps(index.tokens)) < 2000 + 8 * len(index)
        for image_token_id, count in ((600, 16), (32000, 576), (7, 0)):
            for i, record in enumerate(json.loads(data_path.read_text())):
                _, expected = tokenize_record(
                    record,
                    template=template,
                    tokenizer=tokenizer,
                    image_token_id=image_token_id,
                    num_image_tokens=count,
                )
                got = index.tokens.sample(i, image_token_id=image_token_id, num_image_tokens=count)
                assert np.array_equal(got.input_ids, expected.input_ids)
                assert np.array_equal(got.labels, expected.labels)
                assert (got.num_images, got.image_end) == (expected.num_images, expected.image_end)


@pytest.mark.parametrize("vocab_size", [32002, 128256])
def test_token_codes_round_trip(vocab_size, tmp_path):
    """Several images, masked and trained tokens, the largest id, a mismatch; int16 or int32 codes."""
    from llava_trainer.data.index import IMAGE_SLOT_ID, TokenTable, encode_tokens, token_dtype
    from llava_trainer.data.templates import IGNORE_INDEX, TokenizedSample

    top = vocab_size - 1
    ids = np.array([1, IMAGE_SLOT_ID, 5, IMAGE_SLOT_ID, 0, top, top, 9], dtype=np.int64)
    trained = np.array([0, 0, 0, 0, 1, 1, 0, 1], dtype=bool)
    samples = [
        TokenizedSample(ids, np.where(trained, ids, IGNORE_INDEX), 2, 4),
        TokenizedSample(ids[:1], ids[:1] * 0 + IGNORE_INDEX, 0, 0, mismatch=True),
    ]
    dtype = token_dtype(vocab_size)
    assert dtype == (np.int16 if vocab_size < 32768 else np.int32)
    codes = [encode_tokens(s, dtype) for s in samples]
    np.save(tmp_path / "t.npy", np.concatenate(codes))
    table = TokenTable(tmp_path / "t.npy", np.cumsum([0, *map(len, codes)]))
    first = table.sample(0, image_token_id=77, num_image_tokens=3)
    assert first.input_ids.tolist() == [1, 77, 77, 77, 5, 77, 77, 77, 0, top, top, 9]
    assert first.labels.tolist() == [IGNORE_INDEX] * 8 + [0, top, IGNORE_INDEX, 9]
    assert (first.num_images, first.image_end) == (2, 8)
    second = table.sample(1, image_token_id=77, num_image_tokens=3, mismatch=True)
    assert second.input_ids.tolist() == [1] and second.labels.tolist() == [IGNORE_INDEX] and second.mismatch
