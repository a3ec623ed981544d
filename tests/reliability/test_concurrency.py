"""Concurrency, end to end: two `parity run` on different results directories run side by side and both
finish with identical results; a third on a directory in use is refused, naming the holder (held there
for certain: the holder is stopped while it holds the lock).

Cache entries (synthetic checkpoints, conversions, tokenizers) shared by processes: one builds, the
others wait and read it.

The lock itself (kernel-released when the holder dies) is unit-tested in
tests/test_run_plan.py::test_second_writer_is_refused_naming_the_holder.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli_helpers import run_parity

ARGS = ["run", "--sizes", "7b-mini", "--backends", "meta,hf", "--tests", "boolq,mmlu_anatomy,xcopa_et"]


def start(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "parity", *ARGS, "--out", str(out)], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def digests(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.glob("7b-mini/*/*.jsonl"))}


def hold_while_locked(p: subprocess.Popen, lock: Path, timeout: float = 120) -> None:
    """Stop run `p` (SIGSTOP) at a moment it holds its lock. The lock file names its holder only between
    taking the lock and releasing it, and a stopped process releases nothing, so once the file names p
    while p is stopped, p holds the lock until it is continued: the refusal below is certain, not a race."""
    deadline = time.monotonic() + timeout
    while True:
        assert p.poll() is None, "the run finished before it was seen holding its lock"
        assert time.monotonic() < deadline, "the run never took its lock"
        os.kill(p.pid, signal.SIGSTOP)
        while Path(f"/proc/{p.pid}/stat").read_text().rsplit(") ", 1)[1][0] != "T":  # stopped for sure
            time.sleep(0.01)
        if lock.is_file() and f"parity run pid {p.pid} " in lock.read_text():
            return
        os.kill(p.pid, signal.SIGCONT)
        time.sleep(0.1)


def test_two_runs_side_by_side_and_a_third_on_a_busy_directory(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pa, pb = start(a), start(b)
    try:
        lock = a / ".lock"
        hold_while_locked(pa, lock)
        try:
            busy = run_parity(*ARGS, "--out", a)
        finally:
            os.kill(pa.pid, signal.SIGCONT)
        outs = [p.communicate(timeout=600) for p in (pa, pb)]
    finally:
        for p in (pa, pb):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert busy.returncode == 2, busy.stderr[-3000:]
    assert f"in use by parity run pid {pa.pid}" in busy.stderr and str(lock) in busy.stderr
    assert pa.returncode == 0, outs[0][1][-3000:]
    assert pb.returncode == 0, outs[1][1][-3000:]
    assert digests(a) == digests(b) and len(digests(a)) == 6
    # a's results are intact after the refused attempt: a repeat reuses every unit
    again = run_parity(*ARGS, "--out", a)
    assert again.returncode == 0 and "6 reused, 0 to score" in again.stderr, again.stderr[-3000:]


def blocked_on(lock: Path, pid: int) -> bool:
    """Whether process `pid` waits for the flock on `lock` (/proc/locks lists a waiter as `-> FLOCK ...`
    with the pid and the file's device:inode)."""
    ino = f":{lock.stat().st_ino} "
    return any("->" in ln and f" {pid} " in ln and ino in ln for ln in Path("/proc/locks").read_text().splitlines())


def test_a_cache_entry_being_built_is_waited_for_not_built_again(tmp_path, monkeypatch):
    """Two processes sharing a cache (parallel tests, two runs) and needing the same synthetic checkpoint:
    the second waits while the first builds, then reads the first's entry instead of building its own
    over the directory the first may be reading (parity.io.build_lock)."""
    from parity.checkpoints.synthetic import cached_checkpoint
    from parity.io import build_lock

    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))
    entry = cached_checkpoint("7b-mini")
    made = tmp_path / "made"
    entry.rename(made)  # the entry is missing again; its content is what "the first process" will publish
    with build_lock(entry):
        p = subprocess.Popen([sys.executable, "-c", "from parity.checkpoints.synthetic import cached_checkpoint;"
                              "print(cached_checkpoint('7b-mini'))"], env=dict(os.environ),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not blocked_on(entry.parent / f".{entry.name}.lock", p.pid):
            assert p.poll() is None, f"the second process did not wait for the build: {p.communicate()}"
            assert time.monotonic() < deadline, "the second process never reached the build lock"
            time.sleep(0.05)
        made.rename(entry)
        inode = (entry / "params.json").stat().st_ino
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert out.strip() == str(entry)
    assert (entry / "params.json").stat().st_ino == inode  # read, not built again
    assert [d.name for d in entry.parent.iterdir() if not d.name.startswith(".")] == ["meta"]
