"""The three stacks agree on every mini size (issue 3, "What must be shown"), at TP/MP 1 in this process.

Each backend is loaded in-process here to keep the suite fast (world size 1 needs no torchrun); the
worker path with several ranks is exercised in test_backends_tp.py.
"""

from __future__ import annotations

import math

import pytest

from parity.arch import MINI_SIZES
from backend_helpers import compare, converted, meta_checkpoint, real_requests

ATOL_BACKENDS = 1e-4
ATOL_BATCHING = 1e-5
# Batch shapes change the kernels' summation order (HF's default sdpa attention most): on sums of
# ~15 log-probs near -100 that is a few fp32 ulps, so the batching bound is 1e-5 plus fp32's 1e-6 relative.
RTOL_BATCHING = 1e-6
# bf16 vs fp32 of the same stack, 7b-mini, the 360 requests below, measured (torch 2.13, 2 CPU cores):
# mean |delta loglik| meta 0.0404, hf 0.0402, megatron 0.0386 nats; max 0.29, 0.22, 0.22; no greedy flip.
# Regressions measured the same way: RMSNorm computed in bf16 raises a stack's mean to 0.050-0.052
# (hf, meta: +25-30%, max up to 0.45); log-softmax over the vocabulary in bf16 (every stack) 0.049. A
# softmax computed in bf16 changes nothing here (torch's bf16 CPU kernels accumulate in fp32 and round
# once, as the fp32 softmax's output is rounded anyway).
BF16_MEAN = 0.045  # nats per request, any stack: 11% above the measured means, below every regression
BF16_MAX = 0.4  # nats, one request: a loose ceiling (the max of 360 is noisy)
BF16_SPREAD = 1.15  # a stack's mean over the median stack's: measured 1.05 at most; a norm in bf16 1.25+

_loaded: dict = {}


def backend(kind: str, size: str, dtype: str = "fp32"):
    """One loaded backend per (kind, size, dtype) for the module (loading is most of the cost)."""
    key = (kind, size, dtype)
    if key not in _loaded:
        from parity.backends.worker import load_backend

        meta_dir = meta_checkpoint(size)
        ckpt = {"meta": meta_dir, "hf": converted(meta_dir, "hf"),
                "megatron": converted(meta_dir, "megatron", tp=1)}[kind]
        _loaded[key] = load_backend(kind, ckpt, tp=1, device="cpu", dtype=dtype)
    return _loaded[key]


@pytest.fixture(scope="module")
def requests_by_size():
    return {size: real_requests(meta_checkpoint(size) / "tokenizer.model") for size in MINI_SIZES}


@pytest.fixture(scope="module")
def fp32_scores(requests_by_size):
    return {(kind, size): backend(kind, size).loglikelihood(requests_by_size[size], "auto")
            for size in MINI_SIZES for kind in ("meta", "hf", "megatron")}


@pytest.mark.parametrize("size", MINI_SIZES)
def test_three_backends_agree_fp32(size, requests_by_size, fp32_scores):
    reqs = requests_by_size[size]
    assert len(reqs) >= 300
    ref = fp32_scores[("meta", size)]
    assert all(math.isfinite(s.loglik) and s.loglik < 0 for s in ref)
    for kind in ("hf", "megatron"):
        worst, mean, flips = compare(ref, fp32_scores[(kind, size)])
        print(f"{size} {kind} vs meta: {len(reqs)} requests, max |diff| {worst:.2e}, mean {mean:.2e}, "
              f"greedy flips {flips}")
        assert worst < ATOL_BACKENDS
        assert flips == 0


@pytest.mark.parametrize("size", MINI_SIZES)
def test_hf_logits_equal_meta_reference(size, requests_by_size):
    """Issue 2's logits test: the converted HF model computes the Meta reference's logits."""
    import torch

    longest = max(requests_by_size[size], key=lambda r: len(r.context) + len(r.continuation))
    ids = list(longest.context + longest.continuation)
    ref, hf = backend("meta", size).logits(ids), backend("hf", size).logits(ids)
    assert ref.shape == hf.shape == (len(ids), backend("meta", size).vocab_size)
    diff = (ref - hf).abs().max().item()
    print(f"{size}: {len(ids)} positions, max |logit diff| hf vs meta {diff:.2e}")
    assert diff < 1e-4
    assert not torch.equal(ref[0], ref[-1])  # a model that ignores its input would pass the rest


