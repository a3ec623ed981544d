"""Legacy Megatron-LM checkpoint directory for megatron-core's GPTModel (local layer spec).

    latest_checkpointed_iteration.txt      "release" (or an iteration number -> iter_NNNNNNN/)
    tokenizer.model                        args.tokenizer_model names it, relative to the top
    release/mp_rank_TT/model_optim_rng.pt  {"model": state_dict, "args": Namespace,
                                            "checkpoint_version": 3.0, "iteration": 0}

Layout rules (MEGATRON_KEYS says how each tensor is split across TP ranks):
- q/k rows are in rotate-half order, like HF (Megatron's rotary is rotate-half);
- linear_qkv: for each kv group g, [q rows of g's heads, k_g, v_g]; a rank holds a block of groups;
- linear_fc1: this rank's gate (w1) rows, then its up (w3) rows;
- the vocabulary is padded with zero rows to a multiple of make_vocab_size_divisible_by * TP.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from parity.checkpoints.hf import permute, unpermute
from parity.checkpoints.spec import Source, Spec, match_size
from parity.errors import UserError
from parity.io import atomic_file, load_torch

TRACKER = "latest_checkpointed_iteration.txt"
CKPT_NAME = "model_optim_rng.pt"
MAKE_VOCAB_DIVISIBLE_BY = 128  # Megatron-LM's default

# Megatron key -> how it is split across TP ranks ("rows" dim 0, "cols" dim 1, None replicated).
# Fused keys (qkv, fc1) also have a special row layout, built by qkv_rank / fc1_rank below.
MEGATRON_KEYS = {
    "embedding.word_embeddings.weight": "rows",                  # tok_embeddings, vocab padded
    "decoder.layers.{i}.input_layernorm.weight": None,           # attention_norm
    "decoder.layers.{i}.self_attention.linear_qkv.weight": "rows",  # wq, wk, wv grouped per kv group
    "decoder.layers.{i}.self_attention.linear_proj.weight": "cols",  # wo
    "decoder.layers.{i}.pre_mlp_layernorm.weight": None,         # ffn_norm
    "decoder.layers.{i}.mlp.linear_fc1.weight": "rows",          # w1 (gate) block + w3 (up) block
    "decoder.layers.{i}.mlp.linear_fc2.weight": "cols",          # w2
    "decoder.final_layernorm.weight": None,                      # norm
    "output_layer.weight": "rows",                               # output, vocab padded
}
# Meta key -> Megatron key, for the tensors that map one to one.
DIRECT = {
    "norm.weight": "decoder.final_layernorm.weight",
    "layers.{i}.attention_norm.weight": "decoder.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "decoder.layers.{i}.pre_mlp_layernorm.weight",
    "layers.{i}.attention.wo.weight": "decoder.layers.{i}.self_attention.linear_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "decoder.layers.{i}.mlp.linear_fc2.weight",
    "tok_embeddings.weight": "embedding.word_embeddings.weight",
    "output.weight": "output_layer.weight",
}


def padded_vocab(vocab: int, tp: int, divisible_by: int = MAKE_VOCAB_DIVISIBLE_BY) -> int:
    m = divisible_by * tp
    return -(-vocab // m) * m


def rank_dir(d: Path, it: str, rank: int) -> Path:
    return d / it / f"mp_rank_{rank:02d}"


def make_args(spec: Spec, tp: int, dtype: torch.dtype) -> argparse.Namespace:
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
        num_experts=None, transformer_impl="local", use_mcore_models=True, use_legacy_models=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tokenizer_type="Llama2Tokenizer", tokenizer_model="tokenizer.model",
        init_method_std=0.02, ckpt_format="torch", iteration=0,
        consumed_train_samples=0, consumed_valid_samples=0,
    )


def check_tp(spec: Spec, tp: int, where: str) -> None:
    if not spec.size.valid_tp(tp):
        raise UserError(f"{where}: TP {tp} does not divide the {spec.size.n_heads} heads and "
                        f"{spec.size.n_kv_heads} kv groups of {spec.size.name}; pick a TP dividing both")


def qkv_rank(src: Source, i: int, tp: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank r's linear_qkv: its block of kv groups, each [q rows of the group's heads, k_g, v_g].

    A block of groups is a block of whole heads in wq, wk and wv, so only those rows are read and the
    rotate-half permutation is applied per head within the block."""
    s = src.spec.size
    gp, hd = s.n_kv_heads // tp, s.head_dim  # kv groups on this rank
    per = s.n_heads // s.n_kv_heads  # query heads per group
    q = src.block(f"layers.{i}.attention.wq.weight", 0, r * gp * per * hd, (r + 1) * gp * per * hd)
    k = src.block(f"layers.{i}.attention.wk.weight", 0, r * gp * hd, (r + 1) * gp * hd)
    v = src.block(f"layers.{i}.attention.wv.weight", 0, r * gp * hd, (r + 1) * gp * hd)
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


