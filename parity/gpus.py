"""Which device a run uses and which GPUs each worker gets.

Device: decided where the models run. With the local and torchrun launchers that is this machine
(torchrun: the same `parity run` runs on every node); under slurm the workers run in the allocation,
not on the node `parity run` was started on (often a login node without GPUs), so the allocation is
asked (one `srun` task). A worker told to use cuda on a node without a usable GPU stops with one line
(check_device_here) instead of silently running on the CPU.

GPUs: every worker gets GPUs of its own from a pool of the visible ones (CUDA_VISIBLE_DEVICES for the
worker), so workers side by side never share a GPU and accelerate's "auto" placement only sees the
memory of the GPUs it was given. A worker needs one GPU per rank (fairscale, megatron-core) or, for a
backend that spreads one process over GPUs (hf), the size's TP (BackendInfo.gpus), or PARITY_SPREAD_GPUS
when set (e.g. to spread a small model over 2 GPUs in ci/gpu-smoke.sh).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

from parity.errors import UserError

SPREAD_GPUS_ENV = "PARITY_SPREAD_GPUS"
PROBE = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES spells them (indices, UUIDs or MIG ids)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(n)]
    return [g.strip() for g in listed.split(",") if g.strip()][:n]


def default_device(launcher: str) -> str:
    """cuda where the workers will run has a GPU, else cpu (see the module docstring)."""
    if launcher != "slurm":
        return "cuda" if visible_gpus() else "cpu"
    return "cuda" if slurm_gpus() else "cpu"


def slurm_gpus(timeout: float = 300) -> int:
    """GPUs one node of the slurm allocation sees (asked with one srun task on it)."""
    cmd = ["srun", "--nodes=1", "--ntasks=1", sys.executable, "-c", PROBE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"--launcher slurm: cannot ask the allocation for its GPUs ({e}); run inside salloc/sbatch "
                        f"or pass --device cuda / --device cpu") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].strip().isdigit():
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]
        raise UserError(f"--launcher slurm: `srun` could not report the allocation's GPUs ({why}); run inside "
                        f"salloc/sbatch or pass --device cuda / --device cpu")
    return int(lines[-1])


def check_device_here(device: str, where, dtype: str | None = None) -> None:
    """A worker told to compute on cuda must have a GPU (one line, not a silent CPU run), and one that
    computes in the run's dtype: an fp64 matmul is tried first (a device without fp64 says so in one line)."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{where}: the run chose --device cuda but {socket.gethostname()} has no usable GPU "
                        f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run on GPU nodes or pass --device cpu")
    if dtype == "fp64":
        try:
            x = torch.ones(2, 2, dtype=torch.float64, device="cuda")
            float((x @ x).sum())
        except RuntimeError as e:
            raise UserError(f"{where}: {torch.cuda.get_device_name()} does not compute in fp64 "
                            f"({str(e).splitlines()[0][:120]}); run the fp64 judge with --device cpu") from None


def worker_gpus(gpus_from: str, ranks: int, size_tp: int, available: int | None, share: bool) -> int:
    """GPUs a worker gets: one per rank, or the size's TP for a backend that spreads one process (hf), at
    most the `available` ones (None: no limit known); ranks sharing GPUs (gloo) take what there is."""
    want = ranks if gpus_from == "ranks" else _spread_gpus(size_tp)
    if available is None or (gpus_from == "ranks" and not share):
        return want  # GpuPool.check refuses more than the pool has
    return max(1, min(want, available))


def _spread_gpus(size_tp: int) -> int:
    value = os.environ.get(SPREAD_GPUS_ENV, "").strip()
    if not value:
        return size_tp
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{SPREAD_GPUS_ENV}={value!r}: must be a positive number of GPUs")
    return int(value)


class GpuPool:
    """Hands out GPUs to workers, first come first served: a worker waits until its GPUs are all free
    (a large request is never starved by smaller ones that came after it)."""

    def __init__(self, gpus: list[str]):
        self.free = list(gpus)
        self.size = len(gpus)
        self._cond = threading.Condition()
        self._queue: list[object] = []

    def check(self, n: int, what: str) -> None:
        if n > self.size:
            from parity.backends.dist import DIST_BACKEND_ENV

            raise UserError(f"{what} needs {n} GPU(s) but {self.size} visible here (CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run it on a node with {n} GPUs, "
                            f"use --device cpu, or set {DIST_BACKEND_ENV}=gloo to let TP ranks share GPUs (slow)")

    def ticket(self) -> object:
        """A place in the queue, taken now: the run takes one per worker in the order it lists them, so
        workers get their GPUs in that order, whatever order their threads reach lease()."""
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
        return ticket

    def cancel(self, ticket: object) -> None:
        """Give up a place not used (a worker that failed before it needed GPUs), so the queue moves on."""
        with self._cond:
            if ticket in self._queue:
                self._queue.remove(ticket)
                self._cond.notify_all()

    @contextmanager
    def lease(self, n: int, ticket: object | None = None):
        """n GPUs for the duration of the block (their ids, to become the worker's CUDA_VISIBLE_DEVICES)."""
        ticket = ticket if ticket is not None else self.ticket()
        with self._cond:
            self._cond.wait_for(lambda: self._queue[0] is ticket and len(self.free) >= n)
            self._queue.pop(0)
            got, self.free = self.free[:n], self.free[n:]
            self._cond.notify_all()
        try:
            yield got
        finally:
            with self._cond:
                self.free = sorted(self.free + got, key=_gpu_order)
                self._cond.notify_all()


def _gpu_order(gpu: str):
    return (0, int(gpu), "") if gpu.isdigit() else (1, 0, gpu)
