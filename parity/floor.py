"""The same-stack noise floor: perturbations that do not change the mathematics, one table.

`parity run --noise-floor` scores every (size, backend) once more per perturbation that applies to the run's
device and dtype. Each is the same model on the same requests; only how the arithmetic is scheduled changes
(batch shapes, neighbours and padding widths, thread count, TF32 matmuls). How far a stack moves under them
is its noise floor; a cross-stack difference is judged against it (parity.report.floor). A floor unit is
an ordinary unit with a perturbation name (run.Unit, jobs.JobUnit.perturbation), scored by the same worker
and loaded model as the plain units of its (size, backend) (a floor costs scoring time, not loading time):
stored, resumed and reused by its inputs hash like every other unit, under RUN/floor/<perturbation>/.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from parity.errors import UserError


@dataclass(frozen=True)
class Perturbation:
    name: str
    what: str  # one phrase for the report
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[str, ...] | None = None  # None: every dtype
    batch_size: str | None = None  # replaces the run's --batch-size
    order: str | None = None  # base.Backend.batch_order
    other_threads: bool = False  # torch.set_num_threads: 1, or 2 when the worker would run 1
    tf32: bool = False  # TF32 matmuls and convolutions on (torch's default for matmuls is off)

    def applies(self, device: str, dtype: str) -> bool:
        return device in self.devices and (self.dtypes is None or dtype in self.dtypes)

    def settings(self) -> dict:
        """What enters the unit's inputs hash besides the plain unit's fields."""
        return {"name": self.name, "batch_size": self.batch_size, "order": self.order,
                "other_threads": self.other_threads, "tf32": self.tf32}


PERTURBATIONS: dict[str, Perturbation] = {p.name: p for p in [
    Perturbation("batch1", "batch size 1 instead of the run's batching", batch_size="1"),
    Perturbation("reversed", "shortest inputs first: other neighbours and padding widths", order="shortest"),
    Perturbation("repeat", "the same run again"),
    Perturbation("threads", "another CPU thread count", devices=("cpu",), other_threads=True),
    # TF32 rounds fp32 matmul inputs to 10 mantissa bits: only an fp32 run on cuda has anything to change
    Perturbation("tf32", "TF32 matmuls on", devices=("cuda",), dtypes=("fp32",), tf32=True),
]}


def applicable(device: str, dtype: str) -> list[str]:
    return [name for name, p in PERTURBATIONS.items() if p.applies(device, dtype)]


def check_backends(backends: list[str]) -> None:
    """--noise-floor needs every backend to batch through the shared scoring code (one line otherwise)."""
    from parity.backends import backend_info

    for b in backends:
        if not backend_info(b).batches:
            raise UserError(f"--noise-floor: backend {b!r} cannot change its batch composition (its registry row "
                            f"says batches=False), so it has no floor to measure; leave it out of --backends "
                            f"or run without --noise-floor")


@contextlib.contextmanager
def applied(name: str, backend):
    """In the worker, around one unit: the perturbation's batch order, threads and TF32, restored after (the
    same loaded model scores the plain units and every perturbation)."""
    if not name:
        yield
        return
    import torch

    p = PERTURBATIONS[name]
    saved = (backend.batch_order, torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    try:
        if p.order:
            backend.batch_order = p.order
        if p.other_threads:
            torch.set_num_threads(1 if saved[1] > 1 else 2)
        if p.tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        yield
    finally:
        backend.batch_order = saved[0]
        torch.set_num_threads(saved[1])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[2], saved[3]


def batch_size(name: str, run_batch):
    """The batch size a unit is scored with: the perturbation's, else the run's."""
    p = PERTURBATIONS.get(name) if name else None
    return p.batch_size if p and p.batch_size else run_batch
