"""(context, continuation) strings -> token-id Requests, once, with sentencepiece (docs/architecture.md,
"Prompts and tokenization").

lm-eval's split rule: trailing spaces of the context move to the front of the continuation; the
continuation's ids are what encoding the whole string adds after the context's ids (encoding the
continuation alone would give " A" -> [29871, 319] instead of the [319] the model sees after
"Answer:"). BOS (1) starts every context. Every backend gets these exact ids.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from parity.errors import UserError
from parity.requests import Request


@lru_cache(maxsize=4)
def _processor(path: str):
    from parity.tokenizer import load_sp

    return load_sp(path)


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's rule: trailing spaces of the context belong to the continuation."""
    n = len(context) - len(context.rstrip(" "))
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def encode_pair(sp, context: str, continuation: str) -> Request:
    context, continuation = split_pair(context, continuation)
    whole = sp.EncodeAsIds(context + continuation)
    ctx = sp.EncodeAsIds(context)
    cont = whole[len(ctx):]
    if not cont:
        raise UserError(f"empty continuation after tokenizing {continuation!r}; the document has an empty choice")
    bos = sp.bos_id() if sp.bos_id() >= 0 else 1
    return Request((bos, *ctx), tuple(cont))


def build_requests(docs, sp_model_path) -> list[list[Request]]:
    """Per document, per choice: the Request every backend scores."""
    sp = _processor(str(Path(sp_model_path).resolve()))
    return [[encode_pair(sp, c, k) for c, k in doc.requests] for doc in docs]
