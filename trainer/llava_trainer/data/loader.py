"""The training data loader: the contract with the training loop.

`build_train_loader(config, tokenizer, image_processor, rank=, world_size=, num_image_tokens=,
image_token_id=)` returns a `TrainLoader`: iterable over this rank's micro-batches, each a dict

    input_ids [B,T] long, attention_mask [B,T] long, labels [B,T] long (-100 = not trained),
    pixel_values [N_img,3,H,W] float32 (absent when the micro-batch is text-only),
    num_samples, num_real_tokens (non-pad, image tokens included), num_padded_tokens (B*T),
    num_images (python ints),

with `len()` = micro-batches per epoch on this rank, `layout` (the run's BatchLayout: micro batch,
gradient accumulation, world size), `set_epoch(epoch)`, `state_dict()` / `load_state_dict()` for
mid-epoch resume, and `stats` (skipped samples by reason, tokenization mismatches, truncated
samples). Workers read records by offset and build whole micro-batches, so
the main process only receives tensors.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import TrainConfig
from ..deepspeed_config import BatchLayout, batch_layout
from ..tokenizer import tokenizer_fingerprint
from .collate import collate
from .dataset import LlavaDataset
from .formats import JsonRecords
from .images import ImagePipeline
from .index import FLAG_BAD_IMAGE, FLAG_MALFORMED, FLAG_MISMATCH, DatasetIndex, load_index, scan_dataset
from .sampler import MicroBatchSampler

log = logging.getLogger(__name__)


@dataclass
class DataStats:
    """What the loader could not train on as asked; exclusions at start-up count once, the rest
    as met (per epoch)."""

    records: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    """reason -> samples: malformed, image_truncated, bad_image."""
    tokenization_mismatches: int = 0
    """Samples trained fully masked because a template boundary fell inside a token."""
    truncated: int = 0
    """Samples cut at max_length (their images kept whole)."""

    def add(self, other: dict[str, Any]) -> None:
        self.skipped.update(other.get("skipped", {}))
        self.tokenization_mismatches += other.get("tokenization_mismatches", 0)
        self.truncated += other.get("truncated", 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "skipped": dict(self.skipped),
            "tokenization_mismatches": self.tokenization_mismatches,
            "truncated": self.truncated,
        }


class _MicroBatches:
    """Map-style dataset whose keys are whole micro-batches (lists of sample indices)."""

    def __init__(self, dataset: LlavaDataset, pad_token_id: int) -> None:
        self.dataset, self.pad_token_id = dataset, pad_token_id

    def __getitem__(self, indices: list[int]) -> dict[str, Any]:
        samples, skipped = self.dataset.micro_batch(indices)
        batch = collate(samples, self.pad_token_id)
        batch["_stats"] = {
            "skipped": dict(skipped),
            "tokenization_mismatches": sum(s.mismatch for s in samples),
            "truncated": sum(s.truncated for s in samples),
        }
        return batch


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class TrainLoader:
    """This rank's micro-batches, epoch by epoch, resumable mid-epoch.

    Position = micro-batches already handed to the loop in the current epoch; a finished epoch
    moves on to the next one (new shuffle) by itself, and `set_epoch` to another epoch restarts.
    """

    def __init__(
        self,
        dataset: LlavaDataset,
        sampler: MicroBatchSampler,
        layout: BatchLayout,
        *,
        pad_token_id: int,
        num_workers: int = 0,
        stats: DataStats | None = None,
    ) -> None:
        self.dataset, self.sampler, self.layout = dataset, sampler, layout
        self.pad_token_id, self.num_workers = pad_token_id, num_workers
        self.stats = stats or DataStats(records=len(dataset))
        self.epoch, self.position, self.samples_consumed = 0, 0, 0

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position, self.samples_consumed = epoch, 0, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch.utils.data

        batches = self.sampler.epoch_batches(self.epoch)[self.position :]
        accelerator = getattr(torch, "accelerator", None)  # vendor-neutral: pin for whatever device runs
        loader = torch.utils.data.DataLoader(
            _MicroBatches(self.dataset, self.pad_token_id),
            batch_size=None,
            sampler=batches,
            collate_fn=_as_is,
            num_workers=self.num_workers,
            pin_memory=bool(accelerator is not None and accelerator.is_available()),
            # Its own seed source: drawn from the global RNG, starting the iterator after a mid-epoch
            # resume would shift every later random draw (LoRA's dropout) against the uninterrupted run.
            generator=torch.Generator().manual_seed(self.sampler.seed + self.epoch),
        )
        for batch in loader:
            self.stats.add(batch.pop("_stats"))
            self.position += 1
            self.samples_consumed += batch["num_samples"]
            yield batch
        if self.position >= len(self):
            self.epoch, self.position, self.samples_consumed = self.epoch + 1, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "micro_batches_consumed": self.position,
            "samples_consumed": self.samples_consumed,
            "world_size": self.sampler.world_size,
            "micro_batch_size": self.sampler.micro_batch_size,
            "megabatch_size": self.sampler.megabatch_size,
            "seed": self.sampler.seed,
            "stats": self.stats.as_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off: the next batch is the first one not yet consumed.

        The batch geometry must match (it decides the order); a different world size continues at
        the same global position, rounded down to a whole step of all ranks.
        """
        sampler = self.sampler
        for key, mine in (
            ("micro_batch_size", sampler.micro_batch_size),
            ("megabatch_size", sampler.megabatch_size),
            ("seed", sampler.seed),
        ):
            if state.get(key, mine) != mine:
                raise ValueError(f"cannot resume the data order: {key} was {state[key]}, is now {mine}")
        position = int(state["micro_batches_consumed"])
        old_world = int(state.get("world_size", sampler.world_size))
        if old_world != sampler.world_size:
            position = position * old_world // sampler.world_size
        self.epoch, self.position = int(state["epoch"]), position
        self.samples_consumed = (
            int(state.get("samples_consumed", 0)) if old_world == sampler.world_size else 0
        )
        saved = state.get("stats") or {}
        self.stats = DataStats(records=len(self.dataset))
        self.stats.add(saved)


