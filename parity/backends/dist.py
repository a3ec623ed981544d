"""torch.distributed set-up shared by the model-parallel stacks (fairscale, megatron-core).

Under torchrun the environment (RANK, WORLD_SIZE, MASTER_ADDR ...) is given. A single-process run
still needs a process group of one, because fairscale and megatron-core look up their groups through
torch.distributed: it gets one over an in-memory store, and nothing is put into os.environ (a process
that loads a backend in-process, a test session, must not hand a rank and a port to the processes it
starts later). gloo on CPU, nccl on CUDA; PARITY_DIST_BACKEND=gloo runs CUDA ranks over gloo instead,
which lets several ranks share one GPU (nccl refuses two ranks on one device): slow, for testing tensor
parallelism on fewer GPUs than ranks (ci/gpu-smoke.sh).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import sys

import torch
import torch.distributed as dist

from parity.errors import UserError

DIST_BACKEND_ENV = "PARITY_DIST_BACKEND"
# nccl's default is 10 minutes; ranks that load their shards in turn (load_in_turns) wait longer than
# that for the last one on a big model. gloo's default is already 30 minutes.
GROUP_TIMEOUT = dt.timedelta(minutes=30)


def dist_backend(device: str) -> str:
    """The torch.distributed backend for ranks on `device`: gloo on cpu; nccl on cuda unless
    PARITY_DIST_BACKEND=gloo."""
    chosen = os.environ.get(DIST_BACKEND_ENV, "").strip().lower()
    if chosen not in ("", "nccl", "gloo"):
        raise UserError(f"{DIST_BACKEND_ENV}={chosen!r}: use nccl (the default on cuda) or gloo")
    if device != "cuda":
        return "gloo"
    return chosen or "nccl"


def ranks_share_gpus() -> bool:
    """Whether CUDA ranks may share a GPU (gloo); with nccl every rank needs a GPU of its own."""
    return dist_backend("cuda") == "gloo"


def init_distributed(device: str) -> tuple[int, int]:
    """Initialise the default process group once; returns (rank, world_size)."""
    if not dist.is_initialized():
        backend = dist_backend(device)
        if device == "cuda":
            torch.cuda.set_device(local_gpu(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count(),
                                             share=backend == "gloo"))
        if "RANK" in os.environ:  # launched by torchrun: its environment names the group
            dist.init_process_group(backend, timeout=GROUP_TIMEOUT)
        else:  # a group of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=GROUP_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def local_gpu(local_rank: int, visible: int, share: bool) -> int:
    """The GPU (index among the visible ones) of a node's local rank: its own, or round-robin when ranks
    share GPUs."""
    if visible < 1:
        raise UserError(f"no GPU visible to rank {local_rank} on {socket.gethostname()} (CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run with --device cpu or on GPU nodes")
    if local_rank >= visible and not share:
        raise UserError(f"local rank {local_rank} has no GPU of its own on {socket.gethostname()}: {visible} visible "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); nccl needs one "
                        f"GPU per rank: give the worker more GPUs, or set {DIST_BACKEND_ENV}=gloo to share them")
    return local_rank % visible


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def load_in_turns(load):
    """Run `load()` on this node's ranks one after the other (LOCAL_RANK order) and return its result:
    whatever a rank holds in host memory while it loads (its shard, before it moves to its GPU) is held by
    one rank of the node at a time, never by all of them together."""
    if world() == 1:
        return load()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    turns = int(os.environ.get("LOCAL_WORLD_SIZE", str(world())))  # torchrun: the same on every node
    result = None
    for turn in range(turns):
        if turn == local:
            result = load()
        dist.barrier()
    return result


def agreed_min(value: int, device: torch.device) -> int:
    """The smallest `value` over all ranks (every rank must call it at the same point): ranks that decide
    a batch size from their own free memory must all pick the same one."""
    if world() == 1:
        return int(value)
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(value)], dtype=torch.int64, device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather_objects(obj) -> list:
    """`obj` of every rank, in rank order (a collective: every rank calls it)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


# Modules holding a stack's model-parallel groups, each with its own destroy_model_parallel()
STACK_PARALLEL_STATE = ("fairscale.nn.model_parallel.initialize", "megatron.core.parallel_state")


def shutdown(clean: bool) -> None:
    """Leave the process group before the interpreter exits: left to teardown, gloo's threads can abort a
    rank ("terminate called without an active exception", SIGABRT) after all its work is done. After an
    error no barrier: the other ranks may never reach it."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        # the stacks' model-parallel groups are built on this group: forget them with it, so a later
        # init_distributed in the same process (tests score in-process) builds fresh ones
        for module in STACK_PARALLEL_STATE:
            if module in sys.modules:
                sys.modules[module].destroy_model_parallel()
        dist.destroy_process_group()
