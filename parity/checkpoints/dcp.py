"""PyTorch distributed checkpoint (DCP) directories, read and written in one process, safely.

A DCP directory is `.metadata` (a pickle of torch.distributed.checkpoint.metadata.Metadata: each
tensor's global size and dtype, its chunks, and where each chunk's bytes lie) plus `*.distcp` files in
which every chunk is an independent torch.save blob at [offset, offset + length).

- `.metadata` is a pickle that torch itself reads with a bare pickle.load. Here it goes through an
  unpickler that builds only DCP's own metadata classes (dataclasses, enums, torch.Size, dtypes) and
  refuses any other global, so a hostile file runs nothing. `safe_metadata()` gives the same guarantee
  to code that uses torch's reader itself (megatron-core's loader). Chunks are torch.load'ed with
  weights_only=True by DCP's own reader.
- Reading needs no process group (torch's loader with no_dist=True) and streams: `read()` fetches a
  region of one saved tensor (a layer of a stacked tensor, a TP rank's rows) and reads only the chunks
  that overlap it.
- Writing streams: `GroupWriter` takes one dcp.save per group of tensors (each group its own .distcp
  file) and writes one .metadata for all of them at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pickle
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from parity.errors import UserError

METADATA = ".metadata"
_DCP = "torch.distributed.checkpoint"
# Every global a DCP .metadata written by torch 2.x or megatron-core 0.16 refers to (megatron-core keeps
# its save plans in it: the planner classes). All are dataclasses, enums, torch.Size, dtypes, a layout
# lookup or a path: building them runs no code of the file's choosing.
SAFE_METADATA_GLOBALS = frozenset(
    {(f"{_DCP}.metadata", n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                       "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                       "StorageMeta", "_MEM_FORMAT_ENCODING")}
    | {(f"{_DCP}.filesystem", "_StorageInfo")}
    | {(f"{_DCP}.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")}
    | {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
       ("pathlib", "PosixPath")}
    | {("torch", str(t).removeprefix("torch.")) for t in (
        torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
        torch.int8, torch.uint8, torch.bool)})


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in SAFE_METADATA_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def read_metadata(path: Path) -> Metadata:
    """A .metadata file through the restricted unpickler; anything else is one UserError line."""
    if not path.is_file():
        raise UserError(f"{path}: not found; a distributed checkpoint needs it")
    try:
        with open(path, "rb") as f:
            md = _SafeUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load ({e}); a DCP .metadata holds only DCP's metadata classes") from None
    except Exception as e:  # any other failure to parse: truncated or not a pickle at all
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {str(e)[:150]}); the file is truncated "
                        f"or not a DCP .metadata") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise UserError(f"{path}: holds a {type(md).__name__}, not DCP checkpoint metadata")
    if md.version is not None and _version(md.version) > _version(CURRENT_DCP_VERSION):
        raise UserError(f"{path}: DCP format version {md.version} is newer than this torch reads "
                        f"({CURRENT_DCP_VERSION}); upgrade torch")
    return md


def _version(v) -> tuple:
    try:
        return tuple(int(x) for x in str(v).split("."))
    except ValueError:
        return (1 << 30,)  # unparseable: treat as newer than anything known


def check_storage(d: Path, md: Metadata) -> None:
    """Every chunk of every tensor has bytes in an existing .distcp file inside `d`, and the chunks tile
    each tensor: a missing or truncated shard, or a .metadata of another checkpoint, is caught here,
    before any tensor is read."""
    sizes: dict[str, int] = {}
    for idx, info in md.storage_data.items():
        if not isinstance(info, _StorageInfo) or not isinstance(idx, MetadataIndex):
            raise UserError(f"{d / METADATA}: malformed storage entry {idx!r}")
        rel = info.relative_path
        if not isinstance(rel, str) or Path(rel).name != rel or rel in (".", ".."):
            raise UserError(f"{d / METADATA}: storage path {rel!r} of {idx.fqn} is not a file name in the directory")
        if rel not in sizes:
            p = d / rel
            if not p.is_file():
                raise UserError(f"{p}: missing; {d / METADATA} stores {idx.fqn} in it")
            sizes[rel] = p.stat().st_size
        if info.offset < 0 or info.length <= 0 or info.offset + info.length > sizes[rel]:
            raise UserError(f"{d / rel}: {sizes[rel]} bytes, but {d / METADATA} puts {idx.fqn} at bytes "
                            f"{info.offset}..{info.offset + info.length}; the .metadata does not match the shards "
                            f"(truncated shard, or another checkpoint's .metadata)")
    for key, tmd in md.state_dict_metadata.items():
        if not isinstance(tmd, TensorStorageMetadata):
            continue
        size = tuple(tmd.size)
        covered = 0
        for c in tmd.chunks:
            if len(c.offsets) != len(size) or any(o < 0 or o + s > g for o, s, g in zip(c.offsets, c.sizes, size)):
                raise UserError(f"{d / METADATA}: a chunk of {key} at {tuple(c.offsets)} lies outside its size {size}")
            if MetadataIndex(key, c.offsets) not in md.storage_data:
                raise UserError(f"{d / METADATA}: no stored bytes for the chunk of {key} at {tuple(c.offsets)}")
            covered += math.prod(c.sizes)
        if covered != math.prod(size):
            raise UserError(f"{d / METADATA}: the chunks of {key} cover {covered} of its {math.prod(size)} elements")


class Reader(FileSystemReader):
    """DCP's FileSystemReader on metadata already read safely (torch's own read_metadata unpickles)."""

    def __init__(self, d: Path, md: Metadata):
        super().__init__(d)
        self.dir, self.md = d, md

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if getattr(self.md, "storage_meta", None) is None:
            self.md.storage_meta = StorageMeta()
        self.md.storage_meta.load_id = self.load_id
        return self.md


@contextlib.contextmanager
def safe_metadata():
    """For code that opens DCP directories with torch's FileSystemReader itself (megatron-core's
    dist_checkpointing.load): its .metadata goes through the restricted unpickler while this lasts."""
    original = FileSystemReader.read_metadata

    def read(self, *args, **kwargs):
        md = read_metadata(Path(self.path) / METADATA)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    FileSystemReader.read_metadata = read
    try:
        yield
    finally:
        FileSystemReader.read_metadata = original


class Chunks(torch.Tensor):
    """Pieces of one global tensor as DCP's save and load planners see them (torch's _Checkpointable
    protocol, which DTensor and megatron-core's CheckpointableShardedTensor implement): each piece is
    (tensor, offsets into the global tensor); size() is the global size, which DCP checks."""

    @staticmethod
    def __new__(cls, pieces, global_size):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(global_size), dtype=pieces[0][0].dtype)

    def __init__(self, pieces, global_size):
        self._pieces = {torch.Size(off): t for t, off in pieces}
        self._global = torch.Size(global_size)

    def __create_write_items__(self, fqn, obj, index=None):
        return [WriteItem(index=MetadataIndex(fqn, off), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=off, sizes=t.size()),
                                                      properties=TensorProperties.create_from_tensor(t),
                                                      size=self._global))
                for off, t in self._pieces.items()]

    def __create_chunk_list__(self):
        return [ChunkStorageMetadata(offsets=off, sizes=t.size()) for off, t in self._pieces.items()]

    def __get_tensor_shard__(self, index):
        return self._pieces[index.offset]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{func} on a DCP chunk list")


def read(reader: Reader, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    """The region [offsets, offsets + sizes) of saved tensor `key`, reading only the chunks over it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    tmd = reader.md.state_dict_metadata[key]
    out = torch.empty(sizes, dtype=tmd.properties.dtype)
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
            warnings.simplefilter("ignore")
            dcp.load({key: Chunks([(out, offsets)], tmd.size)}, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        files = sorted({reader.md.storage_data[MetadataIndex(key, c.offsets)].relative_path for c in tmd.chunks
                        if all(o < lo + n and lo < o + s for o, s, lo, n in zip(c.offsets, c.sizes, offsets, sizes))})
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{reader.dir / (files[0] if files else METADATA)}: cannot read {key} ({reason}); the "
                        f"shard is damaged or does not match {METADATA}") from None
    return out


