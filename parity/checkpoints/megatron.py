"""Megatron-LM checkpoints for megatron-core's GPTModel (local or Transformer Engine layer spec): the
layout table, and the legacy directory (Megatron-LM's --ckpt-format torch), tensor- and pipeline-parallel.

    latest_checkpointed_iteration.txt      "release" (or an iteration number -> iter_NNNNNNN/)
    tokenizer.model                        args.tokenizer_model names it, relative to the top
    release/mp_rank_TT/model_optim_rng.pt  {"model": state_dict, "args": Namespace,
                                            "checkpoint_version": 3.0, "iteration": 0}
    release/mp_rank_TT_PPP/...             the same per pipeline stage when PP > 1

MEGATRON_KEYS is the one table of the layout: each Megatron tensor, how it is split across TP ranks,
how its rows are laid out, the Meta tensors it is built from, and its Transformer Engine name. The
writer (rank_state), the shape check (expected_rank_shapes), the reader (MegatronSource.get), the
backend (load_rank) and the torch_dist format (checkpoints/torch_dist.py) go through it; pipeline
stages are slices of its rows (megatron_keys). Its keys are the local spec's names; a row whose name
differs under the Transformer Engine spec carries that name too (the two layer norms, fused into the
following linear layer by TE), so legacy checkpoints saved by TE-trained models read (canonical), and
--megatron-spec te writes (named_for), under TE's names. docs/architecture.md, "Checkpoint layouts".
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import NamedTuple

import torch

from parity.arch import LLAMA2_NORM_EPS, LLAMA2_ROPE_THETA, LLAMA31_SCALING, RopeScaling
from parity.checkpoints import MEGATRON_FORMATS, MEGATRON_SPECS
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
    te: str | None = None  # its name in Transformer Engine's layer spec, where that differs


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
# te: Transformer Engine fuses each pre-norm into the linear layer after it, so the two norms have other
# names there; megatron-core's sharded_state_dict (torch_dist) uses these names for the local spec too.
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


def megatron_keys(n_layers: int, stages: list[tuple[int, int]] | None = None,
                  p: int = 0) -> list[tuple[str, Layout, int | None]]:
    """(Megatron key, Layout, layer or None) in state_dict order: the table's rows before its layer rows,
    each layer's rows, the rows after. With pipeline `stages` ([(first layer, count)] per stage, from
    stage_layers), what stage p's file holds: the rows before only on the first stage, its layers
    numbered from 0 in the keys (the layer returned is the global one), the rows after only on the last."""
    rows = list(MEGATRON_KEYS.items())
    layer = [n for n, (k, _) in enumerate(rows) if "{i}" in k]
    first, last = layer[0], layer[-1] + 1
    stages = stages or [(0, n_layers)]
    offset, count = stages[p]
    return ([(k, lay, None) for k, lay in rows[:first] if p == 0]
            + [(k.format(i=j), lay, offset + j) for j in range(count) for k, lay in rows[first:last]]
            + [(k, lay, None) for k, lay in rows[last:] if p == len(stages) - 1])


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


def stage_layers(n_layers: int, pp: int, first: int | None = None, last: int | None = None,
                 embedding: bool = False, loss: bool = False) -> list[tuple[int, int]]:
    """[(first layer, number of layers)] of each pipeline stage, as megatron-core splits them
    (get_num_layers_to_build / get_transformer_layer_offset; Megatron-LM's --decoder-first/last-
    pipeline-num-layers and --account-for-embedding/loss-in-pipeline-split). ValueError if it cannot."""
    if pp < 1:
        raise ValueError(f"pipeline size {pp} must be at least 1")
    if first is not None or last is not None:
        if embedding or loss:
            raise ValueError("uneven first/last stages cannot be combined with embedding/loss accounting")
        middle = n_layers - (first or 0) - (last or 0)
        n_mid = pp - (first is not None) - (last is not None)
        if middle < 0 or n_mid < 0 or (n_mid and middle % n_mid) or (not n_mid and middle):
            raise ValueError(f"{n_layers} layers cannot be split into {pp} stages with first {first}, last {last}")
        counts = [middle // n_mid if n_mid else 0] * pp
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
    else:
        n = n_layers + embedding + loss  # the embedding / loss count as a layer in the split
        if n % pp:
            raise ValueError(f"{n_layers} layers{' (+1 for the embedding)' if embedding else ''}"
                             f"{' (+1 for the loss)' if loss else ''} do not split evenly into {pp} stages")
        counts = [n // pp] * pp
        counts[0] -= embedding
        counts[-1] -= loss
    return [(sum(counts[:q]), counts[q]) for q in range(pp)]


def padded_vocab(vocab: int, tp: int, divisible_by: int = MAKE_VOCAB_DIVISIBLE_BY) -> int:
    m = divisible_by * tp
    return -(-vocab // m) * m


def rank_dir(d: Path, it: str, rank: int, stage: int = 0, pp: int = 1) -> Path:
    """mp_rank_TT, or mp_rank_TT_PPP whenever the checkpoint is pipeline parallel (Megatron-LM's names)."""
    return d / it / (f"mp_rank_{rank:02d}" + (f"_{stage:03d}" if pp > 1 else ""))


def make_args(spec: Spec, tp: int, dtype: torch.dtype, pp: int = 1, layer_spec: str = "local") -> argparse.Namespace:
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
        rotary_base=int(s.rope_theta), rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=s.rope_scaling is not None,  # Megatron-LM --use-rope-scaling / --rope-scaling-factor
        rope_scaling_factor=s.rope_scaling.factor if s.rope_scaling else LLAMA31_SCALING.factor,
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        attention_dropout=0.0, hidden_dropout=0.0, apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True, apply_residual_connection_post_layernorm=False,
        vocab_size=spec.vocab, padded_vocab_size=padded_vocab(spec.vocab, tp),
        make_vocab_size_divisible_by=MAKE_VOCAB_DIVISIBLE_BY,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
        expert_model_parallel_size=1, data_parallel_size=1, world_size=tp * pp, sequence_parallel=False,
        rotary_seq_len_interpolation_factor=None,
        num_experts=None, transformer_impl="transformer_engine" if layer_spec == "te" else "local",
        use_mcore_models=True, use_legacy_models=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tokenizer_type=s.fam.megatron_tokenizer_type, tokenizer_model=TOKENIZER_MODEL[s.fam.megatron_tokenizer_type],
        init_method_std=0.02, ckpt_format="torch", iteration=0,
        consumed_train_samples=0, consumed_valid_samples=0,
    )


