"""The first screen of `parity run`: per size and backend one line (mean error, flips, max |delta loglik|, the
noise floor and a one-word verdict), tests without a percent error grouped into one line per cause with a
count, and where the full tables are. report.md keeps the tables; this is what a terminal shows.
"""

from __future__ import annotations

from parity.report.build import fmt_pct
from parity.report.render import UNSCORED

# One word per (size, backend), the first rule that holds. ratio = max |delta loglik| across stacks / the
# larger same-stack floor (parity.report.floor); a flip "beyond the floor" is a document that flips across
# stacks but under no same-stack perturbation. What matters to a user is a changed prediction, so only
# flips beyond the floor make "differs"; log-likelihoods above the floor without such flips are "above"
# (on CPU the floor is often exactly 0: the stacks are bitwise reproducible under every perturbation).
VERDICTS = {
    "missing": "no test of this pair has a score",
    "identical": "every log-likelihood equal",
    "agrees": "(no floor measured) no prediction flips",
    "flips": "(no floor measured) some predictions flip",
    "differs": "predictions flip that no same-stack perturbation flips",
    "above": "max |delta| above the floor (ratio > 1), every flip within the floor",
    "noise": "max |delta| within the floor (ratio <= 1), every flip within the floor",
}


def pair_summary(report: dict, size: str, other: str) -> dict:
    """The numbers of one line: mean error, flips / documents, max |delta|, floor, worst ratio, verdict."""
    comps = report["comparisons"][size][other]
    scored = [c for c in comps.values() if c.get("max_abs_delta") is not None]
    flips = sum(c.get("flips") or 0 for c in scored)
    docs = sum(c.get("n_docs") or 0 for c in scored)
    dmax = max((c["max_abs_delta"] for c in scored), default=None)
    fl = ((report.get("floor") or {}).get("summary") or {}).get(size, {}).get(other) or {}
    floor, ratio = fl.get("floor_max_abs_delta"), fl.get("worst_ratio")
    beyond = fl.get("flips_beyond_floor", 0)
    if not scored:
        verdict = "missing"
    elif dmax == 0:
        verdict = "identical"
    elif floor is None:
        verdict = "flips" if flips else "agrees"
    elif beyond:
        verdict = "differs"
    elif fl.get("zero_floor_exceeded") or ratio is None or ratio > 1:
        verdict = "above"
    else:
        verdict = "noise"
    return {"mean_error": report["mean_error"][size][other]["mean"], "flips": flips, "docs": docs,
            "max_abs_delta": dmax, "floor": floor, "ratio": ratio, "zero_floor_exceeded": fl.get("zero_floor_exceeded"),
            "flips_beyond_floor": beyond, "verdict": verdict}


def no_error_groups(report: dict) -> list[dict]:
    """Scored tests without a percent error, one entry per cause: the cause, the tests per size, a count.
    (Units without a score are report["missing"], already grouped by size, backend and status.)"""
    by_note: dict = {}
    for s in report["sizes"]:
        for o in report["others"]:
            for t, note in report["mean_error"][s][o]["excluded"].items():
                if not note.startswith(UNSCORED):
                    by_note.setdefault(note, {}).setdefault(s, set()).add(t)
    return [{"note": note, "per_size": {s: sorted(ts) for s, ts in per.items()},
             "count": sum(len(ts) for ts in per.values())} for note, per in by_note.items()]


def _sci(v) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.1e}")


def summary_rows(report: dict) -> list[tuple]:
    """One row per (size, other backend): the cells of the first screen and of report.md's summary."""
    rows = []
    for s in report["sizes"]:
        for o in report["others"]:
            p = pair_summary(report, s, o)
            ratio = "inf" if p["zero_floor_exceeded"] else ("-" if p["ratio"] is None else f"{p['ratio']:.3g}")
            rows.append((s, o, fmt_pct(p["mean_error"]), f"{p['flips']}/{p['docs']}", _sci(p["max_abs_delta"]),
                         _sci(p["floor"]), ratio, p["verdict"]))
    return rows


def render_summary(report: dict, run_dir=None) -> str:
    ref, others = report["reference"], report["others"]
    run = report["run"]
    data = "bundled samples" if run.get("samples") else "real data"
    n_tests = len(report["tests"])
    lines = [f"parity: {', '.join(others) or '(no other backend)'} vs {ref}: {n_tests} tests per size, "
             f"{run.get('dtype')} on {run.get('device')}, {data}", ""]
    rows = [("size", "backend", "mean error", "flips", "max |dll|", "floor", "ratio", "verdict")]
    rows += summary_rows(report)
    shown = list(dict.fromkeys(r[7] for r in rows[1:]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 or i == 7 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    floor = report.get("floor")
    lines.append("")
    lines.append("; ".join(f"{v}: {VERDICTS[v]}" for v in shown))
    if floor:
        lines.append(f"floor = max |delta loglik| of either stack against itself under {', '.join(floor['perturbations'])};"
                     f" ratio = worst test's max |dll| / its floor")
    else:
        lines.append("no noise floor measured (run with --noise-floor to judge each difference against the same "
                     "stack's own noise)")
    groups = no_error_groups(report)
    for g in groups:
        per = ", ".join(f"{len(ts)} test{'s' if len(ts) != 1 else ''} ({s})" for s, ts in g["per_size"].items())
        lines.append(f"no percent error, {g['note']}: {per}; left out of the mean")
    for m in report["missing"]:
        lines.append(f"{m['status']}: {m['size']}/{m['backend']} ({len(m['tests'])} test"
                     f"{'s' if len(m['tests']) != 1 else ''})" + (f": {m['detail'][:160]}" if m["detail"] else ""))
    for s, by_b in (report.get("tokenizer_mismatches") or {}).items():
        for b, by_t in (by_b or {}).items():
            n = sum(v for v in (by_t or {}).values() if isinstance(v, int))
            if n:
                lines.append(f"tokenizer: {n} requests of {s}/{b} get other ids from {b}'s own tokenizer "
                             f"(report.md, Tokenizers)")
    if report.get("judge"):
        j = report["judge"]
        close = ", ".join(f"{b} ({s})" for s, b in j["closest"].items() if b)
        lines.append(f"closest to exact ({j['backend']} fp64 judge): {close}")
    if run_dir is not None:
        lines.append(f"tables, per-test numbers and the floor per test: {run_dir}/report.md")
    return "\n".join(lines) + "\n"
