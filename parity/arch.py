"""The Llama-2 size table: the one place where model shapes live.

Real sizes are exactly Llama-2's. The "-mini" sizes keep what makes each real size exercise different
code paths (heads, kv heads / GQA, the ffn rule with its multiplier and multiple_of, the number of Meta
files, the default tensor-parallel size) with tiny widths and 2 layers, so a forward pass takes
milliseconds on a CPU. `1b-synthetic` is 7b's shape with 5 layers (~1.27 B parameters) for benchmarks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from parity.errors import UserError

LLAMA2_VOCAB = 32000
LLAMA2_NORM_EPS = 1e-5  # RMSNorm epsilon of every Llama-2 size
LLAMA2_ROPE_THETA = 10000.0  # rotary base of every Llama-2 size


@dataclass(frozen=True)
class Size:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    multiple_of: int
    ffn_dim_multiplier: float | None
    n_files: int  # consolidated.NN.pth files Meta ships (= Meta's model-parallel size)
    tp: int  # default tensor-parallel size for Megatron
    max_seq_len: int = 4096
    norm_eps: float = LLAMA2_NORM_EPS
    rope_theta: float = LLAMA2_ROPE_THETA
    real: bool = True  # a released Llama-2 size (needs real weights + GPUs), vs. synthetic

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return ffn_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def params_json(self, vocab_size: int = -1) -> dict:
        """params.json as Meta writes it (vocab_size -1: taken from the tokenizer)."""
        p = {"dim": self.dim, "multiple_of": self.multiple_of, "n_heads": self.n_heads,
             "n_layers": self.n_layers, "norm_eps": self.norm_eps, "vocab_size": vocab_size}
        if self.n_kv_heads != self.n_heads:
            p["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier is not None:
            p["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        return p

    def valid_tp(self, tp: int) -> bool:
        """TP must split query heads, kv groups and the ffn width evenly (Megatron and fairscale both
        need it; 13b's 40 heads allow TP 5, its ffn width 13824 does not)."""
        return tp >= 1 and self.n_heads % tp == 0 and self.n_kv_heads % tp == 0 and self.ffn_dim % tp == 0


def ffn_dim(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """Llama-2's FeedForward width rule (model.py): 11008, 13824, 28672 for 7b, 13b, 70b."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


SIZES: dict[str, Size] = {s.name: s for s in [
    Size("7b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, multiple_of=256,
         ffn_dim_multiplier=None, n_files=1, tp=1),
    Size("13b", dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, multiple_of=256,
         ffn_dim_multiplier=None, n_files=2, tp=2),
    Size("70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
         ffn_dim_multiplier=1.3, n_files=8, tp=8),
    # head_dim 8 everywhere; same heads / kv heads / ffn rule / files / TP as the real size.
    Size("7b-mini", dim=256, n_layers=2, n_heads=32, n_kv_heads=32, multiple_of=256,
         ffn_dim_multiplier=None, n_files=1, tp=1, max_seq_len=1024, real=False),
    Size("13b-mini", dim=320, n_layers=2, n_heads=40, n_kv_heads=40, multiple_of=256,
         ffn_dim_multiplier=None, n_files=2, tp=2, max_seq_len=1024, real=False),
    Size("70b-mini", dim=512, n_layers=2, n_heads=64, n_kv_heads=8, multiple_of=4096,
         ffn_dim_multiplier=1.3, n_files=8, tp=8, max_seq_len=1024, real=False),
    Size("1b-synthetic", dim=4096, n_layers=5, n_heads=32, n_kv_heads=32, multiple_of=256,
         ffn_dim_multiplier=None, n_files=1, tp=1, real=False),
]}
# Llama-2-Chat (the seed's 7Bf / 13Bf / 70Bf): fine-tuned weights with the base size's shapes, Meta file
# count and default TP; a size of its own so a config can hold both checkpoints and reports keep them apart.
SIZES.update({f"{b}-chat": dataclasses.replace(SIZES[b], name=f"{b}-chat") for b in ("7b", "13b", "70b")})

MINI_SIZES = ["7b-mini", "13b-mini", "70b-mini"]


def get_size(name: str) -> Size:
    try:
        return SIZES[name]
    except KeyError:
        raise UserError(f"unknown size {name!r}; known sizes: {', '.join(SIZES)}") from None


def size_from_params(params: dict) -> Size:
    """The Size a params.json describes (matched against the table, else an ad-hoc one)."""
    n_heads = params["n_heads"]
    shape = dict(dim=params["dim"], n_layers=params["n_layers"], n_heads=n_heads,
                 n_kv_heads=params.get("n_kv_heads") or n_heads, multiple_of=params.get("multiple_of", 256),
                 ffn_dim_multiplier=params.get("ffn_dim_multiplier"))
    for s in SIZES.values():
        if all(getattr(s, k) == v for k, v in shape.items()):
            return s
    return Size("custom", **shape, n_files=1, tp=1, norm_eps=params.get("norm_eps", LLAMA2_NORM_EPS),
                rope_theta=params.get("rope_theta", LLAMA2_ROPE_THETA), real=False)
