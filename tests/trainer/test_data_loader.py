"""The training data loader and its batch contract with the training loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from llava_trainer.config import FinetuneConfig, PrepareConfig, PretrainConfig
from llava_trainer.data import loader as loader_module
from llava_trainer.data.collate import collate
from llava_trainer.data.dataset import Sample
from llava_trainer.data.loader import build_train_loader
from llava_trainer.data.templates import IGNORE_INDEX

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def model_inputs(synth_dir):
    """(tokenizer, LlavaTokens, CLIP processor) of the synthetic checkpoints."""
    from llava_trainer.tokenizer import llava_tokens, load_tokenizer
    from transformers import CLIPImageProcessor

    config = FinetuneConfig(data_dir=synth_dir)
    tokenizer = load_tokenizer(config.resolve(config.language_model))
    tokens = llava_tokens(tokenizer, config.resolve(config.vision_tower))
    processor = CLIPImageProcessor.from_pretrained(str(config.resolve(config.vision_tower)))
    return tokenizer, tokens, processor


def make_loader(model_inputs, data_dir: Path, *, stage="finetune", rank=0, world_size=1, **overrides):
    tokenizer, tokens, processor = model_inputs
    config_class = FinetuneConfig if stage == "finetune" else PretrainConfig
    settings = {"micro_batch_size": 4, "global_batch_size": 8, "dataloader_workers": 0, "seed": 3}
    # Output outside the data_dir unless a test asks: no prepare index there, so the loader scans.
    settings.setdefault("output_dir", data_dir.parent / "no-index" / "checkpoints")
    config = config_class(data_dir=data_dir, **{**settings, **overrides})
    return build_train_loader(
        config,
        tokenizer,
        processor,
        rank=rank,
        world_size=world_size,
        num_image_tokens=tokens.num_image_tokens,
        image_token_id=tokens.image_token_id,
    )


def sample(ids, trained, images=0):
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.where(np.asarray(trained, dtype=bool), ids, IGNORE_INDEX)
    pixels = np.ones((images, 3, 4, 4), np.float32) if images else None
    return Sample("x", ids, labels, pixels, ("a.jpg",) * images)


def test_collate_pads_right_with_the_pad_id_and_ignores_padding():
    batch = collate(
        [sample([1, 5, 6], [0, 1, 1], images=1), sample([1, 7], [0, 1], images=1)], pad_token_id=99
    )
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 99]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["pixel_values"].dtype == torch.float32
    assert (
        batch["num_samples"],
        batch["num_real_tokens"],
        batch["num_padded_tokens"],
        batch["num_images"],
    ) == (
        2,
        5,
        6,
        2,
    )


def test_a_text_only_batch_has_no_pixel_values():
    batch = collate([sample([1, 5], [0, 1])], pad_token_id=0)
    assert "pixel_values" not in batch and batch["num_images"] == 0


def test_batches_follow_the_contract(model_inputs, synth_dir):
    tokenizer, tokens, _ = model_inputs
    loader = make_loader(model_inputs, synth_dir)
    batches = list(loader)
    assert len(batches) == len(loader)
    assert sum(b["num_samples"] for b in batches) == 24
    for batch in batches:
        ids = batch["input_ids"]
        assert ids.dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.long
        assert ids.shape == batch["labels"].shape == batch["attention_mask"].shape
        assert batch["num_padded_tokens"] == ids.numel()
        assert batch["num_real_tokens"] == int(batch["attention_mask"].sum())
        image_tokens = (ids == tokens.image_token_id).sum(dim=1)
        assert bool((image_tokens > 0).all()) or bool((image_tokens == 0).all())  # one modality per batch
        assert int(image_tokens.sum()) == batch["num_images"] * tokens.num_image_tokens
        if batch["num_images"]:
            assert batch["pixel_values"].shape == (batch["num_images"], 3, 56, 56)
        else:
            assert "pixel_values" not in batch
        assert bool((batch["labels"][ids == tokens.image_token_id] == IGNORE_INDEX).all())
        assert bool((batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all())
        assert bool((ids[batch["attention_mask"] == 0] == tokenizer.pad_token_id).all())


def test_pretrain_batches_are_all_images(model_inputs, synth_dir):
    for batch in make_loader(model_inputs, synth_dir, stage="pretrain"):
        assert batch["num_images"] == batch["num_samples"]


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(model_inputs, synth_dir):
    full = list(make_loader(model_inputs, synth_dir))
    first = make_loader(model_inputs, synth_dir)
    iterator = iter(first)
    for _ in range(2):
        next(iterator)
    state = first.state_dict()
    assert state["micro_batches_consumed"] == 2 and state["samples_consumed"] == 8
    resumed = make_loader(model_inputs, synth_dir)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])  # the loop's own call must not rewind
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for a, b in zip(rest, full[2:], strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_each_epoch_has_its_own_order_and_resets_position(model_inputs, synth_dir):
    loader = make_loader(model_inputs, synth_dir)
    epoch0 = [b["input_ids"] for b in loader]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["micro_batches_consumed"] == 0
    epoch1 = [b["input_ids"] for b in loader]
    assert len(epoch0) == len(epoch1)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(epoch0, epoch1, strict=True))
    loader.set_epoch(0)
    assert all(torch.equal(a["input_ids"], b) for a, b in zip(loader, epoch0, strict=True))


def test_resume_refuses_a_different_batch_geometry(model_inputs, synth_dir):
    state = make_loader(model_inputs, synth_dir).state_dict()
    other = make_loader(model_inputs, synth_dir, micro_batch_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        other.load_state_dict(state)


def test_ranks_split_the_epoch(model_inputs, synth_dir):
    loaders = [make_loader(model_inputs, synth_dir, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1])
    assert [len(list(loader)) for loader in loaders] == [len(loaders[0])] * 2
    shares = [{i for batch in loader.sampler.epoch_batches(0) for i in batch} for loader in loaders]
    assert shares[0] | shares[1] == set(range(24))
    assert len(shares[0] & shares[1]) <= 4  # at most the micro-batch repeated to keep ranks in step


def test_worker_processes_give_the_same_batches(model_inputs, synth_dir):
    inline = list(make_loader(model_inputs, synth_dir, dataloader_workers=0))
    workers = list(make_loader(model_inputs, synth_dir, dataloader_workers=2))
    for a, b in zip(inline, workers, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert ("pixel_values" in a) == ("pixel_values" in b)
        if "pixel_values" in a:
            assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_a_missing_image_stops_training_naming_the_file(model_inputs, data_dir_copy):
    image = next((data_dir_copy / "LLaVA-Finetune/data/gqa/images").glob("*.jpg"))
    image.unlink()
    with pytest.raises(RuntimeError, match=image.name):
        list(make_loader(model_inputs, data_dir_copy))


def test_skipped_bad_images_are_counted_and_replaced(model_inputs, data_dir_copy):
    image = next((data_dir_copy / "LLaVA-Finetune/data/gqa/images").glob("*.jpg"))
    image.write_bytes(b"not a jpeg")
    loader = make_loader(model_inputs, data_dir_copy, bad_images="skip")
    batches = list(loader)
    assert loader.stats.skipped["bad_image"] >= 1
    assert sum(b["num_samples"] for b in batches) == 24  # replaced by other image samples


def measured_finetune(model_inputs, synth_dir):
    """Untruncated tokens of every synthetic finetune record."""
    import json

    from llava_trainer.data.dataset import tokenize_record

    tokenizer, tokens, _ = model_inputs
    records = json.loads((synth_dir / "LLaVA-Finetune/llava_v1_5_mix665k.json").read_text())
    return [
        tokenize_record(
            r,
            template="vicuna_v1",
            tokenizer=tokenizer,
            image_token_id=tokens.image_token_id,
            num_image_tokens=tokens.num_image_tokens,
        )[1]
        for r in records
    ]


def test_truncation_cuts_text_and_keeps_the_image_block(model_inputs, synth_dir):
    measured = measured_finetune(model_inputs, synth_dir)
    max_length = max(t.image_end for t in measured) + 8
    loader = make_loader(model_inputs, synth_dir, max_length=max_length)
    batches = list(loader)
    assert loader.stats.truncated == sum(len(t.input_ids) > max_length for t in measured) > 0
    assert not loader.stats.skipped
    assert all(b["input_ids"].shape[1] <= max_length for b in batches)
    assert sum(b["num_images"] for b in batches) == sum(t.num_images for t in measured)


def test_samples_whose_image_would_not_fit_are_excluded_up_front(model_inputs, synth_dir, tmp_path):
    from llava_trainer.prepare import prepare

    measured = measured_finetune(model_inputs, synth_dir)
    max_length = min(t.image_end for t in measured if t.num_images) - 1
    out = tmp_path / "Output"
    prepare(PrepareConfig(data_dir=synth_dir, output_dir=out / "prepare", stages=["finetune"], workers=1))
    loader = make_loader(
        model_inputs, synth_dir, max_length=max_length, output_dir=out / "checkpoints_finetune"
    )
    batches = list(loader)
    images = sum(t.num_images > 0 for t in measured)
    assert loader.stats.skipped["image_truncated"] == images
    assert loader.stats.truncated == len(measured) - images  # the text-only ones, cut
    assert all(b["num_images"] == 0 for b in batches)


def test_without_an_index_an_unfillable_micro_batch_fails_clearly(model_inputs, synth_dir):
    measured = measured_finetune(model_inputs, synth_dir)
    max_length = min(t.image_end for t in measured if t.num_images) - 1
    with pytest.raises(RuntimeError, match="image_truncated"):
        list(make_loader(model_inputs, synth_dir, max_length=max_length))


def test_the_prepare_index_is_used_instead_of_scanning(model_inputs, synth_dir, tmp_path, monkeypatch):
    from llava_trainer.prepare import prepare

    out = tmp_path / "Output"
    prepare(PrepareConfig(data_dir=synth_dir, output_dir=out / "prepare", stages=["finetune"], workers=1))

    def no_scan(*args, **kwargs):
        raise AssertionError("the JSON was scanned although prepare indexed it")

    monkeypatch.setattr(loader_module, "scan_dataset", no_scan)
    loader = make_loader(model_inputs, synth_dir, output_dir=out / "checkpoints_finetune")
    assert sum(b["num_samples"] for b in loader) == 24


def test_the_index_fails_fast_on_known_bad_images(model_inputs, data_dir_copy, tmp_path):
    from llava_trainer.prepare import prepare

    image = next((data_dir_copy / "LLaVA-Finetune/data/coco/train2017").glob("*.jpg"))
    image.unlink()
    out = tmp_path / "Output"
    prepare(PrepareConfig(data_dir=data_dir_copy, output_dir=out / "prepare", stages=["finetune"], workers=1))
    with pytest.raises(RuntimeError, match=image.name):
        make_loader(model_inputs, data_dir_copy, output_dir=out / "checkpoints_finetune")
    skipping = make_loader(
        model_inputs, data_dir_copy, output_dir=out / "checkpoints_finetune", bad_images="skip"
    )
    assert skipping.stats.skipped["bad_image"] >= 1


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_prepare_index_tokens_give_the_same_batches_as_tokenizing(model_inputs, synth_dir, tmp_path, stage):
    """With prepare's token table the loader does not tokenize; the batches are the same, also cut."""
    from llava_trainer.prepare import prepare

    out = tmp_path / "Output"
    prepare(PrepareConfig(data_dir=synth_dir, output_dir=out / "prepare", stages=[stage], workers=1))
    measured = measured_finetune(model_inputs, synth_dir)
    for max_length in (2048, max(t.image_end for t in measured) + 8):
        indexed = make_loader(
            model_inputs, synth_dir, stage=stage, max_length=max_length, output_dir=out / "ckpt"
        )
        assert indexed.dataset.tokens is not None
        scanned = make_loader(model_inputs, synth_dir, stage=stage, max_length=max_length)
        assert scanned.dataset.tokens is None
        scanned.sampler = indexed.sampler  # the same order (word-count lengths group differently)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                "llava_trainer.data.dataset.tokenize_record",
                lambda *a, **k: pytest.fail("tokenized although the index has the tokens"),
            )
            from_index = list(indexed)
        for a, b in zip(from_index, scanned, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert indexed.stats.as_dict() == scanned.stats.as_dict()