# --tokenizer-model per --tokenizer-type, relative to the checkpoint's top: Llama 2's sentencepiece file;
# for Llama 3 Megatron-LM's docs use HuggingFaceTokenizer on an HF tokenizer directory (megatron-core has no
# reader of Meta's tiktoken file), written beside Meta's tokenizer.model by write_tokenizer
TOKENIZER_MODEL = {"Llama2Tokenizer": "tokenizer.model", "HuggingFaceTokenizer": "tokenizer"}


def write_tokenizer(tok: Path, out: Path, spec: Spec) -> None:
    """tokenizer.model at the top (every format has it there) and, when the args name a directory, the HF
    tokenizer files in it."""
    import shutil

    shutil.copyfile(tok, out / "tokenizer.model")
    name = TOKENIZER_MODEL[spec.size.fam.megatron_tokenizer_type]
    if name != "tokenizer.model":
        from parity.checkpoints.hf_tokenizer import write_tokenizer_files

        (out / name).mkdir(exist_ok=True)
        write_tokenizer_files(tok, out / name, spec.size.max_seq_len)


def rope_of(args: argparse.Namespace, where: Path) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) of saved args. megatron-core applies Llama 3.1's scaling with its own defaults
    for the other three numbers; only factor 8 is what Meta's reference computes."""
    theta = float(getattr(args, "rotary_base", None) or LLAMA2_ROPE_THETA)
    if not getattr(args, "use_rope_scaling", False):
        return theta, None
    factor = float(getattr(args, "rope_scaling_factor", None) or LLAMA31_SCALING.factor)
    if factor != LLAMA31_SCALING.factor:
        raise UserError(f"{where}: rope_scaling_factor {factor:g} cannot be represented by Meta's reference "
                        f"(llama_models hard-codes Llama 3.1's factor {LLAMA31_SCALING.factor:g}); parity compares "
                        f"only that one")
    return theta, LLAMA31_SCALING


