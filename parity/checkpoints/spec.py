"""What a checkpoint must contain, in the canonical (Meta) naming every format converts through.

A converter reads any format as a `Source`: full tensors under Meta's key names in Meta's row order,
fetched one at a time (`get`), so a writer can stream a model it never holds whole. Each format's
module maps its own names and layout onto these keys with one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from parity.arch import SIZES, Size, get_size
from parity.errors import UserError

# Keys stored once for the whole model, then the per-layer keys ({i} = layer index).
GLOBAL_KEYS = ["tok_embeddings.weight", "norm.weight", "output.weight"]
LAYER_KEYS = [
    "layers.{i}.attention.wq.weight",
    "layers.{i}.attention.wk.weight",
    "layers.{i}.attention.wv.weight",
    "layers.{i}.attention.wo.weight",
    "layers.{i}.feed_forward.w1.weight",
    "layers.{i}.feed_forward.w2.weight",
    "layers.{i}.feed_forward.w3.weight",
    "layers.{i}.attention_norm.weight",
    "layers.{i}.ffn_norm.weight",
]
# Buffers some Meta files carry that are recomputed by every stack.
IGNORED_KEYS = {"rope.freqs"}


def split_layer(key: str) -> tuple[str, int | None]:
    """'layers.3.attention.wq.weight' -> ('layers.{i}.attention.wq.weight', 3); a global key -> (key, None)."""
    if key.startswith("layers."):
        _, i, rest = key.split(".", 2)
        return f"layers.{{i}}.{rest}", int(i)
    return key, None


def leaf(key: str) -> str:
    """The name without its layer: 'layers.3.attention.wq.weight' -> 'attention.wq.weight'."""
    return key.split(".", 2)[-1] if key.startswith("layers.") else key


# Rotary row order. Meta's wq / wk rows hold each head's rotary pairs interleaved (x0, x1), (x2, x3), ...;
# HF and Megatron rotate halves, so their rows are each head's even features, then its odd ones.
def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (interleaved pairs) -> rotate-half row order of wq / wk (HF, Megatron)."""
    rows, dim = w.shape
    hd = rows // n_heads
    return w.view(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half -> Meta: the inverse of permute."""
    rows, dim = w.shape
    hd = rows // n_heads
    return w.view(n_heads, 2, hd // 2, dim).transpose(1, 2).reshape(rows, dim)


@dataclass(frozen=True)
class Spec:
    """A model's shapes: its Size plus the true vocabulary size (from the tokenizer / embeddings)."""

    size: Size
    vocab: int
    def layer_keys(self, i: int) -> list[str]:
        return [k.format(i=i) for k in LAYER_KEYS]

    def keys(self) -> list[str]:
        """Meta's key order: globals first, then layer by layer."""
        return GLOBAL_KEYS + [k for i in range(self.size.n_layers) for k in self.layer_keys(i)]

    def shape(self, key: str) -> tuple[int, ...]:
        s = self.size
        hd = s.head_dim
        table = {
            "tok_embeddings.weight": (self.vocab, s.dim),
            "output.weight": (self.vocab, s.dim),
            "norm.weight": (s.dim,),
            "attention.wq.weight": (s.n_heads * hd, s.dim),
            "attention.wk.weight": (s.n_kv_heads * hd, s.dim),
            "attention.wv.weight": (s.n_kv_heads * hd, s.dim),
            "attention.wo.weight": (s.dim, s.n_heads * hd),
            "feed_forward.w1.weight": (s.ffn_dim, s.dim),
            "feed_forward.w3.weight": (s.ffn_dim, s.dim),
            "feed_forward.w2.weight": (s.dim, s.ffn_dim),
            "attention_norm.weight": (s.dim,),
            "ffn_norm.weight": (s.dim,),
        }
        return table[leaf(key)]


def match_size(where: Path, *, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn_dim: int,
               size_name: str | None = None, rope: tuple | None = None) -> Size:
    """The table Size with these shapes (formats other than Meta do not record multiple_of etc.) and, when
    given, this (rope_theta, RopeScaling | None): Llama 2 70b and Llama 3(.1) 70b differ only there.

    With `size_name`, that size is checked against the shapes instead.
    """
    found = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim)
    candidates = [get_size(size_name)] if size_name else list(SIZES.values())
    shaped = [s for s in candidates if all(getattr(s, k) == v for k, v in found.items())]
    for s in shaped:
        if rope is None or s.rope == rope:
            return s
    what = ", ".join(f"{k}={v}" for k, v in found.items())
    if shaped:
        theta, scaling = rope
        has = f"rope_theta {theta:g}" + (", scaled rotary (3.1)" if scaling else "")
        raise UserError(f"{where}: the checkpoint has {has}, but size {shaped[0].name} is {shaped[0].describe()}; "
                        f"pass the size of this checkpoint's family")
    if size_name:
        raise UserError(f"{where}: the checkpoint ({what}) is not size {size_name}; pass the right --size")
    raise UserError(f"{where}: no size in the table has {what}; add it to parity/arch.py")


class Source:
    """A checkpoint opened for reading: spec, stored dtype, tokenizer, and full tensors by Meta key."""

    spec: Spec
    dtype: torch.dtype
    tokenizer: Path | None

    def get(self, key: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def block(self, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """[start, stop) of `key` along `dim` (a writer's TP slice). Formats whose files are already
        split override this to read only the files that hold the block, never the full tensor."""
        return self.get(key).narrow(dim, start, stop - start)
