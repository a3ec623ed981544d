"""Benchmark: parity's hf backend against lm-eval's own HF path, same checkpoint, same requests.

    python bench/vs_lmeval.py [--size 7b-mini] [--data-dir ../shared/data] [--mmlu 10 --hellaswag 20 --boolq 20]
                              [--lm-eval-batch-size 1] [--repeats 2] [--full-mmlu-boolq] [--hf-tokenizer FORM]

One HF checkpoint (a synthetic Meta checkpoint with the real Llama-2 tokenizer when given, converted by
parity), one list of (context, continuation) pairs built by parity.tasks from MMLU subjects, hellaswag
and boolq. Both sides are timed on their natural path, tokenization included, model loading excluded,
in alternating order: lm-eval's `HFLM.loglikelihood` (what `lm_eval --model hf` calls) and parity's
`build_requests` + `HFBackend.loglikelihood`. Prints the wall-time ratio, tokens/s of both, how many
requests lm-eval tokenized differently from parity, and the max per-request |log-likelihood
difference| over all requests and over those with identical ids.

--full-mmlu-boolq: every document of the 57 MMLU subjects and of BoolQ (62,708 requests with
../shared/data), no hellaswag: the comparison of docs/tokenizers.md. --hf-tokenizer chooses which form
of HF tokenizer files the converted directory carries (parity.checkpoints.hf_tokenizer.FORMS; default
the one `parity convert` writes), to reproduce what the earlier form cost.
Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


def pairs_from_tasks(data_dir, n_mmlu_subjects, n_mmlu, n_hellaswag, n_boolq):
    """(test, doc) for the first MMLU subjects, hellaswag and boolq; a limit of None = every document."""
    from parity.tasks.docs import load_docs
    from parity.tasks.registry import TESTS

    tests = [t for t in TESTS if t.startswith("mmlu_")][:n_mmlu_subjects]
    limits = {t: n_mmlu for t in tests} | {"hellaswag": n_hellaswag, "boolq": n_boolq}
    docs = []
    for test, n in limits.items():
        if n != 0:
            docs += [(test, d) for d in load_docs(test, data_dir, limit=n).docs]
    return docs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--size", default="7b-mini")
    ap.add_argument("--tokenizer", help="tokenizer.model (default: ../shared's Llama-2 one when present)")
    ap.add_argument("--data-dir", help="real data (default: ../shared/data when present, else bundled samples)")
    ap.add_argument("--mmlu-subjects", type=int, default=10)
    ap.add_argument("--mmlu", type=int, default=10, help="docs per MMLU subject")
    ap.add_argument("--hellaswag", type=int, default=20)
    ap.add_argument("--boolq", type=int, default=20)
    ap.add_argument("--lm-eval-batch-size", default="1", help="lm-eval's --batch_size (its default is 1)")
    ap.add_argument("--batch-size", default="auto", help="parity's batch size")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--full-mmlu-boolq", action="store_true", help="every MMLU and BoolQ document, no hellaswag")
    ap.add_argument("--hf-tokenizer", default=None, help="HF tokenizer form of the converted directory")
    a = ap.parse_args()
    if a.full_mmlu_boolq:
        a.mmlu_subjects, a.mmlu, a.boolq, a.hellaswag = 57, None, None, 0

    repo = Path(__file__).resolve().parents[1]
    shared = repo.parent / "shared" / "data"
    tok = a.tokenizer or (shared / "tokenizers" / "llama2-tokenizer.model" if shared.is_dir() else None)
    data_dir = a.data_dir or (str(shared) if shared.is_dir() else None)

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from parity.backends.hf import HFBackend
    from parity.checkpoints.convert import convert
    from parity.checkpoints.hf_tokenizer import DEFAULT_FORM, write_tokenizer_files
    from parity.checkpoints.synthetic import cached_checkpoint
    from parity.config import code_digest
    from parity.io import cache_dir
    from parity.tasks.tokenize import build_requests

    meta = cached_checkpoint(a.size, tokenizer=tok)
    form = a.hf_tokenizer or DEFAULT_FORM
    hf_dir = cache_dir() / "bench" / f"{meta.parent.name}-hf-{code_digest('checkpoints/*.py')}-{form}"
    if not hf_dir.is_dir():
        convert("meta", "hf", meta, hf_dir)
        if form != DEFAULT_FORM:
            write_tokenizer_files(meta / "tokenizer.model", hf_dir, 4096, form)
    tested = pairs_from_tasks(data_dir, a.mmlu_subjects, a.mmlu, a.hellaswag, a.boolq)
    docs = [d for _, d in tested]
    pairs = [p for d in docs for p in d.requests]
    where = [(t, d.doc_id, i) for t, d in tested for i in range(len(d.requests))]
    print(f"checkpoint {hf_dir} ({a.size}, tokenizer {tok or 'project default'}, HF form {form}); "
          f"data {data_dir or 'samples'}; "
          f"{len(docs)} docs, {len(pairs)} (context, continuation) pairs; torch threads {torch.get_num_threads()}")

    lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", add_bos_token=True,
              batch_size=int(a.lm_eval_batch_size) if a.lm_eval_batch_size.isdigit() else a.lm_eval_batch_size)
    ours = HFBackend(hf_dir, dtype="fp32")
    bs = int(a.batch_size) if a.batch_size.isdigit() else a.batch_size

    def run_lmeval():
        inst = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
        return lm.loglikelihood(inst, disable_tqdm=True)

    def run_parity():
        reqs = [r for doc in build_requests(docs, meta / "tokenizer.model") for r in doc]
        return reqs, ours.loglikelihood(reqs, bs)

    times = {"lm-eval": [], "parity": []}
    for i in range(a.repeats):
        for name, fn in (("lm-eval", run_lmeval), ("parity", run_parity))[:: 1 if i % 2 == 0 else -1]:
            t = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t)
            if name == "lm-eval":
                theirs = out
            else:
                reqs, scores = out

    # Tokens actually scored (context + continuation, as each side fed them) for tokens/s.
    lm_ids = [lm._encode_pair(c, x) for c, x in pairs]
    lm_tokens = sum(len(c) + len(x) for c, x in lm_ids)
    our_tokens = sum(len(r.context) + len(r.continuation) for r in reqs)
    same = [i for i, (r, (c, x)) in enumerate(zip(reqs, lm_ids))
            if list(r.context) == list(c) and list(r.continuation) == list(x)]
    diffs = [abs(s.loglik - t[0]) for s, t in zip(scores, theirs)]
    same_diffs = [diffs[i] for i in same]
    t_lm, t_us = statistics.median(times["lm-eval"]), statistics.median(times["parity"])
    print(f"lm-eval HFLM (batch {a.lm_eval_batch_size}): {t_lm:.2f} s median of {times['lm-eval']}, "
          f"{lm_tokens / t_lm:.0f} tokens/s")
    print(f"parity hf    (batch {a.batch_size}): {t_us:.2f} s median of {times['parity']}, "
          f"{our_tokens / t_us:.0f} tokens/s")
    print(f"speed-up: {t_lm / t_us:.2f}x")
    print(f"requests tokenized differently by lm-eval (HF tokenizer) and parity (sentencepiece): "
          f"{len(pairs) - len(same)} of {len(pairs)}")
    print(f"max |loglik diff| over {len(same)}/{len(pairs)} requests with identical ids: "
          f"{max(same_diffs) if same_diffs else float('nan'):.2e}")
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    print(f"max |loglik diff| over all {len(pairs)} requests: {diffs[worst]:.2e} "
          f"({where[worst][0]} doc {where[worst][1]} choice {where[worst][2]}); "
          f"above 1e-4: {sum(d > 1e-4 for d in diffs)}, above 1e-3: {sum(d > 1e-3 for d in diffs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
