"""The results directory: where every file of a run lives, what a unit's status can be, and the format
check. `parity run` writes this layout, the workers write scores into it, the reporter reads it.

    RUN/manifest.json                         versions, command, checkpoints, per-unit records (UnitRecord)
    RUN/<size>/<backend>/<test>.jsonl         per-sample lines (SAMPLE_FIELDS), what the reporter reads
    RUN/scores/<size>/<backend>/<test>.<inputs>.jsonl   a worker's raw scores, named by the unit's inputs
    RUN/scores/.../<...>.jsonl.error.json     a worker's error for that unit (instead of scores)
    RUN/scores/.../<...>.jsonl.ran.json       where the worker scored it (device, GPUs, hosts: UnitRecord.ran_on)
    RUN/requests/<size>/<test>.<digest>.jsonl the token-id requests of a test, named by their digest
    RUN/floor/<perturbation>/<size>/<backend>/<test>.jsonl   per-sample lines of a noise-floor unit (parity.floor)
    RUN/scores/floor/<perturbation>/<size>/<backend>/<test>.<inputs>.jsonl   its raw scores
    RUN/jobs/<size>-<backend>.json            the Job a worker ran (parity.jobs), its floor units included
    RUN/logs/<size>-<backend>.log             everything the worker and its stack printed (appended per launch)
    RUN/.lock                                 held by the one `parity run` writing here
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from parity import RESULTS_FORMAT
from parity.errors import UserError

# Fields every per-sample line has (BigBench lines add "scores": the target score of each choice).
SAMPLE_FIELDS = ("doc_id", "request_hashes", "loglik", "is_greedy", "n_tokens", "gold", "pred")
REQUIRED_SAMPLE_FIELDS = ("doc_id", "request_hashes", "loglik", "pred", "gold")  # what the reporter needs


class UnitStatus(str, Enum):
    """Status of one (size, backend, test). The first four are stored in the manifest by `parity run`;
    the reporter adds the last two for units whose stored record does not match the files."""

    PENDING = "pending"  # planned, not finished
    DONE = "done"  # per-sample file written
    FAILED = "failed"  # the worker failed or produced no (finite) scores; `error` says why
    NO_DATA = "no data"  # the test's data file is absent; `error` names where it was expected
    MISSING = "missing"  # (report) not in this run, or recorded done but its file is gone
    NOT_RUN = "not run"  # (report) recorded with another status: the run was interrupted

    def __str__(self) -> str:
        return self.value


@dataclass
class UnitRecord:
    """A unit's entry in manifest.json "units"."""

    status: UnitStatus
    error: str | None = None
    seconds: float | None = None  # the worker's time scoring this unit, model load excluded (None: not recorded)
    inputs: str | None = None  # hash of everything that determines the unit's numbers
    ran_on: dict | None = None  # what the worker actually ran on (base.Backend.ran_on(): device, dtype,
    #                             ranks, hosts, GPU models; adapter details such as megatron's spec)

    def to_json(self) -> dict:
        return asdict(self) | {"status": self.status.value}

    @classmethod
    def from_json(cls, d: dict) -> "UnitRecord":
        try:
            status = UnitStatus(d.get("status"))
        except ValueError:
            status = UnitStatus.NOT_RUN
        ran_on = d.get("ran_on")
        return cls(status, d.get("error"), d.get("seconds"), d.get("inputs"),
                   ran_on if isinstance(ran_on, dict) else None)


def describe_ran_on(ran_on: dict | None) -> str:
    """One line for a UnitRecord.ran_on, e.g. "cuda (8 x NVIDIA H200), bf16, 8 ranks on node1, spec local"."""
    if not ran_on:
        return "unknown"
    gpus = ", ".join(f"{n} x {name}" for name, n in (ran_on.get("gpus") or {}).items())
    ranks = ran_on.get("ranks", 1)
    extra = "".join(f", {k} {v}" for k, v in ran_on.items()
                    if k not in ("device", "gpus", "dtype", "ranks", "hosts") and v not in (0, None, {}))
    return (f"{ran_on.get('device')}{f' ({gpus})' if gpus else ''}, {ran_on.get('dtype')}, {ranks} rank"
            f"{'s' if ranks != 1 else ''} on {', '.join(ran_on.get('hosts') or ['?'])}{extra}")


def unit_key(size: str, backend: str, test: str) -> str:
    return f"{size}/{backend}/{test}"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def samples_rel(self, size: str, backend: str, test: str) -> str:
        return f"{size}/{backend}/{test}.jsonl"

    def samples(self, size: str, backend: str, test: str, perturbation: str = "") -> Path:
        if perturbation:
            return self.root / "floor" / perturbation / self.samples_rel(size, backend, test)
        return self.root / self.samples_rel(size, backend, test)

    def scores(self, size: str, backend: str, test: str, inputs: str, perturbation: str = "") -> Path:
        under = self.root / "scores" / "floor" / perturbation if perturbation else self.root / "scores"
        return under / size / backend / f"{test}.{inputs}.jsonl"

    def requests(self, size: str, test: str, digest: str) -> Path:
        return self.root / "requests" / size / f"{test}.{digest}.jsonl"

    def job(self, size: str, backend: str) -> Path:
        return self.root / "jobs" / f"{size}-{backend}.json"

    def log(self, size: str, backend: str) -> Path:
        return self.root / "logs" / f"{size}-{backend}.log"

    def tokenizer_check(self, size: str, backend: str) -> Path:
        """A backend's own tokenizer against the reference ids (parity.tokenizer_check.in_run)."""
        return self.root / "tokenizers" / size / f"{backend}.json"


def error_path(scores: str | Path) -> Path:
    """Where a worker explains a unit it could not score (next to the scores it would have written)."""
    return Path(f"{scores}.error.json")


def ran_path(scores: str | Path) -> Path:
    """Where a worker records what it scored a unit on (next to the scores)."""
    return Path(f"{scores}.ran.json")


def check_format(manifest: object, path: Path) -> None:
    """Results written by another results format are refused, never misread."""
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != RESULTS_FORMAT:
        raise UserError(f"{path}: results from an incompatible version of parity (format {fmt}, this parity "
                        f"reads and writes {RESULTS_FORMAT}); rerun `parity run` into a new --out directory, "
                        f"or use the parity version that wrote it")
