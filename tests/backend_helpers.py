"""Shared pieces of the backend tests (no tests here): checkpoints, real requests, score comparison.

Requests are built from real data (../shared/data: COPA sentences and MMLU questions with single-token
answer letters) with sentencepiece on the checkpoint's own tokenizer.model, split the way lm-eval splits
(trailing context spaces move to the continuation; continuation ids = whole[len(context ids):]). This
file deliberately does not use parity.tasks: backends are tested on their own.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from parity.requests import Request, Score

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LLAMA2_TOKENIZER = SHARED_DATA / "tokenizers" / "llama2-tokenizer.model"
BOS = 1


# ---------------------------------------------------------------------------------------------- checkpoints
def meta_checkpoint(size: str, tokenizer: Path | None = None) -> Path:
    from parity.checkpoints.synthetic import cached_checkpoint

    return cached_checkpoint(size, tokenizer=tokenizer)


def converted(meta_dir: Path, fmt: str, tp: int | None = None) -> Path:
    """meta_dir converted to `fmt` (hf, megatron at `tp`) through the cache `parity run` uses: keyed by
    the Meta files and the converter's source, so a changed converter always converts afresh."""
    from parity.arch import size_from_params
    from parity.checkpoints.meta import read_params
    from parity.config import cached_conversion

    return cached_conversion(meta_dir, fmt, size_from_params(read_params(meta_dir)), tp)


# ---------------------------------------------------------------------------------------------- requests
def string_pairs(n_copa: int = 100, n_mmlu: int = 40) -> list[tuple[str, str]]:
    """(context, continuation) strings from real data (../shared/data); the test is skipped without it."""
    import pytest

    copa = SHARED_DATA / "copa" / "val.jsonl"
    mmlu = SHARED_DATA / "mmlu" / "test" / "high_school_geography_test.csv"
    for f in (copa, mmlu):
        if not f.is_file():
            pytest.skip(f"{f} not present: the backend tests score requests built from real data")
    pairs: list[tuple[str, str]] = []
    for line in copa.read_text().splitlines()[:n_copa]:
        d = json.loads(line)
        connector = {"cause": " because", "effect": " therefore"}[d["question"]]
        ctx = d["premise"].rstrip(".") + connector
        for choice in (d["choice1"], d["choice2"]):
            pairs.append((ctx, " " + choice[0].lower() + choice[1:]))
    with open(mmlu, newline="") as f:
        for row in list(csv.reader(f))[:n_mmlu]:
            q, *choices, _ = row
            ctx = q + "".join(f"\n{l}. {c}" for l, c in zip("ABCD", choices)) + "\nAnswer:"
            pairs += [(ctx, f" {l}") for l in "ABCD"]  # 4 requests sharing one context
    return pairs


def encode_pair(sp, context: str, continuation: str) -> Request:
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = sp.encode(context + continuation)
    ctx = sp.encode(context)
    return Request(tuple([BOS] + ctx), tuple(whole[len(ctx):]))


def real_requests(tokenizer: Path, **kw) -> list[Request]:
    from parity.tokenizer import load_sp

    sp = load_sp(tokenizer)
    return [encode_pair(sp, c, x) for c, x in string_pairs(**kw)]


# ---------------------------------------------------------------------------------------------- comparing
def compare(a: list[Score], b: list[Score]) -> tuple[float, float, int]:
    """(max |diff|, mean |diff|, number of differing greedy flags)."""
    diffs = [abs(x.loglik - y.loglik) for x, y in zip(a, b, strict=True)]
    flips = sum(x.is_greedy != y.is_greedy for x, y in zip(a, b))
    return max(diffs), sum(diffs) / len(diffs), flips


def read_unit_scores(requests: list[Request], output: Path) -> list[Score]:
    from parity.requests import read_scores

    by_hash = read_scores(output)
    return [by_hash[r.hash] for r in requests]


def write_job(path: Path, backend: str, checkpoint: Path, tp: int, units: dict[str, list[Request]],
              dtype: str = "fp32", batch_size="auto", **extra) -> dict[str, Path]:
    """A job file with one unit per entry of `units`; returns unit name -> output path."""
    from parity.backends import backend_info
    from parity.jobs import Job, JobUnit
    from parity.requests import write_requests

    outs, job_units = {}, []
    for name, reqs in units.items():
        req_path = path.parent / f"{path.stem}.{name}.requests.jsonl"
        write_requests(req_path, reqs)
        outs[name] = path.parent / f"{path.stem}.{name}.scores.jsonl"
        job_units.append(JobUnit(name, str(req_path), str(outs[name])))
    Job(backend=backend, adapter=backend_info(backend).adapter, checkpoint=str(checkpoint), tp=tp,
        dtype=dtype, batch_size=str(batch_size), units=job_units, **extra).write(path)
    return outs