class GroupWriter(FileSystemWriter):
    """DCP's FileSystemWriter for a checkpoint saved in several dcp.save calls (one group of tensors at
    a time, so only one group is ever in memory): each call writes its own file __G_0.distcp, and
    close() writes one .metadata for all calls with DCP's own writer (temp file + rename)."""

    def __init__(self, path: Path):
        super().__init__(path, single_file_per_rank=True, thread_count=1, overwrite=False)
        self.group = 0
        self.md: Metadata | None = None
        self.results: list = []

    def prepare_global_plan(self, plans):
        return [dataclasses.replace(p, storage_data=_StoragePrefix(f"__{self.group}_")) for p in plans]

    def finish(self, metadata: Metadata, results) -> None:  # one call's metadata: merge, write at close()
        if self.md is None:
            self.md = metadata
        else:
            for k, v in metadata.state_dict_metadata.items():
                old = self.md.state_dict_metadata.setdefault(k, v)
                if old is not v:  # more chunks of a tensor begun in an earlier group
                    old.chunks.extend(v.chunks)
        self.results.extend(results)
        self.group += 1

    def storage_meta(self) -> StorageMeta:
        return StorageMeta()  # no save id or temp path baked in: the same input writes the same .metadata

    def save(self, state_dict: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state_dict, storage_writer=self, no_dist=True,
                     planner=DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False))

    def close(self) -> None:
        super().finish(self.md, self.results)
