"""Legacy Megatron-LM checkpoint directory for megatron-core's GPTModel (local or Transformer Engine spec).

    latest_checkpointed_iteration.txt      "release" (or an iteration number -> iter_NNNNNNN/)
    tokenizer.model                        args.tokenizer_model names it, relative to the top
    release/mp_rank_TT/model_optim_rng.pt  {"model": state_dict, "args": Namespace,
                                            "checkpoint_version": 3.0, "iteration": 0}

MEGATRON_KEYS is the one table of the layout: each Megatron tensor, how it is split across TP ranks,
how its rows are laid out, and the Meta tensors it is built from. The writer (rank_state), the shape
check (expected_rank_shapes), the reader (MegatronSource.get) and the backend (load_rank) go through it.
Its keys are the local spec's names; a row whose name differs under the Transformer Engine spec carries
that name too (the two layer norms, fused into the following linear layer by TE), so checkpoints saved
by TE-trained models read, and --megatron-spec te writes, under TE's names. It is meant to carry
torch_dist checkpoints and pipeline stages as well (docs/architecture.md, "Checkpoint layouts").
"""

from __future__ import annotations

import argparse
import gc
import re
from pathlib import Path
from typing import NamedTuple

import torch

from parity.checkpoints import MEGATRON_SPECS
from parity.checkpoints.spec import Source, Spec, match_size, permute, split_layer, unpermute
from parity.errors import UserError
from parity.io import atomic_file, load_torch

TRACKER = "latest_checkpointed_iteration.txt"
CKPT_NAME = "model_optim_rng.pt"
MAKE_VOCAB_DIVISIBLE_BY = 128  # Megatron-LM's default
EXTRA_STATE = "._extra_state"  # per-module metadata entries (Transformer Engine's fp8 state), no weights


class Layout(NamedTuple):
    split: str | None  # across TP ranks: "rows" (dim 0), "cols" (dim 1), None (replicated)
    kind: str  # how the rows are laid out, see MEGATRON_KEYS
    meta: tuple[str, ...]  # the Meta key(s) it is built from, in the order their rows are stacked
    te: str | None = None  # its name under the Transformer Engine layer spec, where that differs


def row(split: str | None, kind: str, *meta: str, te: str | None = None) -> Layout:
    return Layout(split, kind, meta, te)


# Megatron key ({i} = layer) -> Layout, in GPTModel's state_dict order: what the first pipeline stage
# holds (the embedding), each layer's tensors, what the last stage holds (final norm, output layer).
# Row layouts (kind):
#   plain  the Meta tensor as it is
#   vocab  the Meta rows, then zero rows up to padded_vocab (Megatron pads the vocabulary)
#   qkv    for each kv group g: [q rows of g's heads, k_g, v_g], q and k in rotate-half order (Megatron's
#          rotary is rotate-half, like HF's); a TP rank holds a contiguous block of groups
#   fc1    for each TP rank: its block of gate (w1) rows, then its block of up (w3) rows
MEGATRON_KEYS = {
    "embedding.word_embeddings.weight":                     row("rows", "vocab", "tok_embeddings.weight"),
    "decoder.layers.{i}.input_layernorm.weight":            row(None, "plain", "layers.{i}.attention_norm.weight",
                                                                te="decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight"),
    "decoder.layers.{i}.self_attention.linear_qkv.weight":  row("rows", "qkv", "layers.{i}.attention.wq.weight",
                                                                "layers.{i}.attention.wk.weight",
                                                                "layers.{i}.attention.wv.weight"),
    "decoder.layers.{i}.self_attention.linear_proj.weight": row("cols", "plain", "layers.{i}.attention.wo.weight"),
    "decoder.layers.{i}.pre_mlp_layernorm.weight":          row(None, "plain", "layers.{i}.ffn_norm.weight",
                                                                te="decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"),
    "decoder.layers.{i}.mlp.linear_fc1.weight":             row("rows", "fc1", "layers.{i}.feed_forward.w1.weight",
                                                                "layers.{i}.feed_forward.w3.weight"),
    "decoder.layers.{i}.mlp.linear_fc2.weight":             row("cols", "plain", "layers.{i}.feed_forward.w2.weight"),
    "decoder.final_layernorm.weight":                       row(None, "plain", "norm.weight"),
    "output_layer.weight":                                  row("rows", "vocab", "output.weight"),
}
TP_DIM = {"rows": 0, "cols": 1}  # a Layout's split -> the dim cut across TP ranks
# Meta key ({i} = layer) -> the Megatron key holding it.
BY_META = {m: k for k, lay in MEGATRON_KEYS.items() for m in lay.meta}


