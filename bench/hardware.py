"""Benchmark: each backend's forward throughput as a fraction of this machine's matmul throughput.

    python bench/hardware.py [--size 1b-synthetic] [--dtype fp32] [--batch 4] [--seq 256] [--reps 3]

The ceiling is a large torch.matmul (4096 x 4096 @ 4096 x 4096) in the same dtype, measured in the same
script. A backend's achieved rate is 2 x matmul-parameters x tokens / time (the usual dense-transformer
estimate; attention's own QK^T and AV products are counted separately), one warm-up forward, median of
`--reps`. Each backend runs in its own process (their global state must not mix), with one rank.
Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from parity.dtypes import DTYPES, torch_dtype


def matmul_gflops(dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def one_backend(name: str, ckpt: str, dtype: str, batch: int, seq: int, reps: int) -> dict:
    from parity import arch
    from parity.backends.worker import load_backend

    t = time.perf_counter()
    b = load_backend(name, ckpt, device="cpu", dtype=dtype, **({"tp": 1} if name != "hf" else {}))
    load_s = time.perf_counter() - t
    size = arch.SIZES[json.loads(sys.argv[-1])["size"]]
    tokens = torch.randint(3, b.vocab_size, (batch, seq))
    with torch.inference_mode():
        b.forward(tokens)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            b.forward(tokens)
            times.append(time.perf_counter() - t)
    s = statistics.median(times)
    d, f, L = size.dim, size.ffn_dim, size.n_layers
    kv = size.n_kv_heads * size.head_dim
    matmul_params = L * (d * d + 2 * d * kv + d * d + 3 * d * f) + d * b.vocab_size
    n_tok = batch * seq
    dense = 2 * matmul_params * n_tok
    attn = L * 2 * 2 * batch * seq * seq * d / 2  # causal QK^T and AV, half the square
    return {"backend": name, "load_s": load_s, "forward_s": s, "tokens_per_s": n_tok / s,
            "gflops": (dense + attn) / s / 1e9, "matmul_params": matmul_params}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        cfg = json.loads(sys.argv[-1])
        print(json.dumps(one_backend(cfg["backend"], cfg["ckpt"], cfg["dtype"], cfg["batch"], cfg["seq"], cfg["reps"])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--size", default="1b-synthetic")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backends", default="meta,hf,megatron")
    ap.add_argument("--tokenizer", help="tokenizer.model of the synthetic checkpoint (default: the project's)")
    a = ap.parse_args()

    from parity.checkpoints.convert import convert
    from parity.checkpoints.synthetic import cached_checkpoint
    from parity.io import cache_dir

    meta_dir = cached_checkpoint(a.size, tokenizer=a.tokenizer)
    dirs = {"meta": meta_dir}
    for fmt in ("hf", "megatron"):
        out = cache_dir() / "bench" / f"{meta_dir.parent.name}-{fmt}{'-tp1' if fmt == 'megatron' else ''}"
        if not out.is_dir():
            convert("meta", fmt, meta_dir, out, **({"target_tp": 1} if fmt == "megatron" else {}))
        dirs[fmt] = out

    ceiling = matmul_gflops(torch_dtype(a.dtype))
    print(f"{a.size} {a.dtype}, batch {a.batch} x {a.seq} tokens, torch threads {torch.get_num_threads()}; "
          f"matmul ceiling {ceiling:.1f} GFLOP/s (4096^3 torch.matmul)")
    for name in a.backends.split(","):
        cfg = dict(backend=name, ckpt=str(dirs[name]), dtype=a.dtype, batch=a.batch, seq=a.seq, reps=a.reps,
                   size=a.size)
        r = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: failed: {r.stderr.strip().splitlines()[-1:]}")
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name:9s} forward {res['forward_s']:.3f} s, {res['tokens_per_s']:.0f} tokens/s, "
              f"{res['gflops']:.1f} GFLOP/s = {res['gflops'] / ceiling:.0%} of the matmul ceiling "
              f"(load {res['load_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
