"""Model I/O for the evaluate stage: load the finetuned Hugging Face LLaVA checkpoint, answer MMMU
questions in batches, shard the work across torchrun ranks and gather the answers on rank 0.

Determinism: the questions are cut into the same global batches whatever the world size, batch i
goes to rank i mod world_size, and each batch is generated under its own seed (seed + i). A batch
therefore sees the same padding and random numbers on 1 or N ranks, so N ranks give exactly the
predictions 1 rank gives (for a fixed device and thread count).

The device and the process-group backend come from `torch.accelerator` (vendor-neutral: CUDA, ROCm,
XPU, NPU, … or the CPU with gloo); inference needs no DeepSpeed.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .data import Problems, Question, decode_image, load_images
from .prompts import ImageMode, conversation_prompt, images_to_pass, question_prompt

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Ranks:
    """This process's place in the torchrun world."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    """Whether this evaluation created the process group (and so destroys it at the end)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Ranks:
    """Join the torchrun world when WORLD_SIZE > 1 (env:// rendezvous); pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if torch.accelerator.is_available():
        accelerator = torch.accelerator.current_accelerator()
        index = local_rank % torch.accelerator.device_count()
        torch.accelerator.set_device_index(index)
        device = torch.device(accelerator.type, index)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend=dist.get_default_backend_for_device(device))
    return Ranks(rank, world_size, local_rank, device, owns_group)


def global_batches(questions: Sequence[Question], batch_size: int) -> list[list[Question]]:
    """Consecutive batches in data order: the unit of work, identical for every world size."""
    return [list(questions[i : i + batch_size]) for i in range(0, len(questions), batch_size)]


def rank_batches(batches: Sequence[list[Question]], ranks: Ranks) -> list[tuple[int, list[Question]]]:
    """(global index, batch) pairs this rank answers: every world_size-th batch."""
    return [(i, b) for i, b in enumerate(batches) if i % ranks.world_size == ranks.rank]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 42
    images: ImageMode = "first"


class Answerer:
    """The model and processor of one checkpoint, answering batches of questions."""

    def __init__(self, model_dir: Path, precision: str, device: torch.device, settings: GenerationSettings):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.settings, self.device, self.dtype = settings, device, DTYPES[precision]
        self.processor = AutoProcessor.from_pretrained(model_dir)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # batched generation continues every row from its last token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        self.model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=self.dtype)
        self.model.to(device).eval()
        self.generation_config = self._generation_config(tokenizer.pad_token_id)

    def _generation_config(self, pad_token_id: int):
        """The checkpoint's generation config (token ids) with our decoding settings on top.

        Sampling uses transformers' defaults (top_k 50, top_p 1.0), not whatever the language
        model's config suggests, so that `--do-sample true --num-beams 5` reproduces the official run.
        """
        s = self.settings
        config = copy.deepcopy(self.model.generation_config)
        config.update(
            max_new_tokens=s.max_new_tokens,
            num_beams=s.num_beams,
            do_sample=s.do_sample,
            temperature=s.temperature if s.do_sample else 1.0,
            top_p=1.0,
            top_k=50,
            num_return_sequences=1,
            use_cache=True,
            pad_token_id=pad_token_id,
        )
        return config

    def _inputs(self, batch: Sequence[Question], problems: Problems) -> tuple[list[str], list]:
        """Conversation prompts and the flat list of images, in order (one `<image>` per image)."""
        prompts, images = [], []
        for question in batch:
            decoded = []
            for index in images_to_pass(question, self.settings.images):
                data = question.images.get(index)
                if data is None:
                    continue  # already recorded by load_images
                try:
                    decoded.append(decode_image(data))
                except Exception as err:
                    problems.image_errors.setdefault(
                        question.id, f"image_{index} cannot be decoded: {type(err).__name__}: {err}"
                    )
            prompts.append(conversation_prompt(question_prompt(question), len(decoded)))
            images.extend(decoded)
        return prompts, images

    @torch.inference_mode()
    def answer(self, batch: Sequence[Question], batch_index: int, problems: Problems) -> list[str]:
        """Greedy (or beam/sampled) answers for one batch, seeded by the batch's global index."""
        prompts, images = self._inputs(batch, problems)
        inputs = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.dtype)  # casts only the floating pixel values
        torch.manual_seed(self.settings.seed + batch_index)
        output = self.model.generate(**inputs, generation_config=self.generation_config)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


ProgressCallback = Callable[[int, int, float], None]
"""(batches done on this rank, batches of this rank, seconds so far)."""


@dataclass
class Answers:
    """What the ranks produced, merged on rank 0."""

    responses: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    """Question id -> why generation failed (the response is then empty)."""
    image_errors: dict[str, str] = field(default_factory=dict)
    """Question id -> why an image was left out (found by any rank)."""

    def merge(self, other: Answers) -> None:
        self.responses.update(other.responses)
        self.errors.update(other.errors)
        self.image_errors.update(other.image_errors)


def answer_all(
    questions: Sequence[Question],
    model_dir: Path,
    precision: str,
    batch_size: int,
    settings: GenerationSettings,
    ranks: Ranks,
    on_progress: ProgressCallback | None = None,
) -> Answers | None:
    """Answer this rank's share of the batches and gather all answers on rank 0 (None elsewhere).

    A batch that fails is retried question by question; a question that still fails gets an empty
    response and its error is reported (it then counts as wrong, like any unparseable answer).
    """
    mine = rank_batches(global_batches(questions, batch_size), ranks)
    problems = Problems()  # collects this rank's image errors
    wanted = {q.id: images_to_pass(q, settings.images) for _, batch in mine for q in batch}
    load_images([q for _, batch in mine for q in batch], wanted, problems)
    answerer = Answerer(model_dir, precision, ranks.device, settings)
    answers = Answers()
    started = time.monotonic()
    for done, (index, batch) in enumerate(mine, start=1):
        try:
            texts = answerer.answer(batch, index, problems)
            answers.responses.update(zip((q.id for q in batch), texts, strict=True))
        except Exception as err:
            log.warning(
                "batch %d failed (%s: %s); answering its questions one by one", index, type(err).__name__, err
            )
            for question in batch:
                try:
                    answers.responses[question.id] = answerer.answer([question], index, problems)[0]
                except Exception as single_err:
                    answers.responses[question.id] = ""
                    answers.errors[question.id] = f"{type(single_err).__name__}: {single_err}"
        for question in batch:  # the encoded images are not needed any more
            question.images.clear()
        if on_progress is not None:
            on_progress(done, len(mine), time.monotonic() - started)
    answers.image_errors = problems.image_errors
    return gather_on_main(answers, ranks)


def gather_on_main(answers: Answers, ranks: Ranks) -> Answers | None:
    """Every rank's answers merged on rank 0; None on the other ranks."""
    if ranks.world_size == 1:
        return answers
    gathered: list[Answers | None] | None = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(answers, gathered, dst=0)
    if not ranks.is_main:
        return None
    merged = Answers()
    for part in gathered or []:
        if part is not None:
            merged.merge(part)
    return merged