@pytest.mark.parametrize("kind", ["meta", "hf", "megatron"])
def test_batch_size_one_equals_auto(kind, requests_by_size, fp32_scores):
    size = "70b-mini"  # GQA + the widest ffn: the shape where padding/batching bugs would show
    # The requests of every third context, at batch 1, against their scores from the "auto" batches of all
    # of them (padded and batched with the others): both kinds of request (COPA continuations, MMLU letters)
    # and the whole range of lengths at a third of the batch-1 cost. Whole contexts, so that requests that
    # share one are grouped the same way in both runs (hf's kv-cache path; tests/test_backends_shared_context.py).
    every = set(list(dict.fromkeys(r.context for r in requests_by_size[size]))[::3])
    picked = [i for i, r in enumerate(requests_by_size[size]) if r.context in every]
    reqs = [requests_by_size[size][i] for i in picked]
    one = backend(kind, size).loglikelihood(reqs, 1)
    auto = [fp32_scores[(kind, size)][i] for i in picked]
    worst, _, flips = compare(one, auto)
    print(f"{kind} {size}: batch 1 vs auto max |diff| {worst:.2e}")
    assert flips == 0
    assert all(math.isclose(a.loglik, b.loglik, rel_tol=RTOL_BATCHING, abs_tol=ATOL_BATCHING)
               for a, b in zip(one, auto))


def test_single_token_shortcut_and_truncation(requests_by_size):
    """Requests sharing a context with one-token continuations take one forward pass; inputs longer than
    max_length are cut on the left exactly as lm-eval cuts them."""
    from parity.requests import Request

    m = backend("meta", "7b-mini")
    reqs = [r for r in requests_by_size["7b-mini"] if len(r.continuation) == 1][:8]
    calls = []
    forward, saved = m.forward, m.max_length
    m.forward = lambda t: calls.append(tuple(t.shape)) or forward(t)
    try:
        shared = [Request(reqs[0].context, (tok,)) for tok in (5, 6, 7, 8)]
        m.loglikelihood(shared, "auto")
        assert calls == [(1, len(reqs[0].context))]
        # truncation: with max_length 8, a long request equals its last 9 tokens scored from scratch
        long = Request(tuple(range(1, 40)), (50, 51))
        m.max_length = 8
        cut = m.loglikelihood([long], 1)[0]
        tail = (long.context + long.continuation)[-9:]
        again = m.loglikelihood([Request(tail[:-2], tail[-2:])], 1)[0]
        assert abs(cut.loglik - again.loglik) < 1e-6
    finally:  # the backend is shared by the module's tests
        m.forward, m.max_length = forward, saved


def test_bf16_error_of_every_backend_is_what_bf16_costs(requests_by_size, fp32_scores):
    """bf16 against each stack's own fp32, bounded by what was measured (BF16_*), so a stack that computes
    more in bf16 than it should (a norm, the vocabulary's log-softmax) fails."""
    import statistics

    size = "7b-mini"
    reqs = requests_by_size[size]
    bf16 = {kind: backend(kind, size, "bf16").loglikelihood(reqs, "auto") for kind in ("meta", "hf", "megatron")}
    means = {}
    for kind, scores in bf16.items():
        assert all(math.isfinite(s.loglik) for s in scores)
        worst, means[kind], flips = compare(scores, fp32_scores[(kind, size)])
        print(f"{size} bf16 {kind} vs fp32 {kind}: max |diff| {worst:.4f}, mean {means[kind]:.4f}, "
              f"greedy flips {flips}")
        assert means[kind] < BF16_MEAN and worst < BF16_MAX
    median = statistics.median(means.values())
    assert all(m < BF16_SPREAD * median for m in means.values()), means
    for a, b in [("hf", "meta"), ("megatron", "meta"), ("megatron", "hf")]:  # what the harness reports
        worst, mean, flips = compare(bf16[a], bf16[b])
        print(f"{size} bf16 {a} vs bf16 {b}: max |diff| {worst:.4f}, mean {mean:.4f}, greedy flips {flips}")


def test_hf_matches_lm_eval_hflm():
    """The hf backend equals lm-eval's own HF model class on the same (context, continuation) strings."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from parity.requests import Request
    from backend_helpers import string_pairs

    size = "7b-mini"
    hf_dir = converted(meta_checkpoint(size), "hf")
    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=8, dtype="float32")
    pairs = string_pairs(n_copa=50, n_mmlu=10)
    instances = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(pairs)]
    theirs = lm.loglikelihood(instances, disable_tqdm=True)
    # the same ids lm-eval fed its model (HF's tokenizer splits a few strings differently from
    # sentencepiece: docs/architecture.md; the comparison is about the model, so both get lm-eval's ids)
    ours_reqs = []
    for c, x in pairs:
        ctx, cont = lm._encode_pair(c, x)
        ours_reqs.append(Request(tuple(ctx) if ctx else (lm.prefix_token_id,), tuple(cont)))
    ours = backend("hf", size).loglikelihood(ours_reqs, "auto")
    diffs = [abs(a.loglik - b[0]) for a, b in zip(ours, theirs)]
    flips = sum(a.is_greedy != bool(b[1]) for a, b in zip(ours, theirs))
    print(f"hf backend vs lm-eval HFLM on {len(pairs)} pairs: max |diff| {max(diffs):.2e}, greedy flips {flips}")
    assert max(diffs) < 1e-4 and flips == 0
