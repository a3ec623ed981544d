"""Tokenizer files: the kinds parity reads (KINDS), the project's own small sentencepiece tokenizer, and
Llama 3's tiktoken model shipped inside llama-models.

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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from parity.errors import UserError
from parity.io import atomic_file, build_lock, cache_dir

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
        with build_lock(path):
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


def llama3_tokenizer() -> Path:
    """Llama 3's tokenizer (tiktoken BPE, 128000 ranks + 256 special tokens) as the installed llama-models
    package ships it: what make-checkpoint puts into a Llama 3 checkpoint."""
    import llama_models

    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise UserError(f"{path}: llama-models ships no Llama 3 tokenizer.model; reinstall llama-models")
    return path


def kind_of_file(path: str | os.PathLike) -> str:
    """A single tokenizer file: sentencepiece (protobuf) or tiktoken (lines of "base64 rank")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer.model not found; pass --tokenizer with a tokenizer model")
    with open(path, "rb") as f:
        first = f.read(256).split(b"\n", 1)[0].split(b" ")
    return "tiktoken" if len(first) == 2 and first[1].strip().isdigit() else "sentencepiece"


def _tiktoken_load(path: Path):
    from llama_models.llama3.tokenizer import Tokenizer

    try:
        return Tokenizer(Path(path))
    except Exception as e:  # noqa: BLE001 - tiktoken's parse errors vary; the user needs one line
        raise UserError(f"{path}: not a tiktoken model ({type(e).__name__}: {str(e)[:120]})") from None


@dataclass(frozen=True)
class Kind:
    """How parity reads one kind of tokenizer.model into request ids (no BOS: requests add it)."""

    load: Callable[[Path], Any]
    encode: Callable[[Any, str], list[int]]
    bos: Callable[[Any], int]
    vocab_size: Callable[[Any], int]


KINDS: dict[str, Kind] = {
    # Llama 2 (Meta's and the project's own): sentencepiece; bos 1 if the model defines none
    "sentencepiece": Kind(load_sp, lambda sp, text: sp.EncodeAsIds(text),
                          lambda sp: sp.bos_id() if sp.bos_id() >= 0 else 1, lambda sp: sp.get_piece_size()),
    # Llama 3: llama-models' Tokenizer (bos <|begin_of_text|> = 128000, n_words 128256); special-token
    # strings in a text are ordinary text, as Meta's encode does by default
    "tiktoken": Kind(_tiktoken_load,
                     lambda t, text: t.encode(text, bos=False, eos=False, allowed_special=set(), disallowed_special=()),
                     lambda t: t.bos_id, lambda t: t.n_words),
}


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer.model of any kind in KINDS."""

    kind: str
    path: Path
    tok: Any

    def encode(self, text: str) -> list[int]:
        return KINDS[self.kind].encode(self.tok, text)

    @property
    def bos_id(self) -> int:
        return KINDS[self.kind].bos(self.tok)

    @property
    def vocab_size(self) -> int:
        return KINDS[self.kind].vocab_size(self.tok)


@lru_cache(maxsize=8)
def _load(path: str) -> Tokenizer:
    kind = kind_of_file(path)
    return Tokenizer(kind, Path(path), KINDS[kind].load(Path(path)))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer.model at `path`, its kind told by its content (loaded once per process)."""
    return _load(str(Path(path).resolve()))


def vocab_size(path: str | os.PathLike) -> int:
    return load_tokenizer(path).vocab_size
