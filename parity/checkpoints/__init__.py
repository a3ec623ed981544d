"""Readers and writers for the three checkpoint formats (meta, hf, megatron) and converters between them.

detect_format(dir) tells which format a directory holds; tokenizer_path(dir) finds its tokenizer.model.
"""

from __future__ import annotations

from pathlib import Path

from parity.errors import UserError

# The file that marks each format's directory.
MARKERS = {
    "meta": "params.json",
    "hf": "config.json",
    "megatron": "latest_checkpointed_iteration.txt",
}
# megatron-core layer specs whose tensor names the megatron format reads and writes: local modules, and
# Transformer Engine's (megatron.MEGATRON_KEYS' `te` names). Here, not there, so the CLI stays torch-free.
MEGATRON_SPECS = ("local", "te")
# The format "megatron" is either of Megatron-LM's on-disk formats (its --ckpt-format torch / torch_dist),
# told apart by what the iteration directory (release/, iter_NNNNNNN/) holds; `--from megatron` reads
# both, `--to megatron --megatron-format` picks one (the first is the default).
MEGATRON_FORMATS = {
    "legacy": "mp_rank_*",  # one torch.save per TP rank (and pipeline stage): checkpoints/megatron.py
    "torch_dist": "metadata.json",  # megatron-core dist_checkpointing: checkpoints/torch_dist.py
}


def detect_format(d: str | Path) -> str:
    d = Path(d)
    if not d.is_dir():
        raise UserError(f"{d}: checkpoint directory not found")
    found = [fmt for fmt, marker in MARKERS.items() if (d / marker).is_file()]
    if len(found) != 1:
        raise UserError(f"{d}: cannot tell the checkpoint format (expected exactly one of "
                        f"{', '.join(MARKERS.values())}; found {found or 'none'})")
    return found[0]


def tokenizer_path(d: str | Path) -> Path:
    """tokenizer.model at the top of a checkpoint directory of any format (all three ship it there)."""
    p = Path(d) / "tokenizer.model"
    if not p.is_file():
        raise UserError(f"{p}: tokenizer.model not found in the checkpoint directory; "
                        f"re-create it with --tokenizer")
    return p
