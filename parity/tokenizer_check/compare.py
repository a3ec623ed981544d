"""One tokenizer against the reference ids, per test: how many requests differ, and the first few.

A request differs when the ids the other stack's users would feed (context or continuation, BOS
included) are not the ids parity scores. An example keeps what a converter maintainer needs to see
it: the document and choice, the text where the ids part, and both id windows with their pieces.
"""

from __future__ import annotations

import re
import time

from parity.requests import Request
from parity.tokenizer_check.encoders import Encoder, encode_pairs, split_pair

N_EXAMPLES = 5  # per test; enough to see the pattern, small enough for report.json
WINDOW = 12  # tokens shown from just before the first difference


def pieces_text(pieces: list[str]) -> str:
    """The text a run of sentencepiece-style pieces spells ("▁" = space, "<0x0A>" = its byte)."""
    out, raw = [], bytearray()
    for p in pieces:
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", p)
        if m:
            raw.append(int(m.group(1), 16))
            continue
        if raw:
            out.append(raw.decode("utf-8", "replace"))
            raw = bytearray()
        out.append(p.replace("▁", " "))
    if raw:
        out.append(raw.decode("utf-8", "replace"))
    return "".join(out)


def first_difference(ref: Request, other: Request) -> int:
    a, b = ref.context + ref.continuation, other.context + other.continuation
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    if len(a) != len(b):
        return min(len(a), len(b))
    return min(len(ref.context), len(other.context))  # same ids, another context/continuation split


def example(doc_id, choice: int, pair: tuple[str, str], ref: Request, other: Request,
            ref_enc: Encoder | None, enc: Encoder) -> dict:
    i = first_difference(ref, other)
    start = max(0, i - 2)
    a = list((ref.context + ref.continuation)[start:start + WINDOW])
    b = list((other.context + other.continuation)[start:start + WINDOW])
    ref_pieces = ref_enc.pieces(a) if ref_enc is not None else []
    return {
        "doc_id": doc_id, "choice": choice,
        "where": "context" if i < len(ref.context) else "continuation",
        "text": pieces_text(ref_pieces) if ref_pieces else None,
        "continuation": split_pair(*pair)[1][:120],
        "position": i, "start": start,
        "reference": {"ids": a, "pieces": ref_pieces, "n_context": len(ref.context)},
        "other": {"ids": b, "pieces": enc.pieces(b), "n_context": len(other.context)},
    }


def compare_test(enc: Encoder, docs, requests: list[list[Request]], ref_enc: Encoder | None = None,
                 n_examples: int = N_EXAMPLES) -> dict:
    """docs: parity.tasks Docs (their (context, continuation) strings); requests: the reference ids
    per doc and choice, as the run scores them."""
    pairs = [p for d in docs for p in d.requests]
    mine = iter(encode_pairs(enc, pairs))
    n, bad, examples = 0, 0, []
    for doc, refs in zip(docs, requests):
        for choice, (pair, ref) in enumerate(zip(doc.requests, refs)):
            other = next(mine)
            n += 1
            if other != ref:
                bad += 1
                if len(examples) < n_examples:
                    examples.append(example(doc.doc_id, choice, pair, ref, other, ref_enc, enc))
    return {"n_requests": n, "n_mismatches": bad, "examples": examples}


def compare_tests(enc: Encoder, data: dict, ref_enc: Encoder | None = None, progress=None) -> dict:
    """data: test -> object with .docs and .requests (run.TestData). One batch per test bounds memory."""
    out, t0 = {}, time.perf_counter()
    for test, td in data.items():
        if td.docs:
            out[test] = compare_test(enc, td.docs, td.requests, ref_enc)
    if progress:
        n = sum(r["n_requests"] for r in out.values())
        bad = sum(r["n_mismatches"] for r in out.values())
        progress(f"{bad} of {n} requests differ ({time.perf_counter() - t0:.1f}s)")
    return out
