"""Meta's layout (Llama 2 and Llama 3): params.json + consolidated.NN.pth (+ tokenizer.model).

Meta's files are its model-parallel shards: a tensor is either split evenly across the N files along
one dimension, or replicated in each. FILE_SPLIT_DIM is that rule, written once for reading and writing;
the embedding's dim is the family's (arch.Family.embed_file_dim: Llama 2 model dim, Llama 3 vocab).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from parity.arch import Size, get_size, size_from_params
from parity.checkpoints.spec import IGNORED_KEYS, Source, Spec, leaf
from parity.errors import UserError
from parity.io import atomic_file, load_torch, read_json

# Leaf name -> dim split across the consolidated.NN.pth files (None: replicated in every file).
FILE_SPLIT_DIM = {
    "tok_embeddings.weight": None,     # the family's embed_file_dim (file_split_dim)
    "norm.weight": None,
    "output.weight": 0,
    "attention.wq.weight": 0,          # column parallel: output rows
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,          # row parallel: input columns
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}

FILE_RE = re.compile(r"consolidated\.(\d+)\.pth")


def file_split_dim(key: str, size: Size) -> int | None:
    if key == "tok_embeddings.weight":
        return size.fam.embed_file_dim
    return FILE_SPLIT_DIM[leaf(key)]


def files(d: str | Path) -> list[Path]:
    d = Path(d)
    found = sorted((int(m.group(1)), p) for p in d.glob("consolidated.*.pth") if (m := FILE_RE.fullmatch(p.name)))
    if not found:
        raise UserError(f"{d}: no consolidated.NN.pth files; is this a Meta checkpoint directory?")
    idx = [i for i, _ in found]
    if idx != list(range(len(idx))):
        raise UserError(f"{d}: consolidated files are numbered {idx}, expected 00..{len(idx) - 1:02d}; a file is missing")
    return [p for _, p in found]


def n_files(d: str | Path) -> int:
    return len(files(d))


def read_params(d: str | Path) -> dict:
    p = Path(d) / "params.json"
    if not p.is_file():
        raise UserError(f"{p}: params.json not found; a Meta checkpoint directory needs it")
    params = read_json(p, "params.json")
    for k in ("dim", "n_layers", "n_heads"):
        if not isinstance(params, dict) or k not in params:
            raise UserError(f"{p}: params.json lacks {k!r}")
    return params


class MetaSource(Source):
    """Reads a Meta directory lazily: every file mmap'd, a key merged only when asked for."""

    def __init__(self, d: str | Path, size_name: str | None = None):
        self.dir = Path(d)
        self.params = read_params(self.dir)
        self.paths = files(self.dir)
        n = len(self.paths)
        self.shards = [load_torch(p, mmap=True) for p in self.paths]
        for p, sd in zip(self.paths, self.shards):
            if not isinstance(sd, dict) or "tok_embeddings.weight" not in sd:
                raise UserError(f"{p}: missing key 'tok_embeddings.weight'; not a Meta checkpoint shard")
        size = size_from_params(self.params)
        if size_name:
            want = get_size(size_name)
            if (want.dim, want.n_layers, want.n_heads, want.n_kv_heads, want.ffn_dim) != (
                    size.dim, size.n_layers, size.n_heads, size.n_kv_heads, size.ffn_dim):
                raise UserError(f"{self.dir / 'params.json'}: describes a different model than size {size_name}")
            if want.rope != size.rope:  # Llama 2 70b and Llama 3 70b share every shape
                raise UserError(f"{self.dir / 'params.json'}: describes a {size.describe()} model, but size "
                                f"{size_name} is {want.describe()}; pass the size of this checkpoint's family")
            if n != want.n_files:
                raise UserError(f"{self.dir}: found {n} consolidated file(s); size {size_name} has {want.n_files}")
            size = want
        vocab = self.params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:  # Llama 2 writes -1; its files split the embedding on the model dim
            rows = self.shards[0]["tok_embeddings.weight"].shape[0]
            vocab = rows * (n if size.fam.embed_file_dim == 0 else 1)
        self.spec = Spec(size, vocab)
        self.dtype = self.shards[0]["tok_embeddings.weight"].dtype
        tok = self.dir / "tokenizer.model"
        self.tokenizer = tok if tok.is_file() else None
        self._check()

    def _check(self) -> None:
        n = len(self.paths)
        expected = set(self.spec.keys())
        for p, sd in zip(self.paths, self.shards):
            keys = set(sd) - IGNORED_KEYS
            if missing := sorted(expected - keys, key=self.spec.keys().index):
                raise UserError(f"{p}: missing key {missing[0]!r} ({len(missing)} missing)")
            if extra := sorted(keys - expected):
                raise UserError(f"{p}: unexpected key {extra[0]!r}; not a {self.spec.size.name} checkpoint")
        for key in self.spec.keys():
            full = list(self.spec.shape(key))
            d = file_split_dim(key, self.spec.size)
            if d is not None:
                if full[d] % n:
                    raise UserError(f"{self.dir}: {n} consolidated files cannot hold {key} {tuple(full)} "
                                    f"(split on dim {d}); the number of files does not match the model")
                full[d] //= n
            for p, sd in zip(self.paths, self.shards):
                if tuple(sd[key].shape) != tuple(full):
                    raise UserError(f"{p}: {key} has shape {tuple(sd[key].shape)}, expected {tuple(full)} "
                                    f"for {self.spec.size.name} in {n} file(s)")

    def get(self, key: str) -> torch.Tensor:
        d = file_split_dim(key, self.spec.size)
        if d is None or len(self.shards) == 1:  # no copy: the mmap'd tensor itself
            return self.shards[0][key]
        return torch.cat([sd[key] for sd in self.shards], dim=d)

    def block(self, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
        d = file_split_dim(key, self.spec.size)
        if d is None or len(self.shards) == 1:
            return self.shards[0][key].narrow(dim, start, stop - start)
        if d != dim:  # every file holds a strip of the block: cut each, join along the file split
            return torch.cat([sd[key].narrow(dim, start, stop - start) for sd in self.shards], dim=d)
        width = self.shards[0][key].shape[d]  # the block spans only the files it overlaps
        parts = []
        for f, sd in enumerate(self.shards):
            lo, hi = max(start, f * width), min(stop, (f + 1) * width)
            if lo < hi:
                parts.append(sd[key].narrow(d, lo - f * width, hi - lo))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=d)


