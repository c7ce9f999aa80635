"""Process-group setup for torchrun, the training-operator's env, or a single process.

The operator renders `torchrun --no-python llava-trainer <stage> ...`; torchrun reads the
training-operator's PET_NNODES / PET_NPROC_PER_NODE / PET_NODE_RANK and hands each worker RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Started *without* torchrun inside such a pod
(where the operator's RANK is the pod index, not a process rank), the trainer re-executes itself
under torchrun. With none of that env it is one process, world size 1.

Device, backend and synchronisation come from `deepspeed.get_accelerator()`, never
CUDA by name; `LLAVARUN_DIST_BACKEND` overrides the backend (the accelerator profile's choice).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch

log = logging.getLogger(__name__)

TORCHRUN_MARKERS = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "GROUP_RANK")


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    device_type: str
    device_name: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun(env: Mapping[str, str]) -> bool:
    return any(k in env for k in TORCHRUN_MARKERS)


def torchrun_relaunch_command(env: Mapping[str, str], trainer_args: list[str]) -> list[str] | None:
    """The torchrun command to re-execute under, when the training-operator's env asks for a
    launcher (PET_NPROC_PER_NODE / PET_NNODES) but we were started without one; else None."""
    if launched_by_torchrun(env) or not (env.get("PET_NPROC_PER_NODE") or env.get("PET_NNODES")):
        return None
    command = [sys.executable, "-m", "torch.distributed.run"]
    options = {
        "--nnodes": env.get("PET_NNODES", "1"),
        "--nproc-per-node": env.get("PET_NPROC_PER_NODE", "1"),
        "--node-rank": env.get("PET_NODE_RANK", "0"),
        "--master-addr": env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR"),
        "--master-port": env.get("PET_MASTER_PORT") or env.get("MASTER_PORT"),
    }
    for flag, value in options.items():
        if value:
            command += [flag, value]
    return [*command, "-m", "llava_trainer", *trainer_args]


def relaunch_under_torchrun_if_needed(trainer_args: list[str]) -> None:
    """Replace this process by torchrun when the pod env says so (see the module docstring)."""
    command = torchrun_relaunch_command(os.environ, trainer_args)
    if command:
        log.info("not started by torchrun in a training-operator pod; re-executing: %s", " ".join(command))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> World:
    """Initialise the process group (also for one process: DeepSpeed needs one) and the device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # one process, no launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))

    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = os.environ.get("LLAVARUN_DIST_BACKEND") or accelerator.communication_backend_name()
    device_type = accelerator.device_name()
    if device_type != "cpu":
        accelerator.set_device(local_rank)
    device = torch.device(accelerator.device_name(local_rank) if device_type != "cpu" else "cpu")
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))
    world = World(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        backend=backend,
        device=device,
        device_type=device_type,
        device_name=device_name(device_type, local_rank),
    )
    log.info(
        "distributed: rank %d/%d, device %s (%s), backend %s",
        world.rank,
        world.world_size,
        device,
        world.device_name,
        backend,
    )
    return world


def device_name(device_type: str, index: int) -> str:
    """The marketing name of the device ("NVIDIA H100 80GB HBM3"), for the peak-FLOP/s table."""
    if device_type == "cpu":
        return "cpu"
    module = getattr(torch, device_type, None)  # torch.cuda, torch.xpu, torch.npu (torch_npu), ...
    get_name = getattr(module, "get_device_name", None)
    try:
        return str(get_name(index)) if get_name else device_type
    except Exception:
        return device_type


def all_reduce_floats(values: list[float], world: World, op: str = "sum") -> list[float]:
    """Sum (or max) a few numbers over all ranks, on the device the backend wants."""
    if world.world_size == 1:
        return list(values)
    device = world.device if world.backend != "gloo" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float32, device=device)  # float32: every backend has it
    reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
    torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor.tolist()


def barrier(world: World) -> None:
    if world.world_size > 1:
        torch.distributed.barrier()


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
