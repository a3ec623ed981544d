"""Choices that share a context are scored from one kv cache of the context (hf): same numbers."""

from __future__ import annotations

from parity.backends.base import shared_context_groups
from parity.requests import Request
from backend_helpers import compare, converted, meta_checkpoint, real_requests

# The kv-cache path sums attention in another order than a full forward: measured max 3.05e-5 over
# these 100 requests (fp32 sums of several log-probs). The README states this same bound.
ATOL_SHARED = 5e-5


def test_grouping_rules():
    reqs = [Request((1, 5, 6), (7, 8)), Request((1, 5, 6), (9,)),  # shared context, a multi-token choice
            Request((1, 2), (3,)), Request((1, 2), (4,)),  # single-token choices: one forward already
            Request((1, 9), (3, 4)),  # alone
            Request((1, 5, 6, 7), (8, 9)), Request((1, 5, 6, 7), (8, 9, 9))]  # too long for max_length 5
    groups, rest = shared_context_groups(reqs, max_length=5)
    assert groups == [[0, 1]]
    assert rest == [2, 3, 4, 5, 6]


def test_shared_context_equals_plain_batches():
    from parity.backends.hf import HFBackend

    meta = meta_checkpoint("7b-mini")
    backend = HFBackend(converted(meta, "hf"))
    reqs = real_requests(meta / "tokenizer.model", n_copa=40, n_mmlu=5)
    assert shared_context_groups(reqs, backend.max_length)[0], "the sample must exercise the shared path"
    shared = backend.loglikelihood(reqs, "auto")
    backend.supports_shared_context = False
    plain = backend.loglikelihood(reqs, "auto")
    max_diff, _, flips = compare(shared, plain)
    print(f"shared-context kv cache vs plain batches: max |diff| {max_diff:.2e} over {len(reqs)} requests")
    assert max_diff < ATOL_SHARED and flips == 0
