"""(context, continuation) strings -> token-id Requests, once, with the checkpoint's tokenizer.model of
whichever kind (parity.tokenizer.KINDS: Llama 2 sentencepiece, Llama 3 tiktoken; docs/architecture.md,
"Prompts and tokenization").

lm-eval's split rule: trailing spaces of the context move to the front of the continuation; the
continuation's ids are what encoding the whole string adds after the context's ids (encoding the
continuation alone would give " A" -> [29871, 319] instead of the [319] the model sees after
"Answer:"). The tokenizer's BOS starts every context. Every backend gets these exact ids.
"""

from __future__ import annotations

from parity.errors import UserError
from parity.requests import Request


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's rule: trailing spaces of the context belong to the continuation."""
    n = len(context) - len(context.rstrip(" "))
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def encode_pair(tok, context: str, continuation: str) -> Request:
    """`tok`: a parity.tokenizer.Tokenizer."""
    context, continuation = split_pair(context, continuation)
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx):]
    if not cont:
        raise UserError(f"empty continuation after tokenizing {continuation!r}; the document has an empty choice")
    return Request((tok.bos_id, *ctx), tuple(cont))


def build_requests(docs, tokenizer_path) -> list[list[Request]]:
    """Per document, per choice: the Request every backend scores."""
    from parity.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    return [[encode_pair(tok, c, k) for c, k in doc.requests] for doc in docs]