def _excluded(
    index: DatasetIndex, records: JsonRecords, *, num_image_tokens: int, max_length: int, bad_images: str
) -> tuple[np.ndarray, Counter[str]]:
    """Samples known unusable before training starts, by reason; fails fast on bad images in error mode."""
    malformed = (index.flags & FLAG_MALFORMED) != 0
    too_long = (index.image_end(num_image_tokens) > max_length) & ~malformed
    bad = ((index.flags & FLAG_BAD_IMAGE) != 0) & ~malformed & ~too_long
    if bad.any() and bad_images != "skip":
        examples = []
        for i in np.flatnonzero(bad)[:5]:
            record = records[int(i)]
            examples.append(str(record.get("image")) if isinstance(record, dict) else f"record {i}")
        raise RuntimeError(
            f"{int(bad.sum())} samples of {records.path} have missing or corrupt images per the prepare index "
            f"(e.g. {', '.join(examples)}). Fix the files and re-run prepare, or set bad_images: skip."
        )
    reasons = Counter(
        {
            "malformed": int(malformed.sum()),
            "image_truncated": int(too_long.sum()),
            "bad_image": int(bad.sum()),
        }
    )
    return malformed | too_long | bad, +reasons


def build_train_loader(
    config: TrainConfig,
    tokenizer: Any,
    image_processor: Any,
    *,
    rank: int,
    world_size: int,
    num_image_tokens: int,
    image_token_id: int,
) -> TrainLoader:
    """The loader for a pretrain/finetune config (see the module docstring for the batch contract).

    Its `layout` is the run's one BatchLayout (raises BatchSizeError when the global batch does not
    split into micro-batches over `world_size` processes); the training loop configures DeepSpeed
    from the same object."""
    layout = batch_layout(config.global_batch_size, config.micro_batch_size, world_size)
    data_path = config.resolve(config.data_path)
    image_folder = config.resolve(config.image_folder)
    if not data_path.is_file():
        raise FileNotFoundError(f"training data {data_path} does not exist (--data-path)")
    index, reason = load_index(
        config.index_path,
        data_path,
        template=config.template,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
    if index is None:
        log.info("data: %s; scanning %s (run `llava-trainer prepare` to skip this)", reason, data_path)
        index = scan_dataset(data_path, config.stage)
    records = JsonRecords(data_path, index.offset, index.nbytes)
    excluded, reasons = _excluded(
        index,
        records,
        num_image_tokens=num_image_tokens,
        max_length=config.max_length,
        bad_images=config.bad_images,
    )
    is_image = index.num_images > 0
    # Tokenizers' own thread pool would be forked into every worker; the workers are the parallelism.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dataset = LlavaDataset(
        records,
        template=config.template,
        tokenizer=tokenizer,
        images=ImagePipeline(image_processor, config.image_aspect_ratio),
        image_folder=image_folder,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
        max_length=config.max_length,
        bad_images=config.bad_images,
        is_image=is_image,
        excluded=excluded,
        tokens=index.tokens,
        mismatch=(index.flags & FLAG_MISMATCH) != 0,
    )
    sampler = MicroBatchSampler(
        index.lengths(num_image_tokens),
        is_image,
        np.flatnonzero(~excluded),
        micro_batch_size=layout.micro_batch_size,
        megabatch_size=layout.global_batch_size,  # one optimizer step of all ranks
        rank=rank,
        world_size=layout.world_size,
        seed=config.seed,
        group_by_length=config.group_by_modality_length,
    )
    stats = DataStats(records=len(records), skipped=reasons)
    if reasons:
        log.warning("data: %s: excluded before training: %s", data_path.name, dict(reasons))
    return TrainLoader(
        dataset,
        sampler,
        layout,
        pad_token_id=tokenizer.pad_token_id,
        num_workers=config.dataloader_workers,
        stats=stats,
    )