def check_tp(spec: Spec, tp: int, where: str) -> None:
    s = spec.size
    if not s.valid_tp(tp):
        raise UserError(f"{where}: TP {tp} does not divide the {s.n_heads} heads, {s.n_kv_heads} kv groups "
                        f"and ffn width {s.ffn_dim} of {s.name}; pick a TP dividing all three")


def kv_groups(args: argparse.Namespace) -> int:
    """Megatron-LM's GQA rule: num_query_groups counts only with group_query_attention; else a group per head."""
    return args.num_query_groups if getattr(args, "group_query_attention", False) else args.num_attention_heads


def norm_eps(args: argparse.Namespace) -> float:
    """RMSNorm epsilon: --norm-epsilon up to Megatron-LM 0.15; later args carry TransformerConfig's name."""
    for name in ("norm_epsilon", "layernorm_epsilon"):
        if getattr(args, name, None) is not None:
            return float(getattr(args, name))
    return LLAMA2_NORM_EPS


def find_tokenizer(d: Path, args: argparse.Namespace) -> Path | None:
    """args.tokenizer_model (relative to the checkpoint, or the absolute path training used) if it
    exists here, else tokenizer.model at the top of the checkpoint."""
    for name in (getattr(args, "tokenizer_model", None), "tokenizer.model"):
        if name and (d / name).is_file():
            return d / name
    return None


def true_vocab(args: argparse.Namespace, tokenizer: Path | None, where: Path) -> int:
    """The tokenizer's vocabulary: args.vocab_size, which Megatron-LM leaves None unless --vocab-size was
    given (it takes the vocabulary from the tokenizer, as parity then does)."""
    if getattr(args, "vocab_size", None) is not None:
        return int(args.vocab_size)
    if tokenizer is None:
        raise UserError(f"{where}: args.vocab_size is not set and the checkpoint has no tokenizer.model; put "
                        f"the tokenizer.model it was trained with beside {TRACKER}")
    from parity.tokenizer import vocab_size

    return vocab_size(tokenizer)


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


def rank_state(src: Source, tp: int, r: int, dtype: torch.dtype, stages: list[tuple[int, int]] | None = None,
               p: int = 0) -> dict[str, torch.Tensor]:
    """Rank r's state_dict (of pipeline stage p), read key by key: only this rank's block of each tensor is read."""
    return {k: rank_tensor(src, lay, i, tp, r, dtype) for k, lay, i in megatron_keys(src.spec.size.n_layers, stages, p)}


def write_megatron(src: Source, out: Path, tp: int, dtype: torch.dtype | None = None, pp: int = 1,
                   layer_spec: str = "local") -> None:
    """Write the legacy directory, one (TP rank, PP stage) at a time (only its tensors are held), under the
    names of `layer_spec`'s GPTModel; layers split over the stages as Megatron-LM splits them by default
    (evenly)."""
    dtype = dtype or src.dtype
    check_tp(src.spec, tp, f"--target-tp {tp}")
    try:
        stages = stage_layers(src.spec.size.n_layers, pp)
    except ValueError as e:
        raise UserError(f"--target-pp {pp}: {e} (size {src.spec.size.name})") from None
    args = make_args(src.spec, tp, dtype, pp, layer_spec)
    for r in range(tp):
        for p in range(pp):
            state = named_for(rank_state(src, tp, r, dtype, stages, p), layer_spec)
            d = rank_dir(out, "release", r, p, pp)
            d.mkdir(parents=True)
            with atomic_file(d / CKPT_NAME, "wb") as f:
                torch.save({"model": state, "args": args, "checkpoint_version": 3.0, "iteration": 0}, f)
            # freed here by reference counting: no cycle holds a tensor (gc.collect() found none; with and
            # without it the 1b-synthetic TP 2 conversion peaks at the same 1158 / 1332 MiB RssAnon, bench/
            # convert_memory.py), and a full collection costs 0.3 s per file in a process with a large heap
            del state
    if src.tokenizer is not None:
        write_tokenizer(src.tokenizer, out, src.spec)
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


