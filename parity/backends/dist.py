"""torch.distributed set-up shared by the model-parallel stacks (fairscale, megatron-core).

Under torchrun the environment (RANK, WORLD_SIZE, MASTER_ADDR ...) is given. A single-process run
still needs a process group of one, because fairscale and megatron-core look up their groups through
torch.distributed: it gets one over an in-memory store, and nothing is put into os.environ (a process
that loads a backend in-process, a test session, must not hand a rank and a port to the processes it
starts later). gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int]:
    """Initialise the default process group once; returns (rank, world_size)."""
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if device == "cuda" else "gloo"
        if "RANK" in os.environ:  # launched by torchrun: its environment names the group
            dist.init_process_group(backend)
        else:  # a group of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def shutdown(clean: bool) -> None:
    """Leave the process group before the interpreter exits: left to teardown, gloo's threads can abort a
    rank ("terminate called without an active exception", SIGABRT) after all its work is done. After an
    error no barrier: the other ranks may never reach it."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
