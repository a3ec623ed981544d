"""The project's own small sentencepiece tokenizer, and sentencepiece loading.

Synthetic checkpoints need a tokenizer.model that every stack can read. Without a real one, we train
a small model once from text the project owns (parity/checkpoints/tokenizer_corpus.txt), with
Llama-2's settings: BPE, byte fallback (any UTF-8 text encodes), unk 0 / bos 1 / eos 2, no pad.
Training is single-threaded so the same corpus gives the same bytes; the result is cached under
parity.io.cache_dir() keyed by a hash of the corpus and settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

from parity.errors import UserError
from parity.io import atomic_file, cache_dir

CORPUS = Path(__file__).parent / "checkpoints" / "tokenizer_corpus.txt"

# 1024 = 16 * 64: divisible by Meta's 8 files (output.weight is split on vocab) and small enough
# that mini models stay tiny. Everything else is Llama-2's tokenizer configuration.
TRAINER_SETTINGS = dict(
    model_type="bpe",
    vocab_size=1024,
    byte_fallback=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    character_coverage=0.9995,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    num_threads=1,
    max_sentence_length=16384,
    minloglevel=2,
)


def default_tokenizer() -> Path:
    """Path of the project's trained tokenizer.model (trained on first use, then cached)."""
    corpus = CORPUS.read_bytes()
    key = hashlib.sha256(corpus + json.dumps(TRAINER_SETTINGS, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "tokenizers" / f"parity-{key}.model"
    if not path.is_file():
        import sentencepiece as spm

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus.decode("utf-8").splitlines()), model_writer=buf,
            **TRAINER_SETTINGS)
        with atomic_file(path, "wb") as f:
            f.write(buf.getvalue())
    return path


def load_sp(path: str | os.PathLike):
    """A SentencePieceProcessor for `path`; a missing or unreadable file is a UserError."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer.model not found; pass --tokenizer with a sentencepiece model")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{path}: not a sentencepiece model ({str(e).splitlines()[0][:160]})") from None
    return sp
