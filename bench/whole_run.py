"""Benchmark: the embedded default `parity run` as a user runs it, cold, cached, and after a converter change.

    python bench/whole_run.py [--workdir DIR] [--fresh-cache]

1. `parity run` (three mini sizes, synthetic checkpoints, bundled samples, three backends) into a new
   results directory: wall time and the peak RSS of the largest process (ru_maxrss of the children).
   With --fresh-cache the synthetic checkpoints and conversions are made too (a first use).
2. The same command again: every unit is reused (the cached-run target is < 10 s).
3. A converter change: each size's megatron checkpoint is replaced by a fresh conversion
   (`--checkpoint SIZE:megatron=DIR`), so only megatron is scored again; meta and hf are reused.
Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd, env, cwd) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - t, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--workdir", help="default: a temp dir")
    ap.add_argument("--fresh-cache", action="store_true", help="start from an empty PARITY_CACHE")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="parity-whole-run-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if a.fresh_cache:
        env["PARITY_CACHE"] = str(work / "cache")
    run = [sys.executable, "-m", "parity", "run", "--out", str(work / "results")]

    secs, r = timed(run, env, work)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if r.returncode != 0:
        print(r.stderr[-3000:])
        return 1
    print(f"1. default run{' (fresh cache)' if a.fresh_cache else ''}: {secs:.1f} s wall, "
          f"peak RSS of the largest process {peak_mb:.0f} MB")
    secs, r = timed(run, env, work)
    print(f"2. repeated run, all cached: {secs:.1f} s wall (exit {r.returncode}); "
          f"{[l for l in r.stderr.splitlines() if 'reused' in l][:1]}")

    from parity.arch import MINI_SIZES
    from parity.checkpoints.convert import convert
    from parity.checkpoints.synthetic import cached_checkpoint

    os.environ.update(env)
    flags = []
    t = time.perf_counter()
    for size in MINI_SIZES:
        from parity.arch import SIZES

        out = work / "new-converter" / f"{size}-megatron"
        if not out.is_dir():
            convert("meta", "megatron", cached_checkpoint(size), out, target_tp=SIZES[size].tp)
        flags += ["--checkpoint", f"{size}:megatron={out}"]
    conv = time.perf_counter() - t
    secs, r = timed(run + flags, env, work)
    print(f"3. after a converter change: conversion {conv:.1f} s, then {secs:.1f} s to re-score only megatron "
          f"(exit {r.returncode}); {[l for l in r.stderr.splitlines() if 'reused' in l][:1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