def megatron_format(d: str | Path) -> str:
    """Which of Megatron-LM's on-disk formats (MEGATRON_FORMATS) the iteration directory holds."""
    base = Path(d) / iteration_dir(d)
    if not base.is_dir():
        raise UserError(f"{base}: not found; {Path(d) / TRACKER} names it")
    found = [name for name, marker in MEGATRON_FORMATS.items() if any(base.glob(marker))]
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(f"{base}: holds both {' and '.join(found)} files; keep one format per directory")
    if (base / ".metadata").is_file():
        raise UserError(f"{base}: a plain PyTorch distributed checkpoint (.metadata without metadata.json, "
                        f"Megatron-LM's --ckpt-format torch_dcp) is not supported; save with torch_dist or torch")
    raise UserError(f"{base}: neither metadata.json (torch_dist) nor mp_rank_* directories (legacy) found")


def _load_file(p: Path, mmap: bool) -> dict:
    ck = load_torch(p, mmap=mmap)
    if not isinstance(ck, dict) or "model" not in ck or "args" not in ck:
        raise UserError(f"{p}: not a Megatron checkpoint (needs 'model' and 'args')")
    return ck


def stages_of(args: argparse.Namespace, where: Path) -> list[tuple[int, int]]:
    """The pipeline stages a checkpoint's args describe (one stage without pipeline parallelism)."""
    if getattr(args, "virtual_pipeline_model_parallel_size", None) or \
            getattr(args, "num_layers_per_virtual_pipeline_stage", None):
        raise UserError(f"{where}: virtual pipeline stages (interleaved schedule, model0/model1 ...) are not "
                        f"supported; convert with Megatron-LM to a checkpoint without them")
    if getattr(args, "pipeline_model_parallel_layout", None):
        raise UserError(f"{where}: a custom pipeline_model_parallel_layout is not supported")
    try:
        return stage_layers(
            int(args.num_layers), int(getattr(args, "pipeline_model_parallel_size", 1) or 1),
            first=getattr(args, "decoder_first_pipeline_num_layers", None),
            last=getattr(args, "decoder_last_pipeline_num_layers", None),
            embedding=bool(getattr(args, "account_for_embedding_in_pipeline_split", False)),
            loss=bool(getattr(args, "account_for_loss_in_pipeline_split", False)))
    except ValueError as e:
        raise UserError(f"{where}: args describe no valid pipeline split ({e})") from None


