"""megatron-core's distributed checkpoint (Megatron-LM's default --ckpt-format torch_dist), read and
written in one process, without megatron-core and without a process group.

    latest_checkpointed_iteration.txt     "release" or an iteration number (as in the legacy format)
    tokenizer.model
    release/metadata.json                  {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                            "common_backend": "torch", "common_backend_version": 1}
    release/common.pt                      {"args": Namespace, "checkpoint_version": 3.0, "iteration": 0, ...}
    release/.metadata, __G_T.distcp        the tensors, a PyTorch distributed checkpoint (checkpoints/dcp.py)

The tensors are MEGATRON_KEYS' rows under the names GPTModel.sharded_state_dict() gives them
(`sharded_key`), each whole: the row's layout at TP 1 (megatron-core saves global tensors, which is why
one checkpoint loads at any TP). Per-layer rows are stacked on a leading axis [n_layers, ...] indexed by
the global layer number (which is why pipeline stages need nothing either). Each linear layer also has
an empty `_extra_state` object per layer, which megatron-core's loader requires. The embedding and
output rows are the vocabulary padded for the writer's TP; a reader takes the first `vocab` rows.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from parity.checkpoints import dcp
from parity.checkpoints.megatron import (BY_META, MEGATRON_KEYS, TP_DIM, TRACKER, Layout, find_tokenizer,
                                         iteration_dir, kv_groups, make_args, megatron_keys, padded_vocab,
                                         rank_tensor, split_qkv, true_vocab)
from parity.checkpoints.spec import Source, Spec, match_size, split_layer
from parity.errors import UserError
from parity.io import atomic_file, load_torch, read_json, write_json

CONFIG_FILE = "metadata.json"
COMMON_FILE = "common.pt"
# metadata.json: megatron-core's CheckpointingConfig. Only this backend pair and version exist in
# megatron-core 0.16 (its loader fails on any other).
CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
          "common_backend": "torch", "common_backend_version": 1}
# What Megatron-LM saves in common.pt as content_metadata: with singleton_local_shards the layers would
# be saved one tensor each (decoder.layers.{i}...), which Megatron-LM 0.16 never does.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
# Tensors of a training checkpoint parity does not read (the optimizer's state: Adam moments etc.)
IGNORED_PREFIXES = ("optimizer.",)


def sharded_key(key: str) -> str:
    """A MEGATRON_KEYS row's name in torch_dist: its TE name where it has one (megatron-core's local spec
    saves its norms under TE's names), without the layer number (layers are stacked on axis 0)."""
    return (MEGATRON_KEYS[key].te or key).replace("{i}.", "")


def is_layer_row(key: str) -> bool:
    return "{i}" in key


def extra_state_keys(n_layers: int, layers: range | None = None) -> list[str]:
    """The empty `_extra_state` objects megatron-core saves (and its loader requires): one per linear
    layer (a row split across TP) per layer, named as ShardedObjects are: key/shard_{layer}_{n_layers}."""
    modules = [sharded_key(k).rsplit(".", 1)[0] for k, lay in MEGATRON_KEYS.items()
               if is_layer_row(k) and lay.split is not None]
    return [f"{m}._extra_state/shard_{i}_{n_layers}" for i in (layers or range(n_layers)) for m in modules]


def expected_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """Each tensor's global shape; for the vocab rows, the unpadded vocab (any padding is accepted)."""
    shapes = {}
    for k, lay in MEGATRON_KEYS.items():
        parts = [spec.shape(m.format(i=0)) for m in lay.meta]
        shape = (sum(p[0] for p in parts), *parts[0][1:])
        shapes[sharded_key(k)] = (spec.size.n_layers, *shape) if is_layer_row(k) else shape
    return shapes


def check_config(p: Path) -> None:
    cfg = read_json(p, "metadata.json (megatron-core's checkpoint config)")
    if not isinstance(cfg, dict) or set(cfg) != set(CONFIG):
        raise UserError(f"{p}: not megatron-core's checkpoint config (expected exactly the keys {', '.join(CONFIG)})")
    for kind in ("sharded", "common"):
        backend, version = cfg[f"{kind}_backend"], cfg[f"{kind}_backend_version"]
        if backend != CONFIG[f"{kind}_backend"]:
            raise UserError(f"{p}: unknown {kind} backend {str(backend)[:40]!r}; parity reads megatron-core's "
                            f"{CONFIG[f'{kind}_backend']!r} (Megatron-LM --ckpt-format torch_dist)")
        if version != CONFIG[f"{kind}_backend_version"]:
            newer = isinstance(version, int) and version > CONFIG[f"{kind}_backend_version"]
            raise UserError(f"{p}: {backend} format version {str(version)[:20]} is "
                            f"{'newer than' if newer else 'not'} the version {CONFIG[f'{kind}_backend_version']} "
                            f"parity reads (megatron-core 0.16)")