def load_meta(d: str | Path, mmap: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(params, merged full tensors under Meta's names). For the backends; holds the whole model."""
    src = MetaSource(d)
    state = {k: src.get(k) for k in src.spec.keys()}
    if not mmap:
        state = {k: v.clone() for k, v in state.items()}
    return src.params, state


def write_params(out: Path, spec: Spec) -> None:
    """params.json as Meta writes it: one line; Llama 2 vocab_size -1 (the tokenizer decides), Llama 3 the
    vocabulary itself (llama_models' arch_args)."""
    with atomic_file(out / "params.json") as f:
        f.write(json.dumps(spec.size.params_json(spec.vocab if spec.size.family == "llama3" else -1)))


def write_meta(src: Source, out: Path, n: int, dtype: torch.dtype | None = None) -> None:
    """Write consolidated.00..n-1.pth, one file at a time: only one file's tensors are held."""
    spec = src.spec
    for key in spec.keys():
        d = file_split_dim(key, spec.size)
        if d is not None and spec.shape(key)[d] % n:
            raise UserError(f"{n} consolidated files cannot split {key} {spec.shape(key)} on dim {d}; "
                            f"choose --target-files dividing it")
    write_params(out, spec)
    for r in range(n):
        state = {}
        for key in spec.keys():
            d = file_split_dim(key, spec.size)
            if d is None:
                t = src.get(key)
            else:  # only file r's block is read from the source
                w = spec.shape(key)[d] // n
                t = src.block(key, d, r * w, (r + 1) * w)
            # an owned, contiguous copy: torch.save would otherwise store a view's whole storage
            state[key] = t.to(dtype or t.dtype, copy=True, memory_format=torch.contiguous_format)
            del t
        with atomic_file(out / f"consolidated.{r:02d}.pth", "wb") as f:
            torch.save(state, f)
        del state  # freed by reference counting, one file's tensors at a time (see megatron.write_megatron)
