"""Convert between the meta, hf and megatron layouts, any direction, in one call.

Every format is read as a Source (Meta keys, Meta row order, full tensors fetched one at a time from
mmap'd files) and written by a streaming writer: Meta one consolidated file at a time, HF one layer
shard at a time, Megatron legacy one (TP rank, pipeline stage) at a time, Megatron torch_dist one layer
at a time. `--from megatron` reads either Megatron format (told apart inside the directory); `--to
megatron` writes the one `megatron_format` names. Output goes to a temp directory renamed on success,
so a failed conversion leaves nothing behind. The input's torch files are checked against their zip
CRC-32s first (parity.io.verify_zip): a changed byte is refused, not converted as a changed weight.
"""

from __future__ import annotations

from pathlib import Path

from parity.checkpoints import MEGATRON_FORMATS, detect_format
from parity.checkpoints.hf import HfSource, write_hf
from parity.checkpoints import megatron as megatron_ckpt
from parity.checkpoints.megatron import MegatronSource, check_tp, write_megatron
from parity.checkpoints.meta import MetaSource, write_meta
from parity.checkpoints.spec import Source
from parity.dtypes import torch_dtype
from parity.errors import UserError
from parity.io import atomic_dir, verify_zip
from parity.tokenizer import vocab_size



def open_megatron(d: Path, size: str | None = None) -> Source:
    """A Megatron checkpoint in whichever of MEGATRON_FORMATS the directory holds."""
    if megatron_ckpt.megatron_format(d) == "torch_dist":
        from parity.checkpoints.torch_dist import TorchDistSource

        return TorchDistSource(d, size)
    return MegatronSource(d, size)


READERS = {"meta": MetaSource, "hf": HfSource, "megatron": open_megatron}


def open_source(fmt: str, load_dir: str | Path, size: str | None = None) -> Source:
    load_dir = Path(load_dir)
    if fmt not in READERS:
        raise UserError(f"unknown checkpoint format {fmt!r}; use one of {', '.join(READERS)}")
    if not load_dir.is_dir():
        raise UserError(f"{load_dir}: checkpoint directory not found")
    return READERS[fmt](load_dir, size)


def convert(src: str, dst: str, load_dir: str | Path, save_dir: str | Path, *, target_tp: int | None = None,
            target_pp: int | None = None, target_files: int | None = None, megatron_format: str | None = None,
            dtype: str | None = None, tokenizer: str | Path | None = None, size: str | None = None,
            overwrite: bool = False, megatron_spec: str | None = None) -> Path:
    if src == "auto":
        src = detect_format(load_dir)
    if dst not in READERS:
        raise UserError(f"unknown checkpoint format {dst!r}; use one of {', '.join(READERS)}")
    mformat = megatron_format or next(iter(MEGATRON_FORMATS))
    if mformat not in MEGATRON_FORMATS:
        raise UserError(f"--megatron-format {mformat}: use one of {', '.join(MEGATRON_FORMATS)}")
    if megatron_format is not None and dst != "megatron":
        raise UserError("--megatron-format applies only to --to megatron")
    if mformat == "torch_dist" and (target_tp is not None or target_pp is not None):
        raise UserError("--target-tp / --target-pp: a torch_dist checkpoint is parallelism-independent (it loads "
                        "at any TP and PP); they apply to --megatron-format legacy")
    if Path(load_dir).resolve() == Path(save_dir).resolve():
        raise UserError(f"{save_dir}: --save-dir must differ from --load-dir")
    source = open_source(src, load_dir, size)
    for f in sorted(Path(load_dir).rglob("*.pt*")):  # torch files (Meta's, Megatron's) carry CRC-32s
        if f.suffix in (".pt", ".pth"):
            verify_zip(f)
    out_dtype = torch_dtype(dtype)
    if tokenizer is not None:
        tok = Path(tokenizer)
        n = vocab_size(tok)
        if n != source.spec.vocab:
            raise UserError(f"{tok}: tokenizer has {n} pieces but the checkpoint's vocab is {source.spec.vocab}")
        source.tokenizer = tok
    if source.tokenizer is None:
        raise UserError(f"{load_dir}: no tokenizer.model in the checkpoint; pass --tokenizer")
    tp = target_tp or source.spec.size.tp
    if dst == "megatron" and mformat == "legacy":
        check_tp(source.spec, tp, f"--target-tp {tp}")
    if target_files is not None and dst != "meta":
        raise UserError("--target-files applies only to --to meta")
    for flag, value in (("--target-tp", target_tp), ("--target-pp", target_pp)):
        if value is not None and dst != "megatron":
            raise UserError(f"{flag} applies only to --to megatron")
    if megatron_spec is not None and dst != "megatron":
        raise UserError("--megatron-spec applies only to --to megatron")
    save_dir = Path(save_dir)
    with atomic_dir(save_dir, overwrite=overwrite) as tmp:
        if dst == "meta":
            import shutil

            n = target_files or source.spec.size.n_files
            if n < 1:
                raise UserError(f"--target-files {n}: must be at least 1")
            write_meta(source, tmp, n, out_dtype)
            shutil.copyfile(source.tokenizer, tmp / "tokenizer.model")
        elif dst == "hf":
            write_hf(source, tmp, out_dtype)
        elif mformat == "torch_dist":
            from parity.checkpoints.torch_dist import write_torch_dist

            write_torch_dist(source, tmp, out_dtype)
        else:
            write_megatron(source, tmp, tp, out_dtype, pp=target_pp or 1, layer_spec=megatron_spec or "local")
    return save_dir


def cli_convert(args) -> int:
    out = convert(args.src, args.dst, args.load_dir, args.save_dir, target_tp=args.target_tp,
                  target_pp=args.target_pp, target_files=args.target_files, megatron_format=args.megatron_format,
                  dtype=args.dtype, tokenizer=args.tokenizer, size=args.size, overwrite=args.overwrite,
                  megatron_spec=args.megatron_spec)
    print(out)
    return 0
