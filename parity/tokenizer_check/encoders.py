"""How each stack's users turn text into token ids: one row per tokenizer kind (KINDS).

A row loads the tokenizer the way that stack loads it and encodes a batch of texts into the ids its
users feed the model, BOS included exactly when they add it. What is shared by every kind, lm-eval's
context/continuation split, is `encode_pairs` below; a new tokenizer kind (Llama 3's tiktoken model)
is one more row, nothing else.

    sentencepiece  a tokenizer.model: Meta's Llama-2 tokenizer (llama/tokenizer.py encode(bos=True):
                   [bos] + sp.encode(text))
    hf             an HF directory: AutoTokenizer.from_pretrained(dir, use_fast=True) as lm-eval's HFLM
                   loads it; tokenizer.encode(text) with its own special tokens, except that a text
                   starting with the BOS string is encoded without them (HFLM.tok_encode)
    megatron       a Megatron checkpoint: megatron-core's build_tokenizer(args) on its saved args
                   (Llama2Tokenizer + tokenizer_model, HuggingFaceTokenizer, TikTokenizer ...);
                   [tokenizer.bos] + tokenizer.tokenize(text), as Megatron-LM's Llama2Tokenizer.tokenize
                   (bos=True) does
    tiktoken       a tiktoken model (Llama 3, llama_models/llama3/tokenizer.model): llama-models'
                   Tokenizer.encode(text, bos=True, eos=False)
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from parity.errors import UserError
from parity.tokenizer import kind_of_file  # noqa: F401 - the one rule, re-exported for the check
from parity.requests import Request


@dataclass(frozen=True)
class Kind:
    load: Callable[[Path], Any]
    encode: Callable[[Any, list[str]], list[list[int]]]  # texts -> ids as the stack's users feed them
    pieces: Callable[[Any, list[int]], list[str]]
    vocab_size: Callable[[Any], int]
    describe: Callable[[Any], str]  # one phrase: which class / settings the stack ended up with


@dataclass
class Encoder:
    """A loaded tokenizer of one kind; `source` is what was loaded (named in messages)."""

    kind: str
    source: Path
    tok: Any

    def encode(self, texts: list[str]) -> list[list[int]]:
        return KINDS[self.kind].encode(self.tok, texts)

    def pieces(self, ids: list[int]) -> list[str]:
        return KINDS[self.kind].pieces(self.tok, ids)

    @property
    def vocab_size(self) -> int:
        return KINDS[self.kind].vocab_size(self.tok)

    @property
    def description(self) -> str:
        return KINDS[self.kind].describe(self.tok)


# ---------------------------------------------------------------------------------------- sentencepiece
def _sp_load(path: Path):
    from parity.tokenizer import load_sp

    return load_sp(path)


def _sp_encode(sp, texts):
    bos = sp.bos_id()
    return [([bos] if bos >= 0 else []) + ids for ids in sp.encode(texts)]


def _sp_pieces(sp, ids):
    n = sp.get_piece_size()
    return [sp.id_to_piece(i) if 0 <= i < n else f"<{i}?>" for i in ids]


# ---------------------------------------------------------------------------------------- hf
@contextmanager
def _quiet_transformers():
    """"sequence longer than model_max_length" and the like are not news to a tokenizer check."""
    import logging

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _hf_load(path: Path):
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)


def _hf_encode(tok, texts):
    # HFLM.tok_encode: the tokenizer's own special tokens, except for a text that already starts with
    # the prefix token's string (BOS, else EOS); a batch call gives the ids one call per text gives
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    lead = tok.decode(prefix) if prefix is not None else None
    special = [not (lead and t.startswith(lead)) for t in texts]
    out: list = [None] * len(texts)
    with _quiet_transformers():
        for flag in (True, False):
            idx = [i for i, s in enumerate(special) if s == flag]
            if idx:
                for i, ids in zip(idx, tok([texts[i] for i in idx], add_special_tokens=flag)["input_ids"]):
                    out[i] = list(ids)
    return out


def _hf_describe(tok) -> str:
    return f"AutoTokenizer -> {type(tok).__name__}"


# ---------------------------------------------------------------------------------------- megatron
# Megatron-LM's defaults for the tokenizer arguments a checkpoint's args may lack.
MEGATRON_ARG_DEFAULTS = {
    "tokenizer_model": None, "tokenizer_sentencepiece_legacy": False, "tokenizer_special_tokens": None,
    "tokenizer_metadata": None, "vocab_file": None, "merge_file": None, "tokenizer_hf_use_fast": False,
    "trust_remote_code": False, "tokenizer_hf_include_special_tokens": False, "tiktoken_pattern": None,
    "tiktoken_num_special_tokens": 1000, "vocab_size": None,
}


def megatron_tokenizer_file(ckpt: Path, args) -> Path | None:
    """args.tokenizer_model, relative to the checkpoint's top directory (parity's writer's rule)."""
    name = getattr(args, "tokenizer_model", None)
    return ckpt / name if name else None


