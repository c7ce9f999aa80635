"""Helpers for the training tests (no tests here; the synthetic data_dir is conftest's `synth_dir`):
stage configs sized for CPU, a single-process world inside pytest, spies on
the model and fault injection into the real data loader."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llava_trainer.config import FinetuneConfig, PretrainConfig


def configs(data_dir: Path, output_root: Path, **overrides: Any) -> tuple[PretrainConfig, FinetuneConfig]:
    """Pretrain and finetune configs for the synthetic models: CPU-sized batches, few steps, a
    constant learning rate high enough to see the loss move."""
    common: dict[str, Any] = {
        "data_dir": data_dir,
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "save_steps": 1000,
        "logging_steps": 1,
        "dataloader_workers": 0,
        "gradient_checkpointing": True,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
        "seed": 11,
    }
    common |= overrides
    pretrain = PretrainConfig(
        output_dir=output_root / "checkpoints_pretrain", **{"learning_rate": 1e-2, **common}
    )
    finetune = FinetuneConfig(
        output_dir=output_root / "checkpoints_finetune", **{"learning_rate": 1e-3, **common}
    )
    return pretrain, finetune


def subset_json(source: Path, dest: Path, count: int) -> Path:
    """The first `count` records of a LLaVA JSON file (a tiny dataset to overfit)."""
    records = json.loads(source.read_text())[:count]
    dest.write_text(json.dumps(records))
    return dest


_WORLD: Any = None
_WORLD_ENV: dict[str, str] = {}


@contextlib.contextmanager
def single_process_world() -> Iterator[Any]:
    """A world-size-1 process group inside pytest. Created once per session and never destroyed
    (DeepSpeed caches its groups, so a second init in one process fails); the env it needs is set
    only inside the block, and the SIGTERM handler is restored afterwards."""
    global _WORLD
    from llava_trainer.distributed import init_distributed

    saved = dict(os.environ)
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if _WORLD is None:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(key, None)
            _WORLD = init_distributed()
            _WORLD_ENV.update({k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")})
        os.environ.update(_WORLD_ENV)
        yield _WORLD
    finally:
        os.environ.clear()
        os.environ.update(saved)
        signal.signal(signal.SIGTERM, previous_sigterm)


def train_capturing(config: Any, world: Any) -> tuple[int, list[dict[str, Any]]]:
    """Run one stage in this process; returns its exit code and JSON log records."""
    from llava_trainer.train import train

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train(config, world)
    return code, records(out.getvalue())


def records(stdout: str, event: str | None = None) -> list[dict[str, Any]]:
    """The trainer's JSON log lines (of one event kind if given)."""
    found = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if event is None or record.get("event") == event:
                found.append(record)
    return found


def losses(log: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in log if r["event"] == "step"}


def snapshot(model: Any) -> dict[str, Any]:
    """A CPU copy of every weight (gathered first under ZeRO-3)."""
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


class FaultyLoader:
    """The real loader, plus a crash or a SIGTERM to ourselves after `at` micro-batches."""

    def __init__(self, loader: Any, *, crash_at: int | None = None, sigterm_at: int | None = None) -> None:
        self.loader, self.crash_at, self.sigterm_at, self.served = loader, crash_at, sigterm_at, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.served += 1
            if self.served == self.crash_at:
                raise RuntimeError("simulated crash")
            if self.served == self.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def exported_state(directory: Path) -> dict[str, Any]:
    """The weights of an exported model directory, keyed as the in-memory model's state_dict
    (the files use the llava-hf checkpoint names; from_pretrained maps them)."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(directory)
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}
