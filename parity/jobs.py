"""The contract between `parity run` and a worker (`parity score JOB`): one Job file per (size, backend).

The run writes the Job; every rank of the worker reads it, loads the model once and scores each unit's
requests into the unit's output (parity.results names the paths). A Job written by `parity run` names the
adapter class itself, so a backend registered by a plug-in reaches its worker too; a job that names only
a registered backend gets the registry's adapter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from parity.dtypes import DTYPES
from parity.errors import UserError
from parity.io import read_json, write_json

DEVICES = ("cpu", "cuda")
MODES = ("score", "trace")


@dataclass(frozen=True)
class JobUnit:
    name: str  # the test id
    requests: str  # jsonl of parity.requests.Request (trace: json of model inputs, parity.trace.worker)
    output: str  # where rank 0 writes the scores (parity.results.error_path(output) on failure)
    # trace jobs only (parity.trace.worker): this unit's own checkpoint / dtype instead of the job's
    checkpoint: str | None = None
    dtype: str | None = None
    # a noise-floor unit (parity.floor.PERTURBATIONS key): scored by the same loaded model, scheduled otherwise
    perturbation: str = ""


@dataclass(frozen=True)
class Job:
    backend: str  # the registry name
    checkpoint: str
    tp: int  # ranks the worker is launched with
    adapter: str = ""  # "module:Class" of the backend's adapter; "" = the registry's row for `backend`
    device: str = "cpu"
    dtype: str = "fp32"
    batch_size: str = "auto"  # "auto" or a positive integer
    size: str = ""
    vocab_size: int | None = None  # the requests' tokenizer vocabulary (checked against the model's)
    units: list[JobUnit] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # adapter-specific (base.Backend options), e.g. {"spec": "te"}
    mode: str = "score"  # a MODES key: "score" writes log-likelihoods, "trace" boundary tensors (explain)

    def write(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def read(cls, path: str | Path) -> "Job":
        d = read_json(path, "job file")
        if not isinstance(d, dict):
            raise UserError(f"{path}: a job file holds a JSON object; regenerate it with `parity run`")
        for key in ("backend", "checkpoint", "tp", "units"):
            if key not in d:
                raise UserError(f"{path}: job file lacks {key!r}; regenerate it with `parity run`")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise UserError(f"{path}: unknown job field {unknown[0]!r}; regenerate it with this parity's `parity run`")
        try:
            job = cls(**{**d, "units": [JobUnit(**u) for u in d["units"]]})
        except TypeError as e:
            raise UserError(f"{path}: malformed job unit ({e}); regenerate it with `parity run`") from None
        job.validate(path)
        return job

    def validate(self, where) -> None:
        if not self.adapter:  # a hand-written job names only the backend; the registry knows its class
            from parity.backends import backend_info
            object.__setattr__(self, "adapter", backend_info(self.backend, f"{where}: backend").adapter)
        if self.device not in DEVICES:
            raise UserError(f"{where}: device {self.device!r} is not one of {', '.join(DEVICES)}")
        for dtype in [self.dtype] + [u.dtype for u in self.units if u.dtype is not None]:
            if dtype not in DTYPES:
                raise UserError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if self.mode not in MODES:
            raise UserError(f"{where}: mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode != "trace" and any(u.checkpoint or u.dtype for u in self.units):
            raise UserError(f"{where}: only trace units name their own checkpoint or dtype")
        from parity.floor import PERTURBATIONS

        for u in self.units:
            if u.perturbation and u.perturbation not in PERTURBATIONS:
                raise UserError(f"{where}: unit {u.name}: perturbation {u.perturbation!r} is not one of "
                                f"{', '.join(PERTURBATIONS)}")
        bs = str(self.batch_size)
        if bs != "auto" and not (bs.isdigit() and int(bs) > 0):
            raise UserError(f"{where}: batch_size {bs!r} must be 'auto' or a positive integer")
        if not isinstance(self.tp, int) or self.tp < 1:
            raise UserError(f"{where}: tp {self.tp!r} must be a positive integer")
        if not isinstance(self.options, dict):
            raise UserError(f"{where}: options {self.options!r} must be a JSON object")

    @property
    def batch(self) -> int | str:
        return "auto" if str(self.batch_size) == "auto" else int(self.batch_size)