def locate(meta_key: str) -> tuple[str, Layout, int]:
    """Where a Meta tensor lives: (Megatron key, its Layout, its place among the Layout's Meta keys)."""
    template, i = split_layer(meta_key)
    mkey = BY_META[template]
    lay = MEGATRON_KEYS[mkey]
    return mkey.format(i=i), lay, lay.meta.index(template)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


# (pattern of a local name, its TE name template) and back, for the rows that differ
_TO_TE = [(_pattern(k), lay.te) for k, lay in MEGATRON_KEYS.items() if lay.te]
_FROM_TE = [(_pattern(lay.te), k) for k, lay in MEGATRON_KEYS.items() if lay.te]


def _renamed(state: dict, rules) -> dict:
    out = {}
    for k, v in state.items():
        for pattern, template in rules:
            if m := pattern.fullmatch(k):
                k = template.format(i=m.group(1)) if m.groups() else template
                break
        out[k] = v
    return out


def named_for(state: dict, spec: str) -> dict:
    """A state_dict under MEGATRON_KEYS' names, renamed to what the `spec` layer spec's GPTModel calls them."""
    if spec not in MEGATRON_SPECS:
        raise UserError(f"unknown megatron layer spec {spec!r}; use one of {', '.join(MEGATRON_SPECS)}")
    return _renamed(state, _TO_TE) if spec == "te" else dict(state)


def canonical(state: dict) -> dict:
    """A state_dict as saved by either spec, under MEGATRON_KEYS' names."""
    return _renamed(state, _FROM_TE)


def megatron_keys(n_layers: int) -> list[tuple[str, Layout, int | None]]:
    """(Megatron key, Layout, layer or None) of a whole model in state_dict order: the table's rows before
    its layer rows, each layer's rows, the rows after (a pipeline stage would hold a slice of this)."""
    rows = list(MEGATRON_KEYS.items())
    layer = [n for n, (k, _) in enumerate(rows) if "{i}" in k]
    first, last = layer[0], layer[-1] + 1
    return ([(k, lay, None) for k, lay in rows[:first]]
            + [(k.format(i=i), lay, i) for i in range(n_layers) for k, lay in rows[first:last]]
            + [(k, lay, None) for k, lay in rows[last:]])


