"""Hand-built run directories for the reporter and check tests: a manifest plus per-sample jsonl files
in the layout `parity run` writes, with log-likelihoods from a seeded RNG (no model involved)."""

from __future__ import annotations

import json
import random
from pathlib import Path

SUITES = {"bigbench": "BigBench", "xcopa": "Multilingual (XCOPA)", "lm-eval": "LM Evaluation Harness",
          "mmlu": "MMLU"}
MMLU_GROUPS = {"STEM": 18, "humanities": 13, "other (business, health, misc.)": 14, "social sciences": 12}
TESTS = {
    "bigbench_date": {"suite": "bigbench", "name": "date_understanding", "group": None, "choices": 4, "bb": True},
    "bigbench_undo": {"suite": "bigbench", "name": "undo_permutation", "group": None, "choices": 3, "bb": True,
                      "subtasks": ["a", "b", "c"]},
    "xcopa_en": {"suite": "xcopa", "name": "en", "group": None, "choices": 2},
    "xcopa_et": {"suite": "xcopa", "name": "et", "group": None, "choices": 2},
    "boolq": {"suite": "lm-eval", "name": "boolq", "group": None, "choices": 2},
    "mmlu_anatomy": {"suite": "mmlu", "name": "anatomy", "group": "other (business, health, misc.)", "choices": 4},
    "mmlu_astronomy": {"suite": "mmlu", "name": "astronomy", "group": "STEM", "choices": 4},
    "mmlu_college_physics": {"suite": "mmlu", "name": "college_physics", "group": "STEM", "choices": 4},
    "mmlu_philosophy": {"suite": "mmlu", "name": "philosophy", "group": "humanities", "choices": 4},
}
SIZES = ["7b-mini", "13b-mini"]
BACKENDS = ["meta", "hf", "megatron"]
NOISE = {"meta": 0.0, "hf": 1e-6, "megatron": 0.4}  # megatron: big enough to flip some predictions


def argmax_first(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def make_rows(size: str, backend: str, test: str, n_docs: int = 24, noise: float | None = None) -> list[dict]:
    spec = TESTS[test]
    base = random.Random(f"{size}/{test}")  # same documents and reference numbers for every backend
    jitter = random.Random(f"{size}/{backend}/{test}")
    noise = NOISE[backend] if noise is None else noise
    rows = []
    for i in range(n_docs):
        k = spec["choices"]
        ll = [base.uniform(-8.0, -1.0) for _ in range(k)]
        gold = base.randrange(k)
        ll[gold] += base.uniform(0.0, 1.5)  # a model somewhat better than chance
        ll = [x + jitter.gauss(0.0, noise) if noise else x for x in ll]
        doc_id = f"{spec['subtasks'][i % 3]}/{i}" if spec.get("subtasks") else str(i)
        row = {"doc_id": doc_id, "request_hashes": [f"{test}-{size}-{i}-{j}" for j in range(k)],
               "loglik": ll, "is_greedy": [False] * k, "n_tokens": [1 + j for j in range(k)],
               "gold": gold, "pred": argmax_first(ll)}
        if spec.get("bb"):
            row["scores"] = [1.0 if j == gold else 0.0 for j in range(k)]
        rows.append(row)
    return rows


def write_rows(run: Path, size: str, backend: str, test: str, rows: list[dict]) -> None:
    p = run / size / backend / f"{test}.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(run: Path, sizes=SIZES, backends=BACKENDS, tests=None, special=None, fmt: int = 1,
             noise: dict | None = None) -> Path:
    """special: {"size/backend/test": "failed: msg" | "no data" | "missing" | list-of-rows}."""
    tests = list(tests or TESTS)
    special = dict(special or {})
    run.mkdir(parents=True, exist_ok=True)
    units = {}
    for s in sizes:
        for b in backends:
            for t in tests:
                key = f"{s}/{b}/{t}"
                sp = special.get(key)
                if isinstance(sp, str) and sp.startswith("failed"):
                    units[key] = {"status": "failed", "error": sp.split(": ", 1)[1], "seconds": None, "inputs": "x"}
                    continue
                if sp == "no data":
                    units[key] = {"status": "no data", "error": "no data: put files in D", "seconds": None,
                                  "inputs": "x"}
                    continue
                if sp == "missing":
                    continue
                rows = sp if isinstance(sp, list) else make_rows(s, b, t, noise=(noise or {}).get(b))
                write_rows(run, s, b, t, rows)
                units[key] = {"status": "done", "error": None, "seconds": 1.0, "inputs": "x"}
    manifest = {
        "format": fmt, "parity_version": "0.1.0", "created": "2024-01-01T00:00:00+00:00", "command": ["parity", "run"],
        "git_revision": None, "versions": {"torch": "2.13.0"}, "reference": "meta", "sizes": list(sizes),
        "backends": list(backends), "dtype": "fp32", "device": "cpu", "samples": True, "suites": SUITES,
        "tests": {t: {"suite": TESTS[t]["suite"], "name": TESTS[t]["name"], "group": TESTS[t]["group"],
                      "source": "samples", "n_docs": 24} for t in tests},
        "mmlu_groups": MMLU_GROUPS, "checkpoints": {}, "units": units, "timings": {},
    }
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return run


def read_rows(run: Path, size: str, backend: str, test: str) -> list[dict]:
    p = run / size / backend / f"{test}.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
