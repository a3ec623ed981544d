"""The suite's two checks of a converter (no tests here), shared by tests/test_convert.py and by the
converter mutants that must fail them (tests/mutants.py):

- round trip: Meta -> HF -> Megatron -> HF -> Meta gives back the very same files;
- fresh conversion: the converted model, loaded by its own stack, computes the Meta reference's logits.

A consistent mistake (made in both directions) passes the first, so the second is what catches it. Both
import parity only inside their functions: the mutants' runner imports them before it picks which
parity (the real one or a mutated copy) a forked child imports.
"""

from __future__ import annotations

from pathlib import Path

# fp32 logits of a fresh conversion vs the Meta reference: measured at most 7.2e-6 on the minis (hf and
# megatron); every mutant in tests/mutants.py moves them by more than 3.
FRESH_ATOL = 1e-4
# The probe sequence: BOS + this ordinary English text in the checkpoint's tokenizer.
PROBE_TEXT = ("The harness exists to answer one question: do the same weights, run by a different stack, "
              "give the same answers? A row can be permuted the wrong way, a norm can be read in half "
              "precision, a vocabulary can be padded with rows that are not zero.")


def probe_ids(meta_dir: Path) -> list[int]:
    """BOS + the probe text in the checkpoint's own tokenizer."""
    from parity.tokenizer import load_sp

    return [1] + load_sp(Path(meta_dir) / "tokenizer.model").encode(PROBE_TEXT)


_META_LOGITS: dict = {}


def meta_logits(meta_dir: Path, ids: list[int]):
    """Meta's reference stack (llama_models + fairscale at MP 1, in this process) on `ids`: [T, vocab].
    Kept per (directory, fingerprint, ids): the hf and megatron checks of one size share one load."""
    from parity.backends.worker import load_backend
    from parity.io import fingerprint_dir

    key = (str(meta_dir), fingerprint_dir(Path(meta_dir)), tuple(ids))
    if key not in _META_LOGITS:
        _META_LOGITS[key] = load_backend("meta", meta_dir, tp=1, device="cpu", dtype="fp32").logits(ids)
    return _META_LOGITS[key]


def converted_logits(checkpoint: Path, fmt: str, ids: list[int]):
    """The converted model loaded by its own stack as a user loads it: transformers' AutoModelForCausalLM
    (offline) for HF, megatron-core's GPTModel through the megatron backend at TP 1."""
    import torch

    if fmt == "hf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, local_files_only=True)
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()
    from parity.backends.worker import load_backend

    return load_backend(fmt, checkpoint, tp=1, device="cpu", dtype="fp32").logits(ids)


def fresh_conversion_gap(meta_dir: Path, fmt: str, ref=None) -> tuple[float, Path]:
    """(max |logit difference| vs the Meta reference, the checkpoint) for meta_dir converted to `fmt`
    through the cache `parity run` uses, i.e. by the converter in this checkout. `ref`: the reference's
    logits on probe_ids(meta_dir) when already known (the mutants take them from the unmutated package)."""
    from backend_helpers import converted

    ids = probe_ids(meta_dir)
    ckpt = converted(meta_dir, fmt, tp=1)
    ref = meta_logits(meta_dir, ids) if ref is None else ref
    got = converted_logits(ckpt, fmt, ids)
    assert ref.shape == got.shape, (ref.shape, got.shape)
    return float((ref - got).abs().max()), ckpt


def round_trip_changes(meta_dir: Path, work: Path, route: tuple[str, ...] = ("hf", "megatron", "hf"), tp: int = 1,
                       first: Path | None = None) -> list[str]:
    """meta_dir converted along `route` (Megatron at `tp`; `first`: a conversion to route[0] made already)
    and back to Meta, under `work`: the names of the Meta files whose bytes changed (empty: exact)."""
    from parity.checkpoints.convert import convert

    cur, fmt = Path(meta_dir), "meta"
    for i, dst in enumerate(route):
        cur = first if i == 0 and first else convert(fmt, dst, cur, work / f"{i}-{dst}",
                                                         target_tp=tp if dst == "megatron" else None)
        fmt = dst
    back = convert(fmt, "meta", cur, work / "back")
    names = sorted(p.name for p in Path(meta_dir).iterdir())
    if names != sorted(p.name for p in back.iterdir()):
        return ["<file list>"]
    return [n for n in names if (Path(meta_dir) / n).read_bytes() != (back / n).read_bytes()]
