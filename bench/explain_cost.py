"""Benchmark: what `parity explain` costs on one request with every boundary captured.

    python bench/explain_cost.py [--size 1b-synthetic] [--backends meta,megatron] [--dtype bf16]
                                 [--tokenizer PATH] [--text "..."]

Runs `parity explain` as a user does (a subprocess) on the synthetic checkpoint of --size (the other
backend's checkpoint converted into the cache on first use, not timed) and reports its wall time, the
peak RSS of the largest process it started (the workers: ru_maxrss of the children, which counts the
mmap'd checkpoint pages too), and the size of what was captured: every boundary of one stack in fp32
(bf16 / fp16 activations are stored as fp32). Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--size", default="1b-synthetic")
    ap.add_argument("--backends", default="meta,megatron")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--tokenizer", help="tokenizer.model for the synthetic checkpoint (the Llama-2 one, vocab "
                    "32000, makes 1b-synthetic ~1.27 B parameters; default: the project's own, vocab 1024)")
    ap.add_argument("--text", help="the request (default: explain's fixed sentence)")
    a = ap.parse_args()

    from parity.checkpoints.synthetic import cached_checkpoint
    from parity.config import resolve_checkpoints

    meta = cached_checkpoint(a.size, tokenizer=a.tokenizer)
    backends = a.backends.split(",")
    ckpts = resolve_checkpoints([a.size], backends, {(a.size, "meta"): meta}, {})[a.size]  # converts once
    flags = [x for b in backends for x in ("--checkpoint", f"{a.size}:{b}={ckpts[b].path}")]
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as tmp:
        cmd = [sys.executable, "-m", "parity", "explain", "--size", a.size, "--backends", a.backends,
               "--dtype", a.dtype, "--json", "--out", tmp, *flags, *(["--text", a.text] if a.text else [])]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"explain failed with exit code {proc.returncode}", file=sys.stderr)
        return 1
    # the workers are explain's children; their peak reaches us when explain is reaped
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss * 1024
    result = json.loads(proc.stdout)
    mib = 1 << 20
    print(f"{a.size}, {a.backends}, {a.dtype}, {sum(result['request']['tokens'])} tokens: {result['summary']}")
    print(f"wall time   {seconds:8.1f} s    (two worker launches: reference in {a.dtype} and "
          f"{result['noise']['reference_dtype']}, then the other in {a.dtype})")
    print(f"CPU time    {usage.ru_utime + usage.ru_stime:8.1f} s    (user + system, all processes: on a busy machine "
          f"closer to the unloaded wall time than the wall time is)")
    print(f"peak RSS    {peak / mib:8.0f} MiB  (largest process, ru_maxrss: includes mmap'd checkpoint pages)")
    print(f"captured    {result['captured_bytes'] / mib:8.1f} MiB  (one stack, every boundary, fp32/fp64 as computed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
