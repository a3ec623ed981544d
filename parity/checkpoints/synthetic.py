"""Deterministic synthetic checkpoints in Meta's layout, realistically scaled.

Every tensor is drawn from its own generator, seeded from (seed, key), so a tensor never depends on
which other tensors exist or in what order they are made; the same arguments give the same bytes.
Scale: matrices are normal with Llama-2-7b's std of 0.02 at its width, rescaled by sqrt(fan_in) so a
tiny model's activations have the magnitude a real one's do (logits with a spread, not uniform); norm
weights vary around 1 so a stack that mishandles them shows it. Stored in bf16 by default, like the
released Llama-2 files. A Llama 3 size gets Llama 3's own tokenizer (llama-models' tiktoken model; make-checkpoint
prints its path and sha256), a Llama 2 size the project's small one.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
from pathlib import Path

import torch

from parity.arch import get_size
from parity.checkpoints.meta import write_meta
from parity.checkpoints.spec import Source, Spec
from parity.dtypes import torch_dtype
from parity.errors import UserError
from parity.io import atomic_dir, build_lock, cache_dir, sha256_file
from parity.tokenizer import default_tokenizer, kind_of_file, llama3_tokenizer, load_tokenizer

REFERENCE = get_size("7b")  # the real width whose init scale the synthetic weights imitate
BASE_STD = 0.02
NORM_SPREAD = 0.1
CACHE_ELEMENTS = 1 << 28  # models up to this many weights are held while written (minis; not real sizes)


class SyntheticSource(Source):
    def __init__(self, spec: Spec, seed: int, dtype: torch.dtype, tokenizer: Path):
        self.spec, self.seed, self.dtype, self.tokenizer = spec, seed, dtype, tokenizer
        self._drawn: dict[str, torch.Tensor] = {}
        self._small = sum(math.prod(spec.shape(k)) for k in spec.keys()) <= CACHE_ELEMENTS

    def get(self, key: str) -> torch.Tensor:
        # a writer of N files asks for each key N times (one block per file): a small model is drawn once
        # (a Llama 3 mini's 128256-row embedding is most of its weights and slow to draw)
        if key not in self._drawn:
            t = self._draw(key)
            if self._small:
                self._drawn[key] = t
            return t
        return self._drawn[key]

    def _draw(self, key: str) -> torch.Tensor:
        digest = hashlib.sha256(f"parity-synthetic/{self.seed}/{key}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        shape = self.spec.shape(key)
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        if len(shape) == 1:  # RMSNorm weights
            x = 1.0 + NORM_SPREAD * x
        else:
            x *= BASE_STD * (REFERENCE.dim / shape[1]) ** 0.5
        return x.to(self.dtype)


# The tokenizer a size's family gets when none is given (parity.arch.FAMILIES).
DEFAULT_TOKENIZERS = {"sentencepiece": default_tokenizer, "tiktoken": llama3_tokenizer}


def family_tokenizer(size_name: str, tokenizer: str | Path | None) -> Path:
    """The tokenizer for a size: the one given (of the family's kind, else one line), or the family's default."""
    fam = get_size(size_name).fam
    if tokenizer is None:
        return DEFAULT_TOKENIZERS[fam.tokenizer]()
    tok = Path(tokenizer)
    if (kind := kind_of_file(tok)) != fam.tokenizer:
        raise UserError(f"{tok}: a {kind} tokenizer, but size {size_name} is {fam.name} (a {fam.tokenizer} "
                        f"tokenizer.model); pass its own tokenizer or none")
    return tok


def make_checkpoint(size_name: str, out: str | Path, seed: int = 0, tokenizer: str | Path | None = None,
                    dtype: str = "bf16", overwrite: bool = False) -> Path:
    """Write a synthetic Meta checkpoint of `size_name` into `out` (atomically) and return it."""
    size = get_size(size_name)
    tok = family_tokenizer(size_name, tokenizer)
    vocab = load_tokenizer(tok).vocab_size
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
    tok = family_tokenizer(size_name, tokenizer)
    key = f"{size_name}-s{seed}-{dtype}-{sha256_file(tok)[:12]}"
    out = cache_dir() / "checkpoints" / key / "meta"
    if not (out / "params.json").is_file():
        with build_lock(out):
            if not (out / "params.json").is_file():
                make_checkpoint(size_name, out, seed=seed, tokenizer=tok, dtype=dtype, overwrite=True)
    return out


def cli_make_checkpoint(args) -> int:
    out = make_checkpoint(args.size, args.out, seed=args.seed, tokenizer=args.tokenizer,
                          dtype=getattr(args, "dtype", None) or "bf16", overwrite=args.overwrite)
    tok = out / "tokenizer.model"
    print(f"tokenizer: {family_tokenizer(args.size, args.tokenizer)} sha256 {sha256_file(tok)}", file=sys.stderr)
    print(out)
    return 0
