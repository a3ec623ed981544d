"""Which tokenizer a checkpoint carries (CARRIERS, by checkpoint format), loaded and checked against
the checkpoint's vocabulary rows.

    hf        the directory's own tokenizer files (tokenizer.json / tokenizer_config.json /
              tokenizer.model), as AutoTokenizer finds them; rows = config.json vocab_size
    megatron  the tokenizer its saved args name (tokenizer_type + tokenizer_model); rows = args.vocab_size
    meta      tokenizer.model (Meta's own code encodes with sentencepiece); rows: params.json says -1
              (the tokenizer decides), so none to check here; the worker checks the embeddings
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from parity.errors import UserError
from parity.tokenizer_check.encoders import Encoder, kind_of_file, load, megatron_tokenizer_file

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
HF_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # never part of a tokenizer


@dataclass
class Carried:
    kind: str
    source: Path  # what the kind loads: an HF directory, a tokenizer file, a Megatron checkpoint
    named: Path  # the file a message about this tokenizer names
    files: list[Path]  # the tokenizer's own files (a same-file shortcut compares their bytes)
    rows: int | None = None  # vocabulary rows of the checkpoint the tokenizer must match
    rows_from: Path | None = None
    settings: dict = field(default_factory=dict)  # what else decides the encoding (Megatron's args)

    def digest(self) -> str:
        """Identity of what this tokenizer encodes like: its files' bytes and settings. Two checkpoints
        carrying the same tokenizer share one check (the three mini sizes do)."""
        h = hashlib.sha256(json.dumps([self.kind, str(self.source) if not self.files else "",
                                       self.settings], sort_keys=True, default=str).encode())
        for f in self.files:
            h.update(f.name.encode() + b"\0")
            h.update(f.read_bytes() if f.is_file() else b"(missing)")
        return h.hexdigest()[:16]


def _hf(d: Path) -> Carried | None:
    main = [d / f for f in HF_FILES if (d / f).is_file()]
    if not main:
        return None
    # every small file beside it may steer AutoTokenizer (config.json's model_type, added_tokens.json ...)
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.endswith(WEIGHTS)
                   and not p.name.startswith(".") and p.name != "model.safetensors.index.json")
    rows, cfg = None, d / "config.json"
    if cfg.is_file():
        try:
            rows = json.loads(cfg.read_text(encoding="utf-8")).get("vocab_size")
        except (ValueError, UnicodeDecodeError, AttributeError):
            rows = None  # the checkpoint reader reports a broken config.json
    return Carried("hf", d, main[0], files, rows, cfg)


def _megatron(d: Path) -> Carried | None:
    from parity.checkpoints.megatron import read_args

    args = read_args(d)
    if not getattr(args, "tokenizer_type", None):
        return None
    f = megatron_tokenizer_file(d, args)
    rows = getattr(args, "vocab_size", None)
    where = d / "latest_checkpointed_iteration.txt"  # the args live in rank 0's file beside it
    settings = {k: v for k, v in vars(args).items()
                if k.startswith(("tokenizer", "tiktoken")) or k in ("vocab_file", "merge_file", "vocab_size")}
    return Carried("megatron", d, f if f is not None else where, [f] if f is not None else [], rows, where,
                   settings)


def _meta(d: Path) -> Carried | None:
    f = d / "tokenizer.model"
    return Carried(kind_of_file(f), f, f, [f]) if f.is_file() else None


CARRIERS = {"hf": _hf, "megatron": _megatron, "meta": _meta}


def carried(fmt: str, ckpt_dir: str | Path) -> Carried | None:
    """The tokenizer a checkpoint directory of format `fmt` carries; None when it carries none."""
    return CARRIERS[fmt](Path(ckpt_dir))


def _check_json(c: Carried) -> None:
    if c.kind != "hf":
        return
    for name in HF_JSON:
        p = c.source / name
        if p.is_file():
            try:
                json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise UserError(f"{p}: not valid JSON ({str(e)[:120]}); the HF tokenizer does not load") from None


def load_carried(c: Carried) -> Encoder:
    """Load the carried tokenizer as its stack does; a tokenizer that does not load, or whose vocabulary
    differs from the checkpoint's rows, is a UserError naming the file."""
    if c.kind == "megatron" and c.files and not c.files[0].is_file():
        raise UserError(f"{c.files[0]}: tokenizer file named by the checkpoint's args (tokenizer_model) "
                        f"not found")
    _check_json(c)
    enc = load(c.kind, c.source, named=c.named)
    if c.rows is not None and enc.vocab_size != c.rows:
        raise UserError(f"{c.named}: the tokenizer has {enc.vocab_size} tokens but the checkpoint has "
                        f"{c.rows} vocabulary rows ({c.rows_from.name if c.rows_from else 'embeddings'}); "
                        f"it is not this checkpoint's tokenizer")
    return enc
