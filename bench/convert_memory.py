"""Benchmark: convert a synthetic checkpoint meta -> megatron and measure throughput and peak memory.

    python bench/convert_memory.py [--size 1b-synthetic] [--tp 2] [--megatron-format legacy|torch_dist]
                                   [--tokenizer PATH] [--workdir DIR]

The converter runs as a child process (`python -m parity convert ...`). Its anonymous resident memory
(RssAnon in /proc/<pid>/status: heap and tensors it allocated, not the page cache of the mmap'd input
files, which the kernel can drop) is sampled every few milliseconds; ru_maxrss (which counts those
file pages too) is printed beside it. Target: anonymous peak <= 0.75 x the checkpoint's bytes
(Megatron-LM's own converter holds the full source and target models at once, about 2x).
Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGET_RATIO = 0.75


def rss_anon_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--size", default="1b-synthetic")
    ap.add_argument("--tp", type=int, default=2, help="TP of a legacy output (torch_dist has none)")
    ap.add_argument("--megatron-format", default="legacy", choices=["legacy", "torch_dist"])
    ap.add_argument("--workdir", help="where the output goes (default: a temp dir, removed afterwards)")
    ap.add_argument("--tokenizer", help="tokenizer.model for the synthetic source (default: the project's own, "
                    "vocab 1024; the Llama-2 one, vocab 32000, makes 1b-synthetic ~1.27 B parameters)")
    ap.add_argument("--interval", type=float, default=0.005, help="sampling interval in seconds")
    a = ap.parse_args()

    from parity.checkpoints.synthetic import cached_checkpoint

    t = time.perf_counter()
    src = cached_checkpoint(a.size, tokenizer=a.tokenizer)
    print(f"source: {src} ({time.perf_counter() - t:.1f} s to make or find)")
    ckpt_bytes = sum(p.stat().st_size for p in src.glob("consolidated.*.pth"))

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="parity-bench-"))
    target = f"tp{a.tp}" if a.megatron_format == "legacy" else "torch_dist"
    out = work / f"{a.size}-megatron-{target}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "parity", "convert", "--from", "meta", "--to", "megatron",
           "--megatron-format", a.megatron_format, "--load-dir", str(src), "--save-dir", str(out)]
    if a.megatron_format == "legacy":
        cmd += ["--target-tp", str(a.tp)]
    print("running:", " ".join(cmd))

    peak = [0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)

    done = threading.Event()

    def sample():  # not proc.poll(): it would reap the child before wait4 below reads its usage
        while not done.is_set():
            kb = rss_anon_kb(proc.pid)
            if kb is not None:
                peak[0] = max(peak[0], kb)
            time.sleep(a.interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    if proc.returncode != 0:
        print(f"convert failed with exit code {proc.returncode}", file=sys.stderr)
        return 1
    out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)

    mb = 1 << 20
    anon = peak[0] * 1024
    maxrss = usage.ru_maxrss * 1024
    ratio = anon / ckpt_bytes
    print(f"size {a.size}, meta -> megatron {a.megatron_format}" + (f" TP {a.tp}" if a.megatron_format == "legacy" else ""))
    print(f"checkpoint   {ckpt_bytes / mb:10.1f} MiB   (output {out_bytes / mb:.1f} MiB)")
    print(f"time         {seconds:10.1f} s     ({ckpt_bytes / mb / seconds:.1f} MB/s, MiB of input per second)")
    print(f"peak RssAnon {anon / mb:10.1f} MiB   = {ratio:.2f} x checkpoint  (target <= {TARGET_RATIO})")
    print(f"ru_maxrss    {maxrss / mb:10.1f} MiB   = {maxrss / ckpt_bytes:.2f} x checkpoint  (includes mmap'd file pages)")
    print("PASS" if ratio <= TARGET_RATIO else "OVER TARGET")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
