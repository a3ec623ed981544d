"""Trace units of a Job (mode "trace"), run by the ordinary worker (`parity score JOB`, torchrun for TP > 1).

A unit's `requests` file holds the model inputs ({"inputs": [[token ids], ...]}); its output is a
torch file of boundary name -> canonical tensor (parity.trace.capture), written by rank 0 after every
rank took part in the capture and its TP gather. A unit may name its own checkpoint and dtype (the
reference's noise run in a wider dtype, or several converted checkpoints traced by one launch): the backend is
loaded once per distinct (checkpoint, dtype), in the order the units come.
"""

from __future__ import annotations

import gc
from pathlib import Path

from parity.errors import UserError
from parity.io import atomic_file, read_json, write_json
from parity.jobs import Job


def write_inputs(path, inputs: list[list[int]]) -> None:
    write_json(path, {"inputs": [list(map(int, seq)) for seq in inputs]}, indent=None)


def read_inputs(path) -> list[list[int]]:
    d = read_json(path, "trace inputs")
    seqs = d.get("inputs") if isinstance(d, dict) else None
    if not isinstance(seqs, list) or not all(isinstance(s, list) and all(isinstance(t, int) for t in s)
                                             for s in seqs):
        raise UserError(f"{path}: not a trace inputs file ({{\"inputs\": [[token ids], ...]}})")
    return seqs


def save_capture(path, tensors: dict) -> None:
    import torch

    with atomic_file(path, "wb") as f:
        torch.save(tensors, f)


def load_capture(path) -> dict:
    from parity.io import load_torch

    return load_torch(path)


def run_trace_job(job: Job) -> list[str]:
    from parity.backends.worker import _construct
    from parity.trace.capture import capture

    groups: dict[tuple[str, str], list] = {}
    for u in job.units:
        if not Path(u.output).is_file():
            groups.setdefault((u.checkpoint or job.checkpoint, u.dtype or job.dtype), []).append(u)
    for (checkpoint, dtype), units in groups.items():
        backend = _construct(job.adapter, checkpoint, dict(tp=job.tp, device=job.device, dtype=dtype,
                                                          tokenizer_vocab=job.vocab_size))
        for u in units:
            tensors = capture(backend, read_inputs(u.requests))
            if backend.rank == 0:
                save_capture(u.output, tensors)
        del backend
        gc.collect()  # the stacks' modules hold reference cycles: free this model before the next loads
        gc.freeze()  # and let the next collection skip everything alive now (the stacks' imports)
    return []


def launch_traces(backend: str, tp: int, targets: list[tuple[str, str]], inputs: list[list[int]], workdir: Path,
                  *, device: str = "cpu", launcher: str = "local", vocab: int | None = None) -> list[dict]:
    """Trace `inputs` on each (checkpoint, dtype) of `targets` with one worker launch of `backend` at `tp`
    ranks; returns the captures in the order of `targets`. A failed launch is a UserError naming the
    worker's last line."""
    from parity.backends import backend_info
    from parity.backends.worker import launch
    from parity.jobs import Job, JobUnit

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_inputs(workdir / "inputs.json", inputs)
    units = [JobUnit(f"{n}-{dtype}", str(workdir / "inputs.json"), str(workdir / f"{backend}-{n}-{dtype}.pt"),
                     checkpoint=str(ckpt), dtype=dtype) for n, (ckpt, dtype) in enumerate(targets)]
    job = Job(backend=backend, adapter=backend_info(backend).adapter, checkpoint=str(targets[0][0]), tp=tp,
              device=device, dtype=targets[0][1], vocab_size=vocab, units=units, mode="trace")
    job_path = workdir / f"job-{backend}-tp{tp}.json"
    job.write(job_path)
    proc = launch(job_path, tp, launcher=launcher, device=device)
    if proc.returncode != 0 or not all(Path(u.output).is_file() for u in units):
        last = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"explain: tracing {backend} failed (exit {proc.returncode}): "
                        f"{last[0].removeprefix('parity score: ')[:300]}")
    return [load_capture(u.output) for u in units]
