"""The size table: the one place where model shapes live (Llama 2 and the Llama 3 family).

Real sizes are exactly as released (Llama 3 / 3.1: llama_models' sku_list arch_args and pth_file_count). The "-mini" sizes keep what makes each real size exercise different
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
LLAMA3_VOCAB = 128256  # llama_models' LLAMA3_VOCAB_SIZE: 128000 BPE ranks + 256 special tokens
LLAMA3_ROPE_THETA = 500000.0


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's rotary frequency scaling (HF rope_type "llama3"). llama_models' apply_scaling hard-codes
    these four numbers; megatron-core takes only the factor (the other three are its defaults)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def hf(self) -> dict:
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


LLAMA31_SCALING = RopeScaling()


@dataclass(frozen=True)
class Family:
    """What a model family fixes besides shapes: its tokenizer, and how Meta's files split the embedding."""

    name: str
    tokenizer: str  # parity.tokenizer.KINDS: how its tokenizer.model is read
    embed_file_dim: int  # dim of tok_embeddings split across consolidated.NN.pth (Llama 2: model dim)
    megatron_tokenizer_type: str  # Megatron-LM's --tokenizer-type for it
    bos_id: int  # written into HF configs (requests take BOS from the tokenizer itself)
    eos_id: int


FAMILIES = {f.name: f for f in [
    Family("llama2", tokenizer="sentencepiece", embed_file_dim=1, megatron_tokenizer_type="Llama2Tokenizer",
           bos_id=1, eos_id=2),
    # llama3/model.py: tok_embeddings is a VocabParallelEmbedding and Meta's files are its MP shards
    # (llama_models/checkpoint.py lists tok_embeddings among the column (dim 0) keys)
    # <|begin_of_text|>, <|end_of_text|> of llama_models' Tokenizer
    Family("llama3", tokenizer="tiktoken", embed_file_dim=0, megatron_tokenizer_type="HuggingFaceTokenizer",
           bos_id=128000, eos_id=128001),
]}


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
    real: bool = True  # a released size (needs real weights + GPUs), vs. synthetic
    family: str = "llama2"  # FAMILIES
    rope_scaling: RopeScaling | None = None  # Llama 3.1's use_scaled_rope

    @property
    def fam(self) -> Family:
        return FAMILIES[self.family]

    @property
    def rope(self) -> tuple:
        """What the rotary embedding depends on besides head_dim (compared when a checkpoint names a size)."""
        return (self.rope_theta, self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return ffn_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def params_json(self, vocab_size: int = -1) -> dict:
        """params.json as Meta writes it. Llama 2: vocab_size -1 (taken from the tokenizer); Llama 3: the
        vocab, rope_theta and use_scaled_rope named (llama_models' arch_args)."""
        p = {"dim": self.dim, "multiple_of": self.multiple_of, "n_heads": self.n_heads,
             "n_layers": self.n_layers, "norm_eps": self.norm_eps, "vocab_size": vocab_size}
        if self.n_kv_heads != self.n_heads:
            p["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier is not None:
            p["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        if self.family == "llama3":
            p.update(rope_theta=self.rope_theta, use_scaled_rope=self.rope_scaling is not None)
        return p

    def describe(self) -> str:
        """The family facts named in a mismatch message."""
        scaled = ", scaled rotary (3.1)" if self.rope_scaling else ""
        return f"{self.family}: rope_theta {self.rope_theta:g}{scaled}"

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

# Llama 3 / 3.1 as released (llama_models 0.3.0 sku_list: arch_args, pth_file_count; 405b = the bf16 MP8
# release). Default TP = Meta's file count, as for Llama 2. Minis: head_dim 4 (the smallest with a
# rotary frequency that 3.1's scaling changes: wavelength 4443 lies between 2048 and 8192, so it is
# smoothed), 2 layers, the real size's heads / kv heads, ffn rule, files, TP, theta and scaling; the
# vocabulary is the real tokenizer's, so the embedding dominates a mini's weights.
_L3 = dict(family="llama3", rope_theta=LLAMA3_ROPE_THETA, max_seq_len=8192)
_L31 = dict(_L3, rope_scaling=LLAMA31_SCALING, max_seq_len=131072)
# Llama 3 minis keep the real context length (transformers warns when 3.1's is not above the scaling's
# original 8192; no stack allocates per position up front, Meta's rotary table is 2 x length x head_dim/2)
_MINI = dict(n_layers=2, real=False)
_LLAMA3 = [
    Size("llama3-8b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
         ffn_dim_multiplier=1.3, n_files=1, tp=1, **_L3),
    Size("llama3-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
         ffn_dim_multiplier=1.3, n_files=8, tp=8, **_L3),
    Size("llama3.1-8b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
         ffn_dim_multiplier=1.3, n_files=1, tp=1, **_L31),
    Size("llama3.1-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
         ffn_dim_multiplier=1.3, n_files=8, tp=8, **_L31),
    Size("llama3.1-405b", dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
         ffn_dim_multiplier=1.2, n_files=8, tp=8, **_L31),
]
SIZES.update({s.name: s for s in _LLAMA3})
SIZES.update({f"{s.name}-instruct": dataclasses.replace(s, name=f"{s.name}-instruct") for s in _LLAMA3})
SIZES.update({s.name: s for s in [
    Size("llama3-8b-mini", dim=128, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
         n_files=1, tp=1, **{**_L3, **_MINI}),
    Size("llama3.1-8b-mini", dim=128, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
         n_files=1, tp=1, **{**_L31, **_MINI}),
    Size("llama3.1-70b-mini", dim=256, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3,
         n_files=8, tp=8, **{**_L31, **_MINI}),
    Size("llama3.1-405b-mini", dim=512, n_heads=128, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.2,
         n_files=8, tp=8, **{**_L31, **_MINI}),
]})

MINI_SIZES = ["7b-mini", "13b-mini", "70b-mini"]
LLAMA3_MINI_SIZES = ["llama3-8b-mini", "llama3.1-8b-mini", "llama3.1-70b-mini", "llama3.1-405b-mini"]


def get_size(name: str) -> Size:
    try:
        return SIZES[name]
    except KeyError:
        raise UserError(f"unknown size {name!r}; known sizes: {', '.join(SIZES)}") from None


def rope_from_params(params: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) of a params.json: Llama 2's omit both (theta 10000), Llama 3's name theta,
    3.1's set use_scaled_rope (llama_models' apply_scaling: always LLAMA31_SCALING)."""
    theta = float(params.get("rope_theta", LLAMA2_ROPE_THETA))
    return theta, (LLAMA31_SCALING if params.get("use_scaled_rope") else None)


def size_from_params(params: dict) -> Size:
    """The Size a params.json describes (matched against the table, else an ad-hoc one). Llama 2 70b and
    Llama 3 70b have the same shapes: rope theta and scaling tell them apart."""
    n_heads = params["n_heads"]
    shape = dict(dim=params["dim"], n_layers=params["n_layers"], n_heads=n_heads,
                 n_kv_heads=params.get("n_kv_heads") or n_heads, multiple_of=params.get("multiple_of", 256),
                 ffn_dim_multiplier=params.get("ffn_dim_multiplier"))
    theta, scaling = rope_from_params(params)
    for s in SIZES.values():
        if all(getattr(s, k) == v for k, v in shape.items()) and s.rope == (theta, scaling):
            return s
    family = "llama3" if theta != LLAMA2_ROPE_THETA or scaling else "llama2"
    return Size("custom", **shape, n_files=1, tp=1, norm_eps=params.get("norm_eps", LLAMA2_NORM_EPS),
                rope_theta=theta, rope_scaling=scaling, family=family, real=False)
