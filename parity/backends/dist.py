"""torch.distributed set-up shared by the model-parallel stacks (fairscale, megatron-core).

Under torchrun the environment (RANK, WORLD_SIZE, MASTER_ADDR ...) is given. A single-process run
still needs a process group of one, because fairscale and megatron-core look up their groups through
torch.distributed: we supply that environment ourselves. gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str) -> tuple[int, int]:
    """Initialise the default process group once; returns (rank, world_size)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # not launched by torchrun: a group of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
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