class LegacyFiles:
    """Where the files of a legacy checkpoint are: one per (TP rank, pipeline stage), and which layers
    each stage holds (stages_of: from the args, as megatron-core splits them)."""

    def __init__(self, d: str | Path):
        self.dir = Path(d)
        self.it = iteration_dir(self.dir)
        base = self.dir / self.it
        pp_names = not (base / "mp_rank_00").is_dir() and (base / "mp_rank_00_000").is_dir()
        first = base / ("mp_rank_00_000" if pp_names else "mp_rank_00") / CKPT_NAME
        self.ck0 = _load_file(first, mmap=True)
        a = self.args = self.ck0["args"]
        try:
            self.tp = int(a.tensor_model_parallel_size)
            self.pp = int(getattr(a, "pipeline_model_parallel_size", 1) or 1)
        except (AttributeError, TypeError, ValueError) as e:
            raise UserError(f"{first}: args lack a valid tensor_model_parallel_size ({e})") from None
        if (self.pp > 1) != pp_names:
            raise UserError(f"{first}: args say pipeline_model_parallel_size {self.pp} but the directories are "
                            f"named {'mp_rank_TT_PPP' if pp_names else 'mp_rank_TT'}")
        self.stages = stages_of(a, first)
        want = {self.file(r, p).parent.name for r in range(self.tp) for p in range(self.pp)}
        have = {q.name for q in base.glob("mp_rank_*")}
        if missing := sorted(want - have):
            raise UserError(f"{base / missing[0]}: missing ({len(missing)} of the {len(want)} mp_rank_* directories "
                            f"for TP {self.tp} x PP {self.pp} missing)")
        if extra := sorted(have - want):
            raise UserError(f"{base / extra[0]}: unexpected; args say TP {self.tp} x PP {self.pp}")

    def file(self, r: int, p: int = 0) -> Path:
        return rank_dir(self.dir, self.it, r, p, self.pp) / CKPT_NAME

    def load_rank(self, r: int, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
        """TP rank r's state_dict (mmap'd, without _extra_state, under MEGATRON_KEYS' names whichever layer
        spec saved it), its pipeline stages merged under global layer numbers; with `shapes` (by global key) each stage file's keys and shapes are checked."""
        n_layers = int(self.args.num_layers)
        out = {}
        for p in range(self.pp):
            f = self.file(r, p)
            sd = canonical(without_extra_state((self.ck0 if (r, p) == (0, 0) else _load_file(f, mmap=True))["model"]))
            keys = {k: (lay, i) for k, lay, i in megatron_keys(n_layers, self.stages, p)}
            if shapes is not None:
                if missing := [k for k in keys if k not in sd]:
                    raise UserError(f"{f}: missing key {missing[0]!r} ({len(missing)} missing)")
                if extra := sorted(set(sd) - set(keys)):
                    raise UserError(f"{f}: unexpected key {extra[0]!r}")
            for k, t in sd.items():
                lay, i = keys.get(k, (None, None))
                glob = k if lay is None or i is None else k.replace(f"layers.{i - self.stages[p][0]}.", f"layers.{i}.", 1)
                if shapes is not None and tuple(t.shape) != shapes[glob]:
                    raise UserError(f"{f}: {k} has shape {tuple(t.shape)}, expected {shapes[glob]} at TP {self.tp}")
                out[glob] = t
        return out


def read_args(d: str | Path) -> argparse.Namespace:
    """The saved Megatron-LM args of a checkpoint in either format."""
    if megatron_format(d) == "torch_dist":
        from parity.checkpoints.torch_dist import read_common

        return read_common(Path(d))[1]["args"]
    return LegacyFiles(d).args


def tp_size(d: str | Path) -> int | None:
    """The TP a checkpoint must run at: a legacy checkpoint's shard count; None for torch_dist, which
    loads at any TP that divides heads, kv groups and ffn width."""
    return None if megatron_format(d) == "torch_dist" else LegacyFiles(d).tp


def without_extra_state(sd: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.endswith(EXTRA_STATE)}


def load_rank(d: str | Path, rank: int) -> dict[str, torch.Tensor]:
    """TP rank `rank`'s state_dict (mmap'd, pipeline stages merged), without its _extra_state entries."""
    return LegacyFiles(d).load_rank(rank)


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
    """Reads every rank mmap'd (pipeline stages merged); a Meta key is assembled from the ranks when asked for."""

    def __init__(self, d: str | Path, size_name: str | None = None):
        files = LegacyFiles(d)
        self.dir, a, where = files.dir, files.args, files.file(0, 0)
        try:
            size = match_size(where, dim=a.hidden_size, n_layers=a.num_layers, n_heads=a.num_attention_heads,
                              n_kv_heads=kv_groups(a), ffn_dim=a.ffn_hidden_size, size_name=size_name,
                              rope=rope_of(a, where))
            self.tp, self.padded = files.tp, int(a.padded_vocab_size)
        except AttributeError as e:
            raise UserError(f"{where}: args lack {e.name or e}; not written by Megatron-LM or parity") from None
        self.tokenizer = find_tokenizer(self.dir, a)
        vocab = true_vocab(a, self.tokenizer, where)
        self.spec = Spec(size, vocab)
        check_tp(self.spec, self.tp, str(where))
        shapes = expected_rank_shapes(self.spec, self.tp)
        if shapes["embedding.word_embeddings.weight"][0] * self.tp != self.padded:
            raise UserError(f"{where}: padded_vocab_size {self.padded} is not the padding of vocab {vocab} at TP {self.tp}")
        self.ranks = [files.load_rank(r, shapes) for r in range(self.tp)]
        self.dtype = self.ranks[0]["embedding.word_embeddings.weight"].dtype
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
