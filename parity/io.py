"""File helpers every module uses: atomic writes, safe checkpoint loading, hashing.

Atomicity rule of the project: nothing is written in place. Files go to a temp name in the same
directory and are renamed; directories are built under `<name>.tmp-<pid>` and renamed on success, so
an interrupted job never leaves something that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

from parity.errors import UserError


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fault_point(point: str, detail: str) -> None:
    """Fault injection for the interruption tests: PARITY_FAULT="<point>:<substring>" makes the process
    that reaches `point` with `substring` in `detail` kill itself with SIGKILL (no cleanup runs), so a
    test can interrupt a run exactly while a result file or a converted checkpoint is being written."""
    spec = os.environ.get("PARITY_FAULT")
    if spec:
        want, _, sub = spec.partition(":")
        if want == point and sub in detail:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
        if _pid_gone(stale.name.split(".")[-3]):
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results and checkpoints are meant to be shared
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        fault_point("write", str(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=False)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows) -> None:
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); regenerate or fix the file") from None


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict:
    """A yaml file that must hold a mapping (configs, thresholds); any problem is one UserError line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the {what}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the {what} must be a mapping (key: value lines)")
    return data


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory that becomes `path` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not overwrite and any(path.iterdir()):
        raise UserError(f"{path}: output directory exists and is not empty; remove it or choose another")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fault_point("dir", str(path))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def build_lock(entry: Path) -> Iterator[None]:
    """Serialise the processes that would build one cache entry (parallel tests, two runs sharing a
    cache): the second waits for the first and then finds the entry made, instead of building it again
    or replacing a directory someone is reading. Callers check for the entry again inside the lock.
    An fcntl lock: the kernel releases it if its holder dies."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(entry.parent / f".{entry.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _remove_stale_tmp_dirs(path: Path) -> None:
    """Temp dirs of writers that were killed (their pid is gone) are garbage: remove them."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if _pid_gone(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)


def _pid_gone(pid: str) -> bool:
    return pid.isdigit() and not Path(f"/proc/{pid}").exists()


class MegatronEnum:
    """Stands in for one of megatron-core's enum classes inside Megatron-LM's saved args
    (attention_backend, model_type, ...): args load without importing megatron-core or running any of
    its code. Called as the unpickler calls the class, it returns a string naming the member."""

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __call__(self, value) -> str:
        return f"{self.qualname.rsplit('.', 1)[-1]}({value!r})"


# The megatron-core enums a Megatron-LM 0.16 args Namespace holds (AttnBackend always, ModelType after
# training, CudaGraphScope with CUDA graphs).
MEGATRON_ENUMS = ("megatron.core.transformer.enums.AttnBackend", "megatron.core.transformer.enums.CudaGraphScope",
                  "megatron.core.enums.ModelType")
# Megatron-LM stores its arguments as an argparse.Namespace inside model_optim_rng.pt / common.pt. That
# class, the stdlib signal enum (args.exit_signal) and megatron-core's enums by name (as inert stand-ins)
# are allowed through weights_only unpickling, nothing wider; torch.dtype values are allowed by default.
SAFE_GLOBALS = [argparse.Namespace, signal.Signals, *[(MegatronEnum(n), n) for n in MEGATRON_ENUMS]]


def load_torch(path: str | os.PathLike, mmap: bool = False) -> Any:
    """torch.load for untrusted files: weights_only=True always, errors become one line."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    try:
        with _exactly(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load: the file holds objects other than tensors "
                        f"({_unpickler_reason(e)}); only weights_only checkpoints are accepted") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot read checkpoint ({msg[:200]}); the file is truncated or corrupt") from None


def verify_zip(path: str | os.PathLike) -> None:
    """Check every record of a zip-format torch file against its CRC-32 (one read of the file).

    torch.load checks none, so a byte changed inside tensor data would load as a changed weight. A file
    in torch's legacy (non-zip) format, or one cut short, is left to torch.load, which reports it."""
    import zipfile
    import zlib

    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    while f.read(1 << 20):  # the CRC is compared when the record's end is read
                        pass
    except zipfile.BadZipFile as e:
        if str(e).startswith("Bad CRC-32"):
            raise UserError(f"{path}: record {info.filename!r} fails its CRC-32 check: bytes changed after the "
                            f"file was written (a corrupt copy); copy or convert it again") from None
        raise UserError(f"{path}: damaged zip structure ({str(e)[:160]}); the file is truncated or corrupt") from None
    except (EOFError, OSError, ValueError, NotImplementedError, zlib.error) as e:
        raise UserError(f"{path}: cannot read zip record ({str(e)[:160] or type(e).__name__}); the file is "
                        f"truncated or corrupt") from None


@contextlib.contextmanager
def _exactly(allowed: list) -> Iterator[None]:
    """torch's allow-list of globals is process-wide: megatron-core widens it at import (PosixPath, numpy
    arrays, BytesIO, its optimizer config ...) for its own loader, and torch's safe_globals() context
    removes its entries on exit even when they were registered before. So for parity's loads the list
    is exactly `allowed`, and whatever was registered before is put back afterwards."""
    import torch.serialization as ts

    before = ts.get_safe_globals()
    ts.clear_safe_globals()
    ts.add_safe_globals(allowed)
    try:
        yield
    finally:
        ts.clear_safe_globals()
        ts.add_safe_globals(before)


def _unpickler_reason(e: Exception) -> str:
    """The line of torch's weights_only error that names what was refused (e.g. "Unsupported global:
    GLOBAL builtins.open"), without its ANSI codes and without its advice to load the file unsafely."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    for ln in lines:
        m = re.search(r"(Unsupported global: GLOBAL \S+|unsupported GLOBAL \S+[^.]*|Unsupported operand \S+)", ln)
        if m:
            return m.group(1)[:200]
    for ln in lines:
        if ln.startswith("WeightsUnpickler error:"):
            return ln.removeprefix("WeightsUnpickler error:").strip().split(". ")[0][:200]
    return next((ln for ln in lines if ln), type(e).__name__)[:200]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_dir(path: str | os.PathLike) -> str:
    """Cheap identity of a checkpoint directory: names, sizes and mtimes of its files (not contents)."""
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Where synthetic checkpoints and converted copies live (PARITY_CACHE overrides)."""
    d = Path(os.environ.get("PARITY_CACHE") or Path.home() / ".cache" / "parity")
    d.mkdir(parents=True, exist_ok=True)
    return d
