"""A corpus of converter bugs: each writes a converted checkpoint (hf, or megatron at any TP) with one
realistic mistake, in one layer k where the mistake is per layer. `parity explain` must name exactly
that layer and the first boundary the mistake can affect (BUGS[kind].first); tests/test_explain_corpus.py
checks it for every kind and format. Not a user command: a developer's tool,

    python -m parity.trace.corpus KIND --load-dir CONVERTED --save-dir OUT [--layer K]

The bugs are made in the written files, in each format's own layout: a format is opened as a View of
its tensors under Meta's key names (found through the formats' own tables, hf.HF_KEYS and
megatron.MEGATRON_KEYS / locate), whole over TP ranks and in the format's row order (q / k rows in
rotate-half order, as the converter wrote them), and written back to the same places.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from parity.checkpoints.spec import permute, unpermute
from parity.errors import UserError
from parity.io import atomic_dir, load_torch, read_json, write_json

WRONG_THETA = 500000.0  # Llama-3's rope theta: a converter that defaults to it
# A converter reading eps from the wrong field. Llama-1's 1e-6 for Llama-2's 1e-5 moves a mini size's
# layer-0 attn_norm by only ~7e-4 (its activations' mean square is ~6e-3, far above eps): found in fp32,
# under bf16's noise. 1e-3 moves it by ~8% (7b-mini) and shows in both.
WRONG_EPS = 1e-3


class View:
    """A converted checkpoint's tensors under Meta's keys (format row order), plus its config values."""

    size = None  # parity.arch.Size
    tp = 1

    def get(self, key: str) -> torch.Tensor: ...
    def set(self, key: str, value: torch.Tensor) -> None: ...
    def set_config(self, what: str, value: float) -> None: ...  # what: "norm_eps" | "rope_theta"
    def save(self) -> None: ...


class HfView(View):
    def __init__(self, d: Path):
        from safetensors.torch import load_file

        from parity.checkpoints.hf import INDEX, HfSource

        self.dir, self.spec = d, HfSource(d).spec
        self.size = self.spec.size
        self.where = read_json(d / INDEX)["weight_map"]
        self.shards = {name: load_file(str(d / name)) for name in sorted(set(self.where.values()))}
        self.config = read_json(d / "config.json")

    def get(self, key):
        from parity.checkpoints.hf import hf_key

        return self.shards[self.where[hf_key(key)]][hf_key(key)].clone()

    def set(self, key, value):
        from parity.checkpoints.hf import hf_key

        self.shards[self.where[hf_key(key)]][hf_key(key)] = value.contiguous()

    def set_config(self, what, value):
        if what == "norm_eps":
            self.config["rms_norm_eps"] = value
        elif "rope_theta" in (self.config.get("rope_parameters") or {}):  # transformers 5
            self.config["rope_parameters"]["rope_theta"] = value
        else:
            self.config["rope_theta"] = value

    def save(self):
        from safetensors.torch import save_file

        for name, shard in self.shards.items():
            save_file(shard, str(self.dir / name), metadata={"format": "pt"})
        write_json(self.dir / "config.json", self.config)


class MegatronView(View):
    def __init__(self, d: Path):
        from parity.checkpoints import megatron as mg

        self.mg, self.dir = mg, d
        src = mg.MegatronSource(d)
        self.spec, self.tp, self.padded = src.spec, src.tp, src.padded
        self.size = self.spec.size
        del src
        it = mg.iteration_dir(d)
        self.paths = [mg.rank_dir(d, it, r) / mg.CKPT_NAME for r in range(self.tp)]
        self.ranks = [load_torch(p) for p in self.paths]

    def _rank_part(self, sd: dict, mkey: str, lay, part: int) -> torch.Tensor:
        """A view of the rows of Meta tensor number `part` (of lay.meta) in one rank's tensor."""
        t = sd["model"][mkey]
        if lay.kind == "qkv":  # [groups of this rank, (q of the group's heads, k, v), dim]
            s = self.size
            rows = [s.n_heads // s.n_kv_heads * s.head_dim, s.head_dim, s.head_dim]
            return t.view(s.n_kv_heads // self.tp, -1, t.shape[-1]).split(rows, dim=1)[part]
        if lay.kind == "fc1":  # this rank's gate rows, then its up rows
            return t.chunk(len(lay.meta), dim=0)[part]
        return t

    def get(self, key):
        mkey, lay, part = self.mg.locate(key)
        blocks = [self._rank_part(sd, mkey, lay, part) for sd in self.ranks]
        if lay.split is None:
            return blocks[0].clone()
        if lay.kind == "qkv":
            return torch.cat([b.reshape(-1, b.shape[-1]) for b in blocks], dim=0)
        full = torch.cat(blocks, dim=self.mg.TP_DIM[lay.split])
        return full[: self.spec.vocab].clone() if lay.kind == "vocab" else full

    def set(self, key, value):
        mkey, lay, part = self.mg.locate(key)
        if lay.split is None:
            for sd in self.ranks:
                sd["model"][mkey].copy_(value)
            return
        if lay.kind == "vocab":  # zero rows up to the padded vocab
            padded = torch.zeros((self.padded, value.shape[1]), dtype=value.dtype)
            padded[: value.shape[0]] = value
            value = padded
        pieces = value.chunk(self.tp, dim=self.mg.TP_DIM[lay.split])
        for sd, piece in zip(self.ranks, pieces):
            target = self._rank_part(sd, mkey, lay, part)
            target.copy_(piece.reshape(target.shape))

    def set_config(self, what, value):
        field = {"norm_eps": "norm_epsilon", "rope_theta": "rotary_base"}[what]
        for sd in self.ranks:
            setattr(sd["args"], field, int(value) if field == "rotary_base" else value)

    def save(self):
        for p, sd in zip(self.paths, self.ranks):
            torch.save(sd, p)


VIEWS: dict[str, Callable[[Path], View]] = {"hf": HfView, "megatron": MegatronView}


# ---------------------------------------------------------------------------------------------- the bugs
def _q(k):
    return f"layers.{k}.attention.wq.weight"


def _k(k):
    return f"layers.{k}.attention.wk.weight"


def _swap(v: View, a: str, b: str) -> None:
    x, y = v.get(a), v.get(b)
    v.set(a, y)
    v.set(b, x)


def _shards_reversed(v: View, key: str) -> None:
    """A row-parallel weight (split on its input columns) rebuilt from its TP shards in reverse order: the
    shards of this checkpoint's TP (2 when it has one rank, as when merging two)."""
    w = v.get(key)
    v.set(key, torch.cat(list(reversed(w.chunk(max(2, v.tp), dim=1))), dim=1))


def _no_rotate_half(v: View, k: int) -> None:
    s = v.size
    v.set(_q(k), unpermute(v.get(_q(k)), s.n_heads))
    v.set(_k(k), unpermute(v.get(_k(k)), s.n_kv_heads))


def _k_wrong_heads(v: View, k: int) -> None:
    s = v.size
    rows = s.n_kv_heads * s.head_dim
    # the query head count, as in the classic GQA slip; a mini size's 8-wide heads leave k too few rows
    # for it (the converter would crash, not corrupt), so there the wrong count is half the kv heads
    wrong = s.n_heads if rows % (2 * s.n_heads) == 0 else s.n_kv_heads // 2
    v.set(_k(k), permute(unpermute(v.get(_k(k)), s.n_kv_heads), wrong))


def _kv_groups_reversed(v: View, k: int) -> None:
    s = v.size
    for key in (_k(k), f"layers.{k}.attention.wv.weight"):
        w = v.get(key)
        v.set(key, w.view(s.n_kv_heads, s.head_dim, -1).flip(0).reshape(w.shape))


@dataclass(frozen=True)
class Bug:
    what: str
    apply: Callable[[View, int], None]  # (view, layer k)
    first: str  # the first boundary it can affect ({k} = its layer)
    formats: tuple[str, ...] = ("hf", "megatron")
    gqa_only: bool = False  # a no-op without grouped-query attention


BUGS: dict[str, Bug] = {
    "rotary_missing": Bug("q / k rows not permuted to rotate-half (Meta's interleaved rotary order kept)",
                          _no_rotate_half, "layers.{k}.q"),
    "k_heads": Bug("k permuted to rotate-half with the wrong head count (GQA: the query head count, or on a "
                   "mini size half the kv head count)", _k_wrong_heads, "layers.{k}.k", gqa_only=True),
    "gate_up": Bug("gate and up (w1 / w3) swapped",
                   lambda v, k: _swap(v, f"layers.{k}.feed_forward.w1.weight", f"layers.{k}.feed_forward.w3.weight"),
                   "layers.{k}.mlp_act"),
    "norms": Bug("attention_norm and ffn_norm swapped",
                 lambda v, k: _swap(v, f"layers.{k}.attention_norm.weight", f"layers.{k}.ffn_norm.weight"),
                 "layers.{k}.attn_norm"),
    "kv_groups": Bug("kv groups of the grouped QKV in reverse order (k, v of group g taken from another group)",
                     _kv_groups_reversed, "layers.{k}.k", formats=("megatron",), gqa_only=True),
    "o_shards": Bug("o_proj / linear_proj (row parallel) from its TP shards concatenated in the wrong order",
                    lambda v, k: _shards_reversed(v, f"layers.{k}.attention.wo.weight"), "layers.{k}.attn_out"),
    "down_shards": Bug("down / linear_fc2 (row parallel) from its TP shards concatenated in the wrong order",
                       lambda v, k: _shards_reversed(v, f"layers.{k}.feed_forward.w2.weight"), "layers.{k}.mlp_out"),
    "final_norm": Bug("final norm taken from the last layer's ffn_norm",
                      lambda v, k: v.set("norm.weight", v.get(f"layers.{v.size.n_layers - 1}.ffn_norm.weight")),
                      "norm"),
    "lm_head": Bug("lm_head / output layer taken from the token embedding",
                   lambda v, k: v.set("output.weight", v.get("tok_embeddings.weight")), "logits"),
    "eps": Bug(f"RMSNorm eps written as {WRONG_EPS:g} instead of 1e-5",
               lambda v, k: v.set_config("norm_eps", WRONG_EPS), "layers.0.attn_norm"),
    "rope_theta": Bug(f"rope theta written as {WRONG_THETA:g} (Llama-3's) instead of 10000",
                      lambda v, k: v.set_config("rope_theta", WRONG_THETA), "layers.0.q"),
}


def applies(kind: str, fmt: str, size) -> bool:
    bug = BUGS[kind]
    return fmt in bug.formats and (not bug.gqa_only or size.n_kv_heads != size.n_heads)


def expected(kind: str, layer: int) -> str:
    """The boundary `parity explain` must name for this bug in `layer`."""
    return BUGS[kind].first.format(k=layer)


def make_buggy(kind: str, converted: str | Path, out: str | Path, layer: int = 1, overwrite: bool = False) -> Path:
    """Copy a converted checkpoint (hf or megatron) to `out` with bug `kind` in `layer`."""
    from parity.checkpoints import detect_format

    if kind not in BUGS:
        raise UserError(f"unknown bug {kind!r}; known: {', '.join(BUGS)}")
    converted, out = Path(converted), Path(out)
    fmt = detect_format(converted)
    if fmt not in VIEWS:
        raise UserError(f"{converted}: a {fmt} checkpoint; the corpus writes bugs into hf and megatron ones")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        shutil.copytree(converted, tmp, dirs_exist_ok=True)
        view = VIEWS[fmt](tmp)
        if not applies(kind, fmt, view.size):
            raise UserError(f"bug {kind} does not apply to a {fmt} checkpoint of {view.size.name}")
        if not 0 <= layer < view.size.n_layers:
            raise UserError(f"--layer {layer}: {view.size.name} has layers 0..{view.size.n_layers - 1}")
        BUGS[kind].apply(view, layer)
        view.save()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.trace.corpus", description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=list(BUGS))
    ap.add_argument("--load-dir", required=True, help="a converted hf or megatron checkpoint")
    ap.add_argument("--save-dir", required=True)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = make_buggy(args.kind, args.load_dir, args.save_dir, args.layer, args.overwrite)
    except UserError as e:
        print(f"corpus: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {BUGS[args.kind].what}; explain should name {expected(args.kind, args.layer)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
