"""Distance to exact arithmetic: every backend of a run against an fp64 run of the same requests (the judge).

Two stacks that differ say nothing about which one is right; an fp64 run of the reference stack is
(nearly) exact arithmetic, so each backend's |delta loglik| against it says how far that stack, in the run's
dtype, is from exact, and flips against it say which predictions rounding alone changed. The judge is
another run directory (`parity report RUN --judge FP64_RUN`, `parity run ... --judge FP64_RUN`): the same
sizes and tests scored in fp64; requests are matched by hash, so only the same token ids are compared.

Not exact everywhere: the stacks keep fp32 islands in fp64 (Meta's RMSNorm, rotary, softmax and its final
`.float()` of the logits; HF's RMSNorm and rotary angles; megatron-core's rotary angles). Their rounding
(~1e-7 relative) is far below bf16's or fp16's, and about that of an fp32 run's own (docs/architecture.md).
"""

from __future__ import annotations

import math
from pathlib import Path

from parity.errors import UserError
from parity.report import metrics
from parity.results import RunLayout


def judge_section(report: dict, rows: dict, judge_dir, backend: str | None = None) -> dict:
    """report["judge"]: per size and backend of the run, its distance to the judge's fp64 scores
    (rows: (size, backend, test) -> the run's per-sample rows, None where the unit has none)."""
    from parity.report.build import read_samples

    judge_dir = Path(judge_dir)
    backend = check_judge(judge_dir, backend)
    layout = RunLayout(judge_dir)
    per: dict = {}
    compared = 0
    for s in report["sizes"]:
        for b in report["backends"]:
            tests, deltas_sum, n_deltas, max_d, flips, docs, unmatched = {}, 0.0, 0, None, 0, 0, 0
            absent = []
            for t in report["tests"]:
                jpath = layout.samples(s, backend, t)
                mine = rows.get((s, b, t))
                if mine is None:
                    continue
                if not jpath.is_file():
                    absent.append(t)
                    continue
                c = metrics.compare(read_samples(jpath), mine)
                if not c["n_deltas"]:
                    unmatched += c["unmatched_choices"]
                    absent.append(t)
                    continue
                tests[t] = {k: c[k] for k in ("flips", "flipped_docs", "max_abs_delta", "mean_abs_delta", "n_docs")}
                deltas_sum += c["mean_abs_delta"] * c["n_deltas"]
                n_deltas += c["n_deltas"]
                max_d = c["max_abs_delta"] if max_d is None else max(max_d, c["max_abs_delta"])
                flips += c["flips"]
                docs += c["n_docs"]
                unmatched += c["unmatched_choices"]
            compared += len(tests)
            per.setdefault(s, {})[b] = {
                "mean_abs_delta": deltas_sum / n_deltas if n_deltas else None, "max_abs_delta": max_d,
                "flips": flips, "n_docs": docs, "n_deltas": n_deltas, "unmatched_choices": unmatched,
                "not_in_judge": absent, "tests": tests}
    if not compared:
        raise UserError(f"{judge_dir}: the judge run scored none of this run's requests (other sizes, tests, "
                        f"data or tokenizer?); run it with the same --sizes, --tests and --data-dir")
    closest = {}
    for s, by_b in per.items():
        ranked = sorted((v["mean_abs_delta"], b) for b, v in by_b.items() if v["mean_abs_delta"] is not None)
        closest[s] = ranked[0][1] if ranked else None
    return {"run": str(judge_dir), "backend": backend, "dtype": report["run"].get("dtype"), "per": per,
            "closest": closest}


def check_judge(judge_dir, backend: str | None = None) -> str:
    """The judge run must be an fp64 run holding `backend` (default: its reference); returns the backend.
    `parity run --judge` calls it before scoring anything."""
    from parity.report.build import load_manifest

    jm = load_manifest(Path(judge_dir))
    backend = backend or jm["reference"]
    if jm.get("dtype") != "fp64":
        raise UserError(f"{judge_dir}: the judge run is {jm.get('dtype')}, not fp64; make one with "
                        f"`parity run --dtype fp64 --backends {backend} ...` on the same sizes and tests")
    if backend not in jm["backends"]:
        raise UserError(f"{judge_dir}: the judge run has no {backend!r} backend (it has {', '.join(jm['backends'])})")
    return backend


def judge_lines(judge: dict) -> list[str]:
    """Markdown: one table row per (size, backend)."""
    if not judge:
        return []
    out = [f"## Distance to exact (judge: {judge['backend']} fp64, `{judge['run']}`)", "",
           f"Each backend in {judge['dtype']} against the judge's fp64 log-likelihoods of the same requests: "
           f"mean and max |delta loglik| (nats) and predictions that differ from fp64's.", "",
           "| size | backend | mean abs delta | max abs delta | flips vs fp64 | docs |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
    for s, by_b in judge["per"].items():
        for b, v in by_b.items():
            mark = " (closest)" if judge["closest"].get(s) == b else ""
            out.append(f"| {s} | {b}{mark} | {_sci(v['mean_abs_delta'])} | {_sci(v['max_abs_delta'])} | "
                       f"{v['flips']} | {v['n_docs']} |")
    missing = sorted({t for by_b in judge["per"].values() for v in by_b.values() for t in v["not_in_judge"]})
    if missing:
        out += ["", f"Not in the judge run ({len(missing)} tests): {', '.join(missing[:10])}"
                    f"{' ...' if len(missing) > 10 else ''}"]
    return out


def _sci(v) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.2e}" if math.isfinite(v) else str(v))
