"""Why a local attempt failed, in one line, from its log: the summary quotes it next to the log path
so a failed run says what went wrong without opening the file."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable
from pathlib import Path

RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")
"""torchrun prefixes a worker's stderr with its rank."""
TRACEBACK = "Traceback (most recent call last):"
CHAINED = (
    "The above exception was the direct cause of the following exception:",
    "During handling of the above exception, another exception occurred:",
)
LAUNCHER = "torch.distributed.elastic."
"""torchrun's own ChildFailedError only repeats that a worker failed; the worker's line says why."""
TRAINER_MESSAGE = re.compile(r"^llava-trainer(?: [a-z]+)?: ")
"""The trainer's readable refusals (bad flags, an incomplete data_dir) are printed, not raised."""
CONTINUATION_LINES = 3
MAX_LENGTH = 400


def _with_details(lines: list[str], i: int) -> str:
    """Line i, plus the indented lines that follow it when it ends with ':' (a list of problems)."""
    text = lines[i].strip()
    if text.endswith(":"):
        details = []
        for line in lines[i + 1 : i + 1 + CONTINUATION_LINES]:
            if not line.startswith((" ", "\t")) or not line.strip():
                break
            details.append(line.strip())
        text = " ".join([text, *details])
    return text[:MAX_LENGTH]


def failure_line(raw_lines: Iterable[str]) -> str | None:
    """The first exception a process raised, as Python printed it (`module.Error: message`; for a
    chained exception the one finally raised), or the trainer's own `llava-trainer ...:` message;
    None when the log holds neither (e.g. a process killed by a signal)."""
    lines = [RANK_PREFIX.sub("", line.rstrip("\n")) for line in raw_lines]
    i = 0
    while i < len(lines):
        line = lines[i]
        if TRAINER_MESSAGE.match(line):
            return _with_details(lines, i)
        if not line.startswith(TRACEBACK):
            i += 1
            continue
        i += 1
        while i < len(lines) and (lines[i].startswith((" ", "\t")) or not lines[i].strip()):
            i += 1  # the frames
        if i >= len(lines):
            return None
        rest = [x for x in lines[i + 1 : i + 6] if x.strip()]
        if rest and rest[0].strip() in CHAINED:
            continue  # the next traceback ends with the exception that was raised in the end
        if not lines[i].startswith(LAUNCHER):
            return _with_details(lines, i)
        i += 1
    return None


def describe_exit(code: int, log: Path) -> str:
    """`exited 1: ValueError: ...; log: PATH` for a process group's exit status."""
    what = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}"
    try:
        with log.open(errors="replace") as f:
            line = failure_line(f)
    except OSError:
        line = None
    return f"{what}: {line}; log: {log}" if line else f"{what}; log: {log}"
