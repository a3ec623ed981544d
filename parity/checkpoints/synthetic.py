"""Deterministic synthetic checkpoints in Meta's layout, realistically scaled.

Every tensor is drawn from its own generator, seeded from (seed, key), so a tensor never depends on
which other tensors exist or in what order they are made; the same arguments give the same bytes.
Scale: matrices are normal with Llama-2-7b's std of 0.02 at its width, rescaled by sqrt(fan_in) so a
tiny model's activations have the magnitude a real one's do (logits with a spread, not uniform); norm
weights vary around 1 so a stack that mishandles them shows it. Stored in bf16 by default, like the
released Llama-2 files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from parity.arch import get_size
from parity.checkpoints.meta import write_meta
from parity.checkpoints.spec import Source, Spec
from parity.dtypes import torch_dtype
from parity.errors import UserError
from parity.io import atomic_dir, cache_dir, sha256_file
from parity.tokenizer import default_tokenizer, load_sp

REFERENCE = get_size("7b")  # the real width whose init scale the synthetic weights imitate
BASE_STD = 0.02
NORM_SPREAD = 0.1


class SyntheticSource(Source):
    def __init__(self, spec: Spec, seed: int, dtype: torch.dtype, tokenizer: Path):
        self.spec, self.seed, self.dtype, self.tokenizer = spec, seed, dtype, tokenizer

    def get(self, key: str) -> torch.Tensor:
        digest = hashlib.sha256(f"parity-synthetic/{self.seed}/{key}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        shape = self.spec.shape(key)
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        if len(shape) == 1:  # RMSNorm weights
            x = 1.0 + NORM_SPREAD * x
        else:
            x *= BASE_STD * (REFERENCE.dim / shape[1]) ** 0.5
        return x.to(self.dtype)


def make_checkpoint(size_name: str, out: str | Path, seed: int = 0, tokenizer: str | Path | None = None,
                    dtype: str = "bf16", overwrite: bool = False) -> Path:
    """Write a synthetic Meta checkpoint of `size_name` into `out` (atomically) and return it."""
    size = get_size(size_name)
    tok = Path(tokenizer) if tokenizer else default_tokenizer()
    vocab = load_sp(tok).vocab_size()
    spec = Spec(size, vocab)
    if vocab % size.n_files:
        raise UserError(f"{tok}: vocab {vocab} cannot be split across {size.n_files} files of {size_name}")
    src = SyntheticSource(spec, seed, torch_dtype(dtype), tok)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        shutil.copyfile(tok, tmp / "tokenizer.model")
        write_meta(src, tmp, size.n_files)
    return out


def cached_checkpoint(size_name: str, seed: int = 0, tokenizer: str | Path | None = None,
                      dtype: str = "bf16") -> Path:
    """make_checkpoint once per (size, seed, tokenizer, dtype) under the cache dir; later calls reuse it."""
    tok = Path(tokenizer) if tokenizer else default_tokenizer()
    key = f"{size_name}-s{seed}-{dtype}-{sha256_file(tok)[:12]}"
    out = cache_dir() / "checkpoints" / key / "meta"
    if not (out / "params.json").is_file():
        # Build under a private name, then rename: another process (parallel tests, a second run)
        # may be reading or building the same entry; whoever renames first wins, nothing is replaced.
        build = out.parent / f"build-{os.getpid()}"
        make_checkpoint(size_name, build, seed=seed, tokenizer=tok, dtype=dtype, overwrite=True)
        try:
            os.rename(build, out)
        except OSError:
            shutil.rmtree(build, ignore_errors=True)
            if not (out / "params.json").is_file():
                raise
    return out


def cli_make_checkpoint(args) -> int:
    out = make_checkpoint(args.size, args.out, seed=args.seed, tokenizer=args.tokenizer,
                          dtype=getattr(args, "dtype", None) or "bf16", overwrite=args.overwrite)
    print(out)
    return 0