def padded_vocab(vocab: int, tp: int, divisible_by: int = MAKE_VOCAB_DIVISIBLE_BY) -> int:
    m = divisible_by * tp
    return -(-vocab // m) * m


def rank_dir(d: Path, it: str, rank: int) -> Path:
    return d / it / f"mp_rank_{rank:02d}"


def make_args(spec: Spec, tp: int, dtype: torch.dtype, layer_spec: str = "local") -> argparse.Namespace:
    """Megatron-LM's argument names, enough for --use-checkpoint-args / a TransformerConfig."""
    s = spec.size
    return argparse.Namespace(
        num_layers=s.n_layers, hidden_size=s.dim, ffn_hidden_size=s.ffn_dim,
        num_attention_heads=s.n_heads, kv_channels=s.head_dim,
        group_query_attention=s.n_kv_heads != s.n_heads, num_query_groups=s.n_kv_heads,
        seq_length=s.max_seq_len, max_position_embeddings=s.max_seq_len,
        norm_epsilon=s.norm_eps, normalization="RMSNorm", apply_layernorm_1p=False,
        swiglu=True, bias_swiglu_fusion=False, squared_relu=False, openai_gelu=False,
        untie_embeddings_and_output_weights=True, position_embedding_type="rope",
        use_rotary_position_embeddings=True, add_position_embedding=False,
        rotary_base=int(s.rope_theta), rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=False,
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        attention_dropout=0.0, hidden_dropout=0.0, apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True, apply_residual_connection_post_layernorm=False,
        vocab_size=spec.vocab, padded_vocab_size=padded_vocab(spec.vocab, tp),
        make_vocab_size_divisible_by=MAKE_VOCAB_DIVISIBLE_BY,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
        expert_model_parallel_size=1, data_parallel_size=1, world_size=tp, sequence_parallel=False,
        rotary_seq_len_interpolation_factor=None,
        num_experts=None, transformer_impl="transformer_engine" if layer_spec == "te" else "local",
        use_mcore_models=True, use_legacy_models=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tokenizer_type="Llama2Tokenizer", tokenizer_model="tokenizer.model",
        init_method_std=0.02, ckpt_format="torch", iteration=0,
        consumed_train_samples=0, consumed_valid_samples=0,
    )


def check_tp(spec: Spec, tp: int, where: str) -> None:
    if not spec.size.valid_tp(tp):
        raise UserError(f"{where}: TP {tp} does not divide the {spec.size.n_heads} heads and "
                        f"{spec.size.n_kv_heads} kv groups of {spec.size.name}; pick a TP dividing both")


def kv_groups(args: argparse.Namespace) -> int:
    """Megatron-LM's GQA rule: num_query_groups counts only with group_query_attention; else a group per head."""
    return args.num_query_groups if getattr(args, "group_query_attention", False) else args.num_attention_heads


def qkv_rank(src: Source, keys: list[str], tp: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank r's linear_qkv from (wq, wk, wv): its block of kv groups, each [q rows of the group's heads, k_g, v_g].

    A block of groups is a block of whole heads in wq, wk and wv, so only those rows are read and the
    rotate-half permutation is applied per head within the block."""
    s = src.spec.size
    gp, hd = s.n_kv_heads // tp, s.head_dim  # kv groups on this rank
    per = s.n_heads // s.n_kv_heads  # query heads per group
    wq, wk, wv = keys
    q = src.block(wq, 0, r * gp * per * hd, (r + 1) * gp * per * hd)
    k = src.block(wk, 0, r * gp * hd, (r + 1) * gp * hd)
    v = src.block(wv, 0, r * gp * hd, (r + 1) * gp * hd)
    q = permute(q.to(dtype), gp * per).reshape(gp, per * hd, s.dim)
    k = permute(k.to(dtype), gp).reshape(gp, hd, s.dim)
    v = v.to(dtype).reshape(gp, hd, s.dim)
    return torch.cat([q, k, v], dim=1).reshape(-1, s.dim)


def split_qkv(blocks: list[torch.Tensor], spec: Spec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ranks' linear_qkv -> Meta-order (wq, wk, wv)."""
    s = spec.size
    g, hd = s.n_kv_heads, s.head_dim
    qkv = torch.cat(blocks, dim=0).reshape(g, -1, s.dim)
    q, k, v = qkv.split([qkv.shape[1] - 2 * hd, hd, hd], dim=1)
    return (unpermute(q.reshape(-1, s.dim), s.n_heads), unpermute(k.reshape(-1, s.dim), s.n_kv_heads),
            v.reshape(-1, s.dim).clone())


def vocab_block(src: Source, key: str, padded: int, tp: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank r's rows of the vocab padded with zero rows to `padded` (only this rank's rows are read)."""
    rows, vocab = padded // tp, src.spec.vocab
    out = torch.zeros((rows, src.spec.size.dim), dtype=dtype)
    lo, hi = r * rows, min((r + 1) * rows, vocab)
    if lo < hi:
        out[: hi - lo] = src.block(key, 0, lo, hi)
    return out


def rank_tensor(src: Source, lay: Layout, i: int | None, tp: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank r's part of one Megatron tensor: only this rank's block of each Meta tensor is read."""
    keys = [k.format(i=i) for k in lay.meta]
    if lay.kind == "vocab":
        return vocab_block(src, keys[0], padded_vocab(src.spec.vocab, tp), tp, r, dtype)
    if lay.kind == "qkv":
        return qkv_rank(src, keys, tp, r, dtype)
    if lay.split is None:  # replicated
        return src.get(keys[0]).to(dtype, copy=True)

    def block(key):  # an owned, contiguous copy: torch.save would otherwise store a view's whole storage
        d = TP_DIM[lay.split]
        w = src.spec.shape(key)[d] // tp
        return src.block(key, d, r * w, (r + 1) * w).to(dtype, copy=True, memory_format=torch.contiguous_format)

    if lay.kind == "fc1":
        return torch.cat([block(k) for k in keys])
    return block(keys[0])


def rank_state(src: Source, tp: int, r: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rank r's state_dict, read key by key: only this rank's block of each tensor is ever read."""
    return {k: rank_tensor(src, lay, i, tp, r, dtype) for k, lay, i in megatron_keys(src.spec.size.n_layers)}


def write_megatron(src: Source, out: Path, tp: int, dtype: torch.dtype | None = None,
                   layer_spec: str = "local") -> None:
    """Write the legacy directory, one TP rank at a time (only one rank's tensors are held), under the
    names of `layer_spec`'s GPTModel."""
    dtype = dtype or src.dtype
    check_tp(src.spec, tp, f"--target-tp {tp}")
    args = make_args(src.spec, tp, dtype, layer_spec)
    for r in range(tp):
        state = named_for(rank_state(src, tp, r, dtype), layer_spec)
        d = rank_dir(out, "release", r)
        d.mkdir(parents=True)
        with atomic_file(d / CKPT_NAME, "wb") as f:
            torch.save({"model": state, "args": args, "checkpoint_version": 3.0, "iteration": 0}, f)
        del state
        gc.collect()
    if src.tokenizer is not None:
        import shutil

        shutil.copyfile(src.tokenizer, out / "tokenizer.model")
    with atomic_file(out / TRACKER) as f:
        f.write("release")


# ---- reading -------------------------------------------------------------------------------------

def iteration_dir(d: str | Path) -> str:
    d = Path(d)
    t = d / TRACKER
    if not t.is_file():
        raise UserError(f"{t}: not found; a Megatron checkpoint directory needs it")
    it = t.read_text().strip()
    if it != "release":
        if not it.isdigit():
            raise UserError(f"{t}: expected 'release' or an iteration number, found {it[:40]!r}")
        it = f"iter_{int(it):07d}"
    return it


def _load(d: Path, rank: int, mmap: bool) -> dict:
    it = iteration_dir(d)
    p = rank_dir(d, it, rank) / CKPT_NAME
    if not p.is_file() and (d / it / f"mp_rank_{rank:02d}_000").is_dir():
        raise UserError(f"{d / it}: pipeline-parallel checkpoints (mp_rank_TT_PPP) are not supported; "
                        f"convert with pipeline_model_parallel_size 1")
    ck = load_torch(p, mmap=mmap)
    if not isinstance(ck, dict) or "model" not in ck or "args" not in ck:
        raise UserError(f"{p}: not a Megatron checkpoint (needs 'model' and 'args')")
    return ck


def read_args(d: str | Path) -> argparse.Namespace:
    return _load(Path(d), 0, mmap=True)["args"]


def tp_size(d: str | Path) -> int:
    return int(read_args(d).tensor_model_parallel_size)


def without_extra_state(sd: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.endswith(EXTRA_STATE)}


def load_rank(d: str | Path, rank: int) -> dict[str, torch.Tensor]:
    """The state_dict of mp_rank_{rank:02d} (mmap'd), without its _extra_state entries, under
    MEGATRON_KEYS' names whichever layer spec saved it."""
    return canonical(without_extra_state(_load(Path(d), rank, mmap=True)["model"]))


def expected_rank_shapes(spec: Spec, tp: int) -> dict[str, tuple[int, ...]]:
    """Every Megatron key's shape on one TP rank."""
    shapes = {}
    for k, lay, _ in megatron_keys(spec.size.n_layers):
        parts = [spec.shape(m) for m in lay.meta]  # the Meta tensors' rows are stacked
        rows = padded_vocab(spec.vocab, tp) if lay.kind == "vocab" else sum(p[0] for p in parts)
        shape = [rows, *parts[0][1:]]
        if lay.split is not None:
            shape[TP_DIM[lay.split]] //= tp
        shapes[k] = tuple(shape)
    return shapes


class MegatronSource(Source):
    """Reads every rank mmap'd; a Meta key is assembled from the ranks when asked for."""

    def __init__(self, d: str | Path, size_name: str | None = None):
        self.dir = Path(d)
        it = iteration_dir(self.dir)
        ck0 = _load(self.dir, 0, mmap=True)
        a = ck0["args"]
        where = rank_dir(self.dir, it, 0) / CKPT_NAME
        try:
            size = match_size(where, dim=a.hidden_size, n_layers=a.num_layers, n_heads=a.num_attention_heads,
                              n_kv_heads=kv_groups(a), ffn_dim=a.ffn_hidden_size, size_name=size_name)
            self.tp = int(a.tensor_model_parallel_size)
            vocab, self.padded = int(a.vocab_size), int(a.padded_vocab_size)
            if int(getattr(a, "pipeline_model_parallel_size", 1)) != 1:
                raise UserError(f"{where}: pipeline parallel checkpoints are not supported")
        except AttributeError as e:
            raise UserError(f"{where}: args lack {e.name or e}; not written by Megatron-LM or parity") from None
        self.spec = Spec(size, vocab)
        check_tp(self.spec, self.tp, str(where))
        ranks = sorted(p.name for p in (self.dir / it).glob("mp_rank_*"))
        if len(ranks) != self.tp:
            raise UserError(f"{self.dir / it}: {len(ranks)} mp_rank_* directories, args say TP {self.tp}")
        self.ranks = [canonical(without_extra_state(ck0["model"]))] + [load_rank(self.dir, r) for r in range(1, self.tp)]
        shapes = expected_rank_shapes(self.spec, self.tp)
        if shapes["embedding.word_embeddings.weight"][0] * self.tp != self.padded:
            raise UserError(f"{where}: padded_vocab_size {self.padded} is not the padding of vocab {vocab} at TP {self.tp}")
        for r, sd in enumerate(self.ranks):
            p = rank_dir(self.dir, it, r) / CKPT_NAME
            if missing := [k for k in shapes if k not in sd]:
                raise UserError(f"{p}: missing key {missing[0]!r} ({len(missing)} missing)")
            if extra := sorted(set(sd) - set(shapes)):
                raise UserError(f"{p}: unexpected key {extra[0]!r}")
            for k, shape in shapes.items():
                if tuple(sd[k].shape) != shape:
                    raise UserError(f"{p}: {k} has shape {tuple(sd[k].shape)}, expected {shape} at TP {self.tp}")
        self.dtype = self.ranks[0]["embedding.word_embeddings.weight"].dtype
        tok = self.dir / (getattr(a, "tokenizer_model", None) or "tokenizer.model")
        self.tokenizer = tok if tok.is_file() else None
        self._qkv_cache: tuple[str, tuple] | None = None

    def get(self, key: str) -> torch.Tensor:
        mkey, lay, part = locate(key)
        if lay.kind == "qkv":
            if self._qkv_cache is None or self._qkv_cache[0] != mkey:  # one layer's q, k, v kept
                self._qkv_cache = (mkey, split_qkv([sd[mkey] for sd in self.ranks], self.spec))
            return self._qkv_cache[1][part]
        if lay.kind == "fc1":  # each rank: its gate block, then its up block
            return torch.cat([sd[mkey].chunk(len(lay.meta), dim=0)[part] for sd in self.ranks], dim=0)
        if lay.split is None:
            return self.ranks[0][mkey]
        full = torch.cat([sd[mkey] for sd in self.ranks], dim=TP_DIM[lay.split])
        return full[: self.spec.vocab] if lay.kind == "vocab" else full
