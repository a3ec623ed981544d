"""Where each (size, backend) checkpoint comes from: config yaml, --checkpoint flags, or the cache.

Precedence: --checkpoint SIZE:BACKEND=DIR > config file `checkpoints.<size>.<backend>` > derived.
Derived means: a mini / synthetic size with no Meta files gets a deterministic synthetic checkpoint
made on first use; a backend with no checkpoint of its own is converted from the size's Meta files
with `parity convert` into the cache, keyed by the Meta files' fingerprint and the converter's source,
so it is reused while both are unchanged and rebuilt after a converter change (what CI needs).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from parity import arch
from parity.backends import backend_info
from parity.errors import UserError
from parity.io import build_lock, cache_dir, fingerprint_dir, read_yaml_mapping

def code_digest(*patterns: str) -> str:
    """Hash of some of parity's own source files: cached outputs of changed code are never reused."""
    import hashlib

    h = hashlib.sha256()
    root = Path(__file__).parent
    for p in sorted(q for pat in patterns for q in root.glob(pat)):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


@dataclass
class Checkpoint:
    path: Path
    format: str
    tp: int  # model/tensor-parallel ranks the backend runs with
    origin: str  # "config", "flag", "synthetic", "converted"

    def manifest(self) -> dict:
        return {"path": str(self.path), "fingerprint": fingerprint_dir(self.path), "tp": self.tp,
                "format": self.format, "origin": self.origin}


def load_config(path: str | None) -> dict:
    if not path:
        return {}
    cfg = read_yaml_mapping(path, "config file")
    for size in (cfg.get("checkpoints") or {}):
        arch.get_size(size)
    return cfg


def parse_checkpoint_flags(flags: list[str]) -> dict[tuple[str, str], Path]:
    out = {}
    for f in flags:
        try:
            key, path = f.split("=", 1)
            size, backend = key.split(":", 1)
        except ValueError:
            raise UserError(f"--checkpoint {f!r}: expected SIZE:BACKEND=DIR, e.g. 7b:megatron=/ckpt/7b-tp1") from None
        arch.get_size(size)
        backend_info(backend, where=f"--checkpoint {f!r}")
        out[(size, backend)] = Path(path).expanduser()
    return out


def _configured(size: str, backend: str, flags: dict, cfg: dict, config_path: str | None) -> tuple[Path, str] | None:
    if (size, backend) in flags:
        return flags[(size, backend)], "flag"
    entry = ((cfg.get("checkpoints") or {}).get(size) or {}).get(backend)
    if entry:
        p = Path(os.path.expandvars(str(entry))).expanduser()
        if not p.is_absolute() and config_path:
            p = Path(config_path).resolve().parent / p
        return p, "config"
    return None


def synthetic_meta(size: arch.Size, seed: int = 0) -> Path:
    from parity.checkpoints.synthetic import cached_checkpoint

    print(f"parity: synthetic {size.name} checkpoint (made on first use, then cached)", file=sys.stderr, flush=True)
    return cached_checkpoint(size.name, seed=seed)


def resolve_checkpoints(sizes: list[str], backends: list[str], flags: dict, cfg: dict,
                        config_path: str | None = None, tp: int | None = None) -> dict[str, dict[str, Checkpoint]]:
    """Every (size, backend) -> an existing checkpoint directory, converting or synthesising as needed.
    `tp` (--tp): the megatron backend's tensor-parallel size, else each size's default (see _parallel)."""
    from parity.checkpoints import detect_format

    out: dict[str, dict[str, Checkpoint]] = {}
    for name in sizes:
        size = arch.get_size(name)
        out[name] = {}
        meta = _configured(name, "meta", flags, cfg, config_path)
        if meta is None:
            if size.real:
                raise UserError(f"no checkpoint for size {name}: set checkpoints.{name}.meta in a config "
                                f"file (see configs/llama2.example.yaml) or pass --checkpoint {name}:meta=DIR")
            meta = (synthetic_meta(size), "synthetic")
        meta_dir, meta_origin = meta
        for backend in backends:
            fmt = backend_info(backend).format
            found = _configured(name, backend, flags, cfg, config_path)
            if found is None and fmt == "meta":
                found = (meta_dir, meta_origin)
            if found is not None:
                path, origin = found
                if not path.is_dir():
                    raise UserError(f"{path}: checkpoint directory for {name}/{backend} not found")
                if (have := detect_format(path)) != fmt:
                    raise UserError(f"{path}: holds a {have} checkpoint but backend {backend} needs "
                                    f"{fmt}; convert it with `parity convert`")
            else:
                path, origin = cached_conversion(meta_dir, fmt, size, tp), "converted"
            out[name][backend] = Checkpoint(path, fmt, _parallel(path, fmt, size, tp), origin)
    return out


def _parallel(path: Path, fmt: str, size: arch.Size, tp: int | None = None) -> int:
    """The ranks a checkpoint of this format runs with. Megatron: a legacy checkpoint's TP shards (--tp
    must agree); a torch_dist checkpoint loads at any valid TP: --tp, else the size's default TP.
    Meta: its files. Else 1."""
    if fmt == "megatron":
        from parity.checkpoints import megatron

        shards = megatron.tp_size(path)
        if shards is None:  # torch_dist
            run_tp = tp or size.tp
            if not size.valid_tp(run_tp):
                raise UserError(f"--tp {run_tp}: does not divide the {size.n_heads} heads, {size.n_kv_heads} kv "
                                f"groups and ffn width {size.ffn_dim} of {size.name}")
            return run_tp
        if tp is not None and tp != shards:
            raise UserError(f"{path}: legacy Megatron checkpoint with {shards} TP shards cannot run at --tp {tp}; "
                            f"convert it with --target-tp {tp} or --megatron-format torch_dist")
        return shards
    if fmt == "meta":
        from parity.checkpoints import meta

        return meta.n_files(path)
    return 1


def cached_conversion(meta_dir: Path, fmt: str, size: arch.Size, tp: int | None = None) -> Path:
    """meta_dir converted to `fmt` in the cache, keyed by format (backends reading one format share
    one copy; Megatron: legacy at --tp or the size's TP), the Meta files' fingerprint and the
    converter's source. The tests get their converted copies here too, so a changed converter is never
    scored through a conversion the old one wrote."""
    from parity.checkpoints.convert import convert

    if not meta_dir.is_dir():
        raise UserError(f"{meta_dir}: Meta checkpoint directory not found")
    key = f"{fingerprint_dir(meta_dir)}-{code_digest('checkpoints/*.py')}"
    target_tp = (tp or size.tp) if fmt == "megatron" else None
    suffix = f"-tp{target_tp}" if target_tp else ""
    out = cache_dir() / "converted" / f"{size.name}-{key}" / f"{fmt}{suffix}"
    if not out.is_dir():
        with build_lock(out):
            if not out.is_dir():
                print(f"parity: converting {meta_dir} -> {fmt}{suffix} in {out}", file=sys.stderr, flush=True)
                convert("meta", fmt, meta_dir, out, target_tp=target_tp)
    return out