def read_common(d: Path) -> tuple[Path, dict]:
    """(path, content) of the iteration directory's common.pt, after its metadata.json is checked."""
    base = d / iteration_dir(d)
    check_config(base / CONFIG_FILE)
    p = base / COMMON_FILE
    ck = load_torch(p)
    if not isinstance(ck, dict) or not isinstance(ck.get("args"), argparse.Namespace):
        raise UserError(f"{p}: not megatron-core's common state (needs the Megatron-LM 'args')")
    if (ck.get("content_metadata") or {}).get("singleton_local_shards"):
        raise UserError(f"{p}: saved with singleton_local_shards (one tensor per layer), which Megatron-LM does "
                        f"not write; re-save with Megatron-LM's defaults")
    return p, ck


class TorchDistSource(Source):
    """Opens and checks the whole directory without reading a tensor (metadata.json, common.pt, every
    shard's size against .metadata, each tensor's shape against the args); `get` / `block` then read
    only the chunks that hold the wanted rows."""

    def __init__(self, d: str | Path, size_name: str | None = None):
        self.dir = Path(d)
        where, common = read_common(self.dir)
        a = self.args = common["args"]
        try:
            size = match_size(where, dim=a.hidden_size, n_layers=a.num_layers, n_heads=a.num_attention_heads,
                              n_kv_heads=kv_groups(a), ffn_dim=a.ffn_hidden_size, size_name=size_name)
        except AttributeError as e:
            raise UserError(f"{where}: args lack {e.name or e}; not written by Megatron-LM or parity") from None
        self.tokenizer = find_tokenizer(self.dir, a)
        self.spec = Spec(size, true_vocab(a, self.tokenizer, where))
        self.base = where.parent
        md = dcp.read_metadata(self.base / dcp.METADATA)
        dcp.check_storage(self.base, md)
        self.dtype = self._check_tensors(md)
        self.reader = dcp.Reader(self.base, md)
        self._qkv_cache: tuple[str, tuple] | None = None

    def _check_tensors(self, md: Metadata) -> torch.dtype:
        where = self.base / dcp.METADATA
        shapes = expected_shapes(self.spec)
        sd = md.state_dict_metadata
        for key, want in shapes.items():
            tmd = sd.get(key)
            if not isinstance(tmd, TensorStorageMetadata):
                raise UserError(f"{where}: no tensor {key!r}; not a Llama-2 GPTModel checkpoint (or singleton "
                                f"local shards, a layer per tensor, which parity does not read)")
            have = tuple(tmd.size)
            vocab_rows = key in (sharded_key(k) for k, lay in MEGATRON_KEYS.items() if lay.kind == "vocab")
            if have != want and not (vocab_rows and have[1:] == want[1:] and have[0] >= want[0]):
                raise UserError(f"{where}: {key} has shape {have}, the args in {COMMON_FILE} describe {want} "
                                f"(vocab {self.spec.vocab}); the .metadata does not match this model")
        unexpected = [k for k, v in sd.items() if isinstance(v, TensorStorageMetadata) and k not in shapes
                      and not k.startswith(IGNORED_PREFIXES)]
        if unexpected:
            raise UserError(f"{where}: unexpected tensor {unexpected[0]!r}; parity reads Llama-2 GPTModels "
                            f"(no biases, untied output layer, no MoE)")
        dtypes = {sd[k].properties.dtype for k in shapes}
        if len(dtypes) != 1:
            raise UserError(f"{where}: tensors of mixed dtypes {sorted(map(str, dtypes))}")
        return dtypes.pop()

    def missing_extra_state(self) -> list[str]:
        """The _extra_state objects megatron-core's loader requires that the checkpoint lacks."""
        sd = self.reader.md.state_dict_metadata
        return [k for k in extra_state_keys(self.spec.size.n_layers) if not isinstance(sd.get(k), BytesStorageMetadata)]

    def block(self, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
        template, i = split_layer(key)
        row = BY_META[template]
        lay = MEGATRON_KEYS[row]
        if lay.kind == "qkv":  # rows interleave q, k, v per group: read the layer's qkv once, split it
            return self.get(key).narrow(dim, start, stop - start)
        shape = self.spec.shape(key)
        offsets, sizes = [0] * len(shape), list(shape)
        offsets[0] = lay.meta.index(template) * shape[0]  # fc1: the up (w3) rows follow all gate (w1) rows
        offsets[dim] += start
        sizes[dim] = stop - start
        if i is not None:
            offsets, sizes = [i, *offsets], [1, *sizes]
        t = dcp.read(self.reader, sharded_key(row), tuple(offsets), tuple(sizes))
        return t[0] if i is not None else t

    def get(self, key: str) -> torch.Tensor:
        template, i = split_layer(key)
        row = BY_META[template]
        lay = MEGATRON_KEYS[row]
        if lay.kind == "qkv":
            if self._qkv_cache is None or self._qkv_cache[0] != row.format(i=i):  # one layer's q, k, v kept
                shape = (2 * self.spec.size.n_kv_heads + self.spec.size.n_heads) * self.spec.size.head_dim
                qkv = dcp.read(self.reader, sharded_key(row), (i, 0, 0), (1, shape, self.spec.size.dim))[0]
                self._qkv_cache = (row.format(i=i), split_qkv([qkv], self.spec))
            return self._qkv_cache[1][lay.meta.index(template)]
        return self.block(key, 0, 0, self.spec.shape(key)[0])


def finest_tp(spec: Spec) -> int:
    """The largest TP a size can run at: every valid TP divides it, so chunks cut at its boundaries give
    a rank at any TP exactly its own bytes (DCP reads a stored chunk whole)."""
    s = spec.size
    return math.gcd(s.n_heads, s.n_kv_heads, s.ffn_dim)


def _pieces(t: torch.Tensor, lay: Layout, k: int, vocab: int) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """A whole (TP 1) tensor cut where the ranks of TP k begin: (owned copy, offsets) per piece."""
    if lay.split is None:
        return [(t, (0,) * t.dim())]
    d = TP_DIM[lay.split]
    n = t.shape[d]
    if lay.kind == "vocab":  # TP k's rank boundaries in its own padding of the vocab
        step = padded_vocab(vocab, k) // k
    else:  # fc1: k gate blocks, then k up blocks
        step = n // (k * len(lay.meta) if lay.kind == "fc1" else k)
    return [(t.narrow(d, c, min(step, n - c)).clone(), tuple(c if j == d else 0 for j in range(t.dim())))
            for c in range(0, n, step)]


def write_torch_dist(src: Source, out: Path, dtype: torch.dtype | None = None) -> None:
    """Write the directory from any Source, streaming: one DCP save (one .distcp file) per global tensor
    and per layer, so only one layer is held; one .metadata for all at the end."""
    dtype = dtype or src.dtype
    spec, n_layers = src.spec, src.spec.size.n_layers
    k = finest_tp(spec)
    base = out / "release"
    base.mkdir(parents=True)
    writer = dcp.GroupWriter(base)
    group: dict = {}
    for _, lay, i in megatron_keys(n_layers):
        t = rank_tensor(src, lay, i, 1, 0, dtype)  # the whole tensor: the row's layout at TP 1
        name = sharded_key(BY_META[lay.meta[0]])
        pieces = _pieces(t, lay, k, spec.vocab)
        del t
        if i is None:
            writer.save({name: dcp.Chunks(pieces, pieces_size(pieces, lay))})
            continue
        gsize = (n_layers, *pieces_size(pieces, lay))
        group[name] = dcp.Chunks([(p[None], (i, *off)) for p, off in pieces], gsize)
        if all(sharded_key(r) in group for r in MEGATRON_KEYS if is_layer_row(r)):  # the layer is complete
            group |= {e: [None] for e in extra_state_keys(n_layers, range(i, i + 1))}  # as megatron-core saves them
            writer.save(group)
            group = {}
    writer.close()
    args = make_args(spec, 1, dtype)
    args.ckpt_format = "torch_dist"
    with atomic_file(base / COMMON_FILE, "wb") as f:
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 0,
                    "num_floating_point_operations_so_far": 0, "content_metadata": dict(CONTENT_METADATA)}, f)
    write_json(base / CONFIG_FILE, CONFIG, indent=None)
    if src.tokenizer is not None:
        shutil.copyfile(src.tokenizer, out / "tokenizer.model")
    with atomic_file(out / TRACKER) as f:
        f.write("release")


def pieces_size(pieces: list[tuple[torch.Tensor, tuple[int, ...]]], lay: Layout) -> tuple[int, ...]:
    """The whole tensor's size from its pieces (they tile it along the TP dim)."""
    first = pieces[0][0]
    if lay.split is None:
        return tuple(first.shape)
    d = TP_DIM[lay.split]
    size = list(first.shape)
    size[d] = sum(p.shape[d] for p, _ in pieces)
    return tuple(size)
