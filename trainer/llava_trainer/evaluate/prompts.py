"""The official MMMU prompts for LLaVA-1.5 (MMMU-Benchmark/MMMU `configs/llava1.5.yaml`,
`construct_prompt`) inside LLaVA's vicuna_v1 conversation template, as `run_llava.py` asks them.

    multiple choice: "{question}\n(A) {option}\n(B) {option}\n\nAnswer with the option's letter from
                     the given choices directly."
    open:            "{question}\nAnswer the question using a single word or phrase."
    conversation:    "{system} USER: <image>\n{prompt} ASSISTANT:"

`<image N>` references inside questions and options stay literal text, as in the original.
"""

from __future__ import annotations

import re
from typing import Literal

from .data import MAX_IMAGES, Question

MULTI_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TOKEN = "<image>"

ImageMode = Literal["first", "referenced"]
_IMAGE_REFERENCE = re.compile(r"<image (\d+)>")


def option_letters(options: list[str]) -> dict[str, str]:
    """Letter -> option text, "A" first (the original's `index2ans`)."""
    return {chr(ord("A") + i): option for i, option in enumerate(options)}


def question_prompt(question: Question) -> str:
    """The official `final_input_prompt` (task_instructions are empty for LLaVA-1.5)."""
    if question.is_multiple_choice:
        listed = "".join(f"({letter}) {text}\n" for letter, text in option_letters(question.options).items())
        return f"{question.question}\n{listed}\n{MULTI_CHOICE_INSTRUCTION}"
    return f"{question.question}\n{OPEN_INSTRUCTION}"


def conversation_prompt(prompt: str, num_images: int) -> str:
    """vicuna_v1 with one `<image>` per image at the start of the user turn (LLaVA's eval layout;
    several images are joined by spaces, as lmms-eval's LLaVA wrapper does)."""
    images = " ".join([IMAGE_TOKEN] * num_images) + "\n" if num_images else ""
    return f"{VICUNA_V1_SYSTEM} USER: {images}{prompt} ASSISTANT:"


def referenced_images(question: Question) -> list[int]:
    """The image indices `<image N>` mentioned in the question or its options, ascending."""
    text = " ".join([question.question, *question.options])
    return sorted({int(n) for n in _IMAGE_REFERENCE.findall(text) if 1 <= int(n) <= MAX_IMAGES})


def images_to_pass(question: Question, mode: ImageMode) -> list[int]:
    """Which images the model sees.

    "first" is the official protocol: image_1 only, whatever the question references (MMMU
    maintainers, MMMU-Benchmark/MMMU#9). "referenced" passes every referenced image (lmms-eval's
    choice); a question that references none still gets image_1.
    """
    if mode == "first":
        return [1]
    return referenced_images(question) or [1]