def rank_state(src: Source, tp: int, r: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rank r's state_dict, read key by key: only this rank's block of each tensor is ever read."""
    spec = src.spec
    vocab_p = padded_vocab(spec.vocab, tp)

    def whole(key):  # replicated norms
        return src.get(key).to(dtype, copy=True)

    def split(key, how):
        dim = 0 if how == "rows" else 1
        w = spec.shape(key)[dim] // tp
        return src.block(key, dim, r * w, (r + 1) * w).to(dtype, copy=True, memory_format=torch.contiguous_format)

    state = {"embedding.word_embeddings.weight": vocab_block(src, "tok_embeddings.weight", vocab_p, tp, r, dtype)}
    for i in range(spec.size.n_layers):
        L = f"decoder.layers.{i}."
        state[L + "input_layernorm.weight"] = whole(f"layers.{i}.attention_norm.weight")
        state[L + "self_attention.linear_qkv.weight"] = qkv_rank(src, i, tp, r, dtype)
        state[L + "self_attention.linear_proj.weight"] = split(f"layers.{i}.attention.wo.weight", "cols")
        state[L + "pre_mlp_layernorm.weight"] = whole(f"layers.{i}.ffn_norm.weight")
        state[L + "mlp.linear_fc1.weight"] = torch.cat(
            [split(f"layers.{i}.feed_forward.w1.weight", "rows"), split(f"layers.{i}.feed_forward.w3.weight", "rows")])
        state[L + "mlp.linear_fc2.weight"] = split(f"layers.{i}.feed_forward.w2.weight", "cols")
    state["decoder.final_layernorm.weight"] = whole("norm.weight")
    state["output_layer.weight"] = vocab_block(src, "output.weight", vocab_p, tp, r, dtype)
    return state


def write_megatron(src: Source, out: Path, tp: int, dtype: torch.dtype | None = None) -> None:
    """Write the legacy directory, one TP rank at a time (only one rank's tensors are held)."""
    dtype = dtype or src.dtype
    check_tp(src.spec, tp, f"--target-tp {tp}")
    args = make_args(src.spec, tp, dtype)
    for r in range(tp):
        state = rank_state(src, tp, r, dtype)
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


def load_rank(d: str | Path, rank: int) -> dict[str, torch.Tensor]:
    """The state_dict of mp_rank_{rank:02d} (mmap'd)."""
    return _load(Path(d), rank, mmap=True)["model"]


def expected_rank_shapes(spec: Spec, tp: int) -> dict[str, tuple[int, ...]]:
    s = spec.size
    vp = padded_vocab(spec.vocab, tp)
    qkv_rows = (s.n_heads + 2 * s.n_kv_heads) * s.head_dim // tp
    shapes = {"embedding.word_embeddings.weight": (vp // tp, s.dim),
              "decoder.final_layernorm.weight": (s.dim,), "output_layer.weight": (vp // tp, s.dim)}
    for i in range(s.n_layers):
        L = f"decoder.layers.{i}."
        shapes |= {L + "input_layernorm.weight": (s.dim,), L + "pre_mlp_layernorm.weight": (s.dim,),
                   L + "self_attention.linear_qkv.weight": (qkv_rows, s.dim),
                   L + "self_attention.linear_proj.weight": (s.dim, s.n_heads * s.head_dim // tp),
                   L + "mlp.linear_fc1.weight": (2 * s.ffn_dim // tp, s.dim),
                   L + "mlp.linear_fc2.weight": (s.dim, s.ffn_dim // tp)}
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
                              n_kv_heads=a.num_query_groups if a.group_query_attention else a.num_attention_heads,
                              ffn_dim=a.ffn_hidden_size, size_name=size_name)
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
        self.ranks = [ck0["model"]] + [_load(self.dir, r, mmap=True)["model"] for r in range(1, self.tp)]
        shapes = expected_rank_shapes(self.spec, self.tp)
        if shapes["embedding.word_embeddings.weight"][0] * self.tp != self.padded:
            raise UserError(f"{where}: padded_vocab_size {self.padded} is not the padding of vocab {vocab} at TP {self.tp}")
        for r, sd in enumerate(self.ranks):
            p = rank_dir(self.dir, it, r) / CKPT_NAME
            sd_keys = {k for k in sd if not k.endswith("._extra_state")}
            if missing := [k for k in shapes if k not in sd_keys]:
                raise UserError(f"{p}: missing key {missing[0]!r} ({len(missing)} missing)")
            if extra := sorted(sd_keys - set(shapes)):
                raise UserError(f"{p}: unexpected key {extra[0]!r}")
            for k, shape in shapes.items():
                if tuple(sd[k].shape) != shape:
                    raise UserError(f"{p}: {k} has shape {tuple(sd[k].shape)}, expected {shape} at TP {self.tp}")
        self.dtype = self.ranks[0]["embedding.word_embeddings.weight"].dtype
        tok = self.dir / (getattr(a, "tokenizer_model", None) or "tokenizer.model")
        self.tokenizer = tok if tok.is_file() else None
        self._qkv_cache: tuple[int, tuple] | None = None

    def _cat(self, key: str, dim: int) -> torch.Tensor:
        return torch.cat([sd[key] for sd in self.ranks], dim=dim)

    def get(self, key: str) -> torch.Tensor:
        parts = key.split(".")
        if key in ("tok_embeddings.weight", "output.weight"):
            return self._cat(DIRECT[key], 0)[: self.spec.vocab]
        if key == "norm.weight":
            return self.ranks[0][DIRECT[key]]
        i = int(parts[1])
        leaf = ".".join(parts[2:])
        L = f"decoder.layers.{i}."
        if leaf in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"):
            if self._qkv_cache is None or self._qkv_cache[0] != i:  # one layer's q, k, v kept
                blocks = [sd[L + "self_attention.linear_qkv.weight"] for sd in self.ranks]
                self._qkv_cache = (i, split_qkv(blocks, self.spec))
            return self._qkv_cache[1][["attention.wq.weight", "attention.wk.weight", "attention.wv.weight"].index(leaf)]
        if leaf in ("feed_forward.w1.weight", "feed_forward.w3.weight"):
            halves = [sd[L + "mlp.linear_fc1.weight"].chunk(2, dim=0) for sd in self.ranks]
            return torch.cat([h[0 if leaf == "feed_forward.w1.weight" else 1] for h in halves], dim=0)
        mkey = DIRECT["layers.{i}." + leaf].format(i=i)
        how = MEGATRON_KEYS["decoder.layers.{i}." + mkey.split(".", 3)[3]]
        if how is None:
            return self.ranks[0][mkey]
        return self._cat(mkey, 0 if how == "rows" else 1)