def _megatron_load(ckpt: Path):
    import warnings

    from parity.backends.megatron import import_megatron_core

    with warnings.catch_warnings():  # megatron.core's import warns about Apex / Transformer Engine
        warnings.simplefilter("ignore")
        import_megatron_core()
        from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer

    from parity.checkpoints.megatron import read_args

    saved = read_args(ckpt)
    args = argparse.Namespace(**{**MEGATRON_ARG_DEFAULTS, **vars(saved)})
    f = megatron_tokenizer_file(ckpt, args)
    if f is not None:
        args.tokenizer_model = str(f)
    tok = build_tokenizer(args)
    tok.parity_type = args.tokenizer_type  # shown in the report
    return tok


def _megatron_encode(tok, texts):
    return [[tok.bos] + list(tok.tokenize(t)) for t in texts]


def _megatron_pieces(tok, ids):
    # the library tokenizer (sentencepiece, HF ...) under megatron-core's text wrapper knows its pieces
    lib = getattr(tok, "_tokenizer", tok)
    try:
        return [str(p) for p in lib.ids_to_tokens(list(ids))]
    except (AttributeError, TypeError, KeyError, IndexError):
        return [tok.detokenize([i]) for i in ids]


# ---------------------------------------------------------------------------------------- tiktoken
def _tiktoken_load(path: Path):
    from parity.tokenizer import KINDS as FILE_KINDS  # the one loader of a tiktoken file (bad file: one line)

    return FILE_KINDS["tiktoken"].load(path)


def _tiktoken_encode(tok, texts):
    return [tok.encode(t, bos=True, eos=False, allowed_special=set(), disallowed_special=()) for t in texts]


def _tiktoken_pieces(tok, ids):
    return [tok.model.decode_single_token_bytes(i).decode("utf-8", "replace") for i in ids]


KINDS: dict[str, Kind] = {
    "sentencepiece": Kind(_sp_load, _sp_encode, _sp_pieces, lambda sp: sp.get_piece_size(),
                          lambda sp: "sentencepiece, [bos] + encode"),
    "hf": Kind(_hf_load, _hf_encode, lambda tok, ids: tok.convert_ids_to_tokens(list(ids)), len, _hf_describe),
    "megatron": Kind(_megatron_load, _megatron_encode, _megatron_pieces, lambda tok: tok.vocab_size,
                     lambda tok: f"megatron-core {tok.parity_type}, [bos] + tokenize"),
    "tiktoken": Kind(_tiktoken_load, _tiktoken_encode, _tiktoken_pieces, lambda tok: tok.n_words,
                     lambda tok: "llama-models tiktoken, encode(bos=True)"),
}


def load(kind: str, source: str | Path, named: Path | None = None) -> Encoder:
    """Load `source` as `kind`; anything that goes wrong is one line naming the file (`named`, else
    `source`)."""
    source = Path(source)
    try:
        return Encoder(kind, source, KINDS[kind].load(source))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - each library fails in its own way; the user needs one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{named or source}: the {kind} tokenizer does not load ({type(e).__name__}: "
                        f"{first[:200]})") from None


# ---------------------------------------------------------------------------------------- pairs
def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's TemplateLM._encode_pair: trailing whitespace of the context goes to the continuation."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def encode_pairs(enc: Encoder, pairs: list[tuple[str, str]]) -> list[Request]:
    """(context, continuation) -> the ids that stack's users score: context ids as encoded, continuation
    ids = what encoding context + continuation adds after them (lm-eval's rule). Each distinct text is
    encoded once, in one batch."""
    split = [split_pair(c, k) for c, k in pairs]
    texts = list(dict.fromkeys(s for c, k in split for s in (c, c + k)))
    ids = dict(zip(texts, enc.encode(texts)))
    out = []
    for c, k in split:
        ctx, whole = ids[c], ids[c + k]
        out.append(Request(tuple(ctx), tuple(whole[len(ctx):])))
    return out
