"""Benchmark: `parity report` / `parity check` work on a run the size of a real one.

    python bench/report_speed.py [--data-dir ../shared/data] [--workdir DIR] [--repeats 3]

Writes a synthetic run directory shaped like a real `parity run` (manifest + per-sample files): three
sizes, backends meta (reference) / hf / megatron, all 80 tests with the document counts of the
published datasets (37,166 documents per size and backend; read from --data-dir with `parity tasks`'
own counting). Log-likelihoods come from a seeded RNG (hf: ~1e-6 noise, megatron: enough to flip some
predictions). Then times build_report (every per-sample file read, 2 comparisons x 3 sizes x 80
tests) plus the check's evaluation against the default thresholds and a baseline (the report itself:
every comparison is walked, nothing moves), best of --repeats, as wall and CPU time (the CPU time
says more on a shared machine). Megatron's noise fails the mean-error gate on some sizes, as a broken
conversion would. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

SIZES = ("7b", "13b", "70b")
BACKENDS = ("meta", "hf", "megatron")
NOISE = {"meta": 0.0, "hf": 1e-6, "megatron": 0.05}
# choices per document by suite (BigBench tasks vary, 2 to ~7; 4 is typical)
CHOICES = {"bigbench": 4, "xcopa": 2, "mmlu": 4}
CHOICES_LM_EVAL = {"boolq": 2, "hellaswag": 4, "piqa": 2, "winogrande": 2}
UNDO_SUBTASKS = ("reorder_byswap", "reorder_chars", "reorder_words")  # 3 x 100 documents


def document_counts(data_dir: Path) -> dict[str, int]:
    from parity.tasks.docs import count_docs
    from parity.tasks.registry import TESTS

    counts = {t: count_docs(t, data_dir)[1] for t in TESTS}
    if not all(counts.values()):
        raise SystemExit(f"{data_dir}: no documents for {[t for t, n in counts.items() if not n]}; "
                         "pass --data-dir with the real data")
    return counts


def write_run(run: Path, counts: dict[str, int]) -> int:
    """The run directory; returns the number of per-sample lines written."""
    from parity import RESULTS_FORMAT
    from parity.tasks.registry import MMLU_GROUPS, SUITES, TESTS

    n_lines, units = 0, {}
    for size in SIZES:
        for test, n_docs in counts.items():
            spec = TESTS[test]
            k = CHOICES_LM_EVAL.get(test) or CHOICES[spec.suite]
            base = random.Random(f"{size}/{test}")  # the same documents for every backend
            docs = []
            for i in range(n_docs):
                ll = [base.uniform(-8.0, -1.0) for _ in range(k)]
                gold = base.randrange(k)
                ll[gold] += base.uniform(0.0, 1.5)
                doc_id = f"{UNDO_SUBTASKS[i // 100]}/{i % 100}" if test == "bigbench_undo_permutation" else str(i)
                hashes = [hashlib.sha256(f"{size}/{test}/{i}/{j}".encode()).hexdigest()[:16] for j in range(k)]
                docs.append((doc_id, hashes, ll, gold))
            for backend in BACKENDS:
                jitter = random.Random(f"{size}/{backend}/{test}")
                path = run / size / backend / f"{test}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    for doc_id, hashes, ll, gold in docs:
                        ll = [x + jitter.gauss(0.0, NOISE[backend]) for x in ll] if NOISE[backend] else ll
                        row = {"doc_id": doc_id, "request_hashes": hashes, "loglik": ll, "is_greedy": [False] * k,
                               "n_tokens": [3] * k, "gold": [gold] if spec.suite == "bigbench" else gold,
                               "pred": max(range(k), key=lambda j: (ll[j], -j))}
                        if spec.suite == "bigbench":
                            row["scores"] = [1.0 if j == gold else 0.0 for j in range(k)]
                        f.write(json.dumps(row) + "\n")
                n_lines += n_docs
                units[f"{size}/{backend}/{test}"] = {"status": "done", "error": None, "seconds": 1.0, "inputs": "x"}
    manifest = {
        "format": RESULTS_FORMAT, "parity_version": "bench", "created": "2024-01-01T00:00:00+00:00",
        "command": ["parity", "run"], "git_revision": None, "versions": {}, "reference": "meta",
        "sizes": list(SIZES), "backends": list(BACKENDS), "dtype": "fp32", "device": "cpu", "samples": False,
        "suites": dict(SUITES),
        "tests": {t: {"suite": TESTS[t].suite, "name": TESTS[t].name, "group": TESTS[t].group,
                      "source": "bench", "n_docs": n, "n_bad": 0} for t, n in counts.items()},
        "mmlu_groups": dict(MMLU_GROUPS), "checkpoints": {}, "units": units, "timings": {},
    }
    (run / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return n_lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                    help="real data for the document counts (default: ../shared/data beside the repo)")
    ap.add_argument("--workdir", help="where the synthetic run is written (default: a temp dir, removed)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    from parity.report.build import build_report
    from parity.report.check import DEFAULT_THRESHOLDS, evaluate

    counts = document_counts(Path(a.data_dir))
    with tempfile.TemporaryDirectory(prefix="parity-report-speed-") as tmp:
        run = Path(a.workdir or tmp) / "run"
        t = time.perf_counter()
        n_lines = write_run(run, counts)
        print(f"synthetic run: {len(SIZES)} sizes x {len(BACKENDS)} backends x {len(counts)} tests, "
              f"{sum(counts.values())} documents per size and backend, {n_lines} per-sample lines "
              f"({time.perf_counter() - t:.1f} s to write)")
        walls, cpus = [], []
        for _ in range(a.repeats):
            t, c = time.perf_counter(), time.process_time()
            report = build_report(run)
            result = evaluate(report, DEFAULT_THRESHOLDS, baseline=report)
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        n_cmp = sum(len(per_test) for per_other in report["comparisons"].values() for per_test in per_other.values())
        print(f"build_report + check evaluation: {min(walls):.2f} s wall, {min(cpus):.2f} s CPU (best of "
              f"{a.repeats}; wall: {', '.join(f'{x:.2f}' for x in walls)}); {n_cmp} comparisons, "
              f"{len(result['failures'])} check failure(s); load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
