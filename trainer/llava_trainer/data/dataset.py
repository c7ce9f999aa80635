"""One training sample from one LLaVA record: tokens, labels, pixel values.

`build_sample` is the whole recipe for a record (used by the loader, `inspect` and tests);
`LlavaDataset` applies it to records read by offset and decides what happens to samples that
cannot be trained on (skip and count, or fail naming the file).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .formats import JsonRecords, MalformedRecord, image_file, parse_record
from .images import ImageError, ImagePipeline
from .index import TokenTable
from .templates import SkipSample, TokenizedSample, fit_to_length, render, tokenize_prompt

REPLACEMENT_TRIES = 16


@dataclass(frozen=True)
class Sample:
    id: str
    input_ids: np.ndarray
    labels: np.ndarray
    pixel_values: np.ndarray | None
    """[num_images, 3, H, W] float32, None for text-only samples (and when images were not loaded)."""
    image_paths: tuple[str, ...]
    mismatch: bool = False
    truncated: bool = False


def tokenize_record(
    record: Any, *, template: str, tokenizer: Any, image_token_id: int, num_image_tokens: int
) -> tuple[tuple[str, ...], TokenizedSample]:
    """(image paths, untruncated tokens) of a raw record; raises SkipSample if malformed."""
    try:
        conversation = parse_record(record)
    except MalformedRecord as err:
        raise SkipSample("malformed", str(err)) from None
    prompt = render(template, conversation.turns, len(conversation.images))
    tokens = tokenize_prompt(
        prompt, tokenizer, image_token_id=image_token_id, num_image_tokens=num_image_tokens
    )
    return conversation.images, tokens


def build_sample(
    record: Any,
    *,
    template: str,
    tokenizer: Any,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
    image_folder: str | Path | None = None,
    images: ImagePipeline | None = None,
    tokens: TokenizedSample | None = None,
) -> Sample:
    """Everything the model trains on for one record.

    Raises SkipSample (malformed record, image block beyond max_length) or ImageError (missing or
    corrupt image, naming the file). Images are loaded only when `images` is given. `tokens`:
    the record's untruncated tokens when known (prepare's index), else the record is tokenized.
    """
    if tokens is None:
        paths, tokens = tokenize_record(
            record,
            template=template,
            tokenizer=tokenizer,
            image_token_id=image_token_id,
            num_image_tokens=num_image_tokens,
        )
    else:
        try:
            paths = parse_record(record).images
        except MalformedRecord as err:
            raise SkipSample("malformed", str(err)) from None
    tokens = fit_to_length(tokens, max_length)
    pixel_values = None
    if paths and images is not None:
        folder = image_folder if image_folder is not None else ""
        loaded = [images.load(image_file(folder, p)) for p in paths]  # paths parse_record checked
        pixel_values = loaded[0][None] if len(loaded) == 1 else np.stack(loaded)  # no copy for one image
    return Sample(
        id=str(record.get("id", "")),
        input_ids=tokens.input_ids,
        labels=tokens.labels,
        pixel_values=pixel_values,
        image_paths=paths,
        mismatch=tokens.mismatch,
        truncated=tokens.truncated,
    )


class LlavaDataset:
    """Samples by index from an offset-indexed JSON file; picklable into DataLoader workers."""

    def __init__(
        self,
        records: JsonRecords,
        *,
        template: str,
        tokenizer: Any,
        images: ImagePipeline,
        image_folder: Path,
        image_token_id: int,
        num_image_tokens: int,
        max_length: int,
        bad_images: str,
        is_image: np.ndarray,
        excluded: np.ndarray,
        tokens: TokenTable | None = None,
        mismatch: np.ndarray | None = None,
    ) -> None:
        self.records, self.template, self.tokenizer, self.images = records, template, tokenizer, images
        self.image_folder, self.image_token_id, self.num_image_tokens = (
            image_folder,
            image_token_id,
            num_image_tokens,
        )
        self.max_length, self.bad_images = max_length, bad_images
        self.is_image, self.excluded = np.asarray(is_image, dtype=bool), np.asarray(excluded, dtype=bool)
        self.tokens = tokens
        """prepare's token table: samples are not tokenized again (`mismatch`: their mismatch flags)."""
        self.mismatch = np.zeros(len(records), bool) if mismatch is None else np.asarray(mismatch, bool)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        tokens = None
        if self.tokens is not None:
            tokens = self.tokens.sample(
                index,
                image_token_id=self.image_token_id,
                num_image_tokens=self.num_image_tokens,
                mismatch=bool(self.mismatch[index]),
            )
        return build_sample(
            self.records[index],
            tokens=tokens,
            template=self.template,
            tokenizer=self.tokenizer,
            image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens,
            max_length=self.max_length,
            image_folder=self.image_folder,
            images=self.images,
        )

    def micro_batch(self, indices: list[int]) -> tuple[list[Sample], Counter[str]]:
        """The samples of one micro-batch and what was skipped.

        A sample that cannot be used is replaced by the next usable sample of the same modality
        (deterministic, keeps the batch size and the modality purity); with `bad_images: error`
        a bad image stops training with the file's name instead.
        """
        samples: list[Sample] = []
        skipped: Counter[str] = Counter()
        taken = set(indices)
        for index in indices:
            sample = self._usable(index, skipped)
            for candidate in self._replacements(index) if sample is None else ():
                if candidate not in taken:
                    taken.add(candidate)
                    sample = self._usable(candidate, skipped)
                    if sample is not None:
                        break
            if sample is not None:
                samples.append(sample)
        if not samples:
            raise RuntimeError(
                f"{self.records.path}: no usable sample for micro-batch {indices[:8]} nor its replacements "
                f"(skipped: {dict(skipped)}); run `llava-trainer prepare` so such samples are excluded up front"
            )
        return samples, skipped

    def _usable(self, index: int, skipped: Counter[str]) -> Sample | None:
        try:
            return self[index]
        except SkipSample as err:
            skipped[err.reason] += 1
        except ImageError as err:
            if self.bad_images != "skip":
                raise RuntimeError(
                    f"{self.records.path} record {index}: {err}. "
                    "Fix or remove the file, or set bad_images: skip to skip such samples."
                ) from None
            skipped["bad_image"] += 1
        return None

    def _replacements(self, index: int) -> Iterator[int]:
        """The next REPLACEMENT_TRIES usable-looking samples of the same modality after `index`."""
        found = 0
        for step in range(1, len(self)):
            candidate = (index + step) % len(self)
            if self.is_image[candidate] == self.is_image[index] and not self.excluded[candidate]:
                yield candidate
                found += 1
                if found == REPLACEMENT_TRIES:
                    return
