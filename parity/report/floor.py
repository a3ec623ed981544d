"""The noise floor in the report: how far each stack moves under perturbations that leave the math unchanged
(parity.floor), and each cross-stack difference judged against it.

Per (size, backend, test) the floor compares the plain run's per-sample file with each perturbation's
(RUN/floor/<perturbation>/...): max and mean |delta loglik| over every (choice, perturbation) pair, and the
documents whose prediction flips under any perturbation. Per cross-stack comparison (reference vs other):
the floor is the larger of the two stacks' floors; a flipped document is "within floor" when it also flips
under a perturbation of either stack; ratio = cross-stack max |delta| / floor max |delta| (None when the
floor is exactly 0 and the stacks differ: no perturbation moved anything, any difference is above it).
The pure functions here take per-sample rows; floor_section reads the files.
"""

from __future__ import annotations

import math

from parity.report import metrics
from parity.results import RunLayout, UnitRecord, UnitStatus, unit_key


def floor_of(base: list[dict], perturbed: dict[str, list[dict]]) -> dict | None:
    """One stack's floor on one test: base rows against each perturbation's rows (None: no perturbation)."""
    if not perturbed:
        return None
    by_p, flipped, total, n, worst = {}, set(), 0.0, 0, 0.0
    for p, rows in perturbed.items():
        c = metrics.compare(base, rows)
        by_p[p] = {"max_abs_delta": c["max_abs_delta"], "mean_abs_delta": c["mean_abs_delta"], "flips": c["flips"]}
        flipped.update(c["flipped_docs"])
        if c["n_deltas"]:
            total += c["mean_abs_delta"] * c["n_deltas"]
            n += c["n_deltas"]
            worst = max(worst, c["max_abs_delta"])
    return {"max_abs_delta": worst, "mean_abs_delta": total / n if n else None,
            "flipped_docs": sorted(flipped, key=_doc_order), "by_perturbation": by_p}


def judge_against_floor(cross: dict, ref_floor: dict | None, other_floor: dict | None) -> dict:
    """A cross-stack comparison (metrics.compare) against the two stacks' floors: the numbers a comparison
    gains (all None without a floor)."""
    floors = [f for f in (ref_floor, other_floor) if f is not None]
    if not floors or cross.get("max_abs_delta") is None:
        return {"floor_max_abs_delta": None, "floor_mean_abs_delta": None, "floor_ratio": None,
                "flips_within_floor": [], "flips_beyond_floor": list(cross.get("flipped_docs") or [])
                if floors else [], "above_floor": None}
    fmax = max(f["max_abs_delta"] for f in floors)
    means = [f["mean_abs_delta"] for f in floors if f["mean_abs_delta"] is not None]
    noisy = set().union(*(f["flipped_docs"] for f in floors))
    within = [d for d in cross["flipped_docs"] if d in noisy]
    beyond = [d for d in cross["flipped_docs"] if d not in noisy]
    dmax = cross["max_abs_delta"]
    ratio = dmax / fmax if fmax > 0 else (0.0 if dmax == 0 else None)
    return {"floor_max_abs_delta": fmax, "floor_mean_abs_delta": max(means) if means else None,
            "floor_ratio": ratio, "flips_within_floor": within, "flips_beyond_floor": beyond,
            "above_floor": bool(beyond) or dmax > fmax}


def ratio_text(c: dict) -> str:
    r = c.get("floor_ratio")
    if r is None:
        return "-" if c.get("floor_max_abs_delta") is None else "inf (floor 0)"
    return f"{r:.3g}"


def floor_section(run_dir, manifest: dict, report: dict, rows: dict) -> dict | None:
    """report["floor"] (None when the run has no floor units); adds the floor numbers to every comparison."""
    floor = manifest.get("floor") or {}
    perts = list(floor.get("perturbations") or [])
    if not perts:
        return None
    from parity.floor import PERTURBATIONS
    from parity.report.build import read_samples

    layout, stored = RunLayout(run_dir), floor.get("units") or {}
    base_inputs = floor.get("base_inputs")
    plain = manifest.get("units") or {}
    per: dict = {}
    for (s, b, t), base in rows.items():
        if base is None:
            continue
        perturbed = {}
        for p in perts:
            key = f"{unit_key(s, b, t)}/{p}"
            rec, path = stored.get(key), layout.samples(s, b, t, p)
            # measured against another plain unit (the checkpoint changed since, a run without --noise-floor
            # rescored it): stale, left out
            stale = base_inputs is not None and base_inputs.get(key) != (plain.get(unit_key(s, b, t)) or {}).get("inputs")
            if rec and not stale and UnitRecord.from_json(rec).status is UnitStatus.DONE and path.is_file():
                perturbed[p] = read_samples(path)
        f = floor_of(base, perturbed)
        if f is not None:
            per.setdefault(s, {}).setdefault(b, {})[t] = f
    ref = report["reference"]
    summary: dict = {}
    for s in report["sizes"]:
        for o in report["others"]:
            ratios, fmaxes, within, beyond = [], [], 0, 0
            for t, c in report["comparisons"][s][o].items():
                if "flipped_docs" not in c:
                    continue
                j = judge_against_floor(c, per.get(s, {}).get(ref, {}).get(t), per.get(s, {}).get(o, {}).get(t))
                c.update(j)
                if j["floor_max_abs_delta"] is not None:
                    fmaxes.append(j["floor_max_abs_delta"])
                    ratios.append(math.inf if j["floor_ratio"] is None else j["floor_ratio"])
                    within += len(j["flips_within_floor"])
                    beyond += len(j["flips_beyond_floor"])
            worst = max(ratios) if ratios else None
            summary.setdefault(s, {})[o] = {
                "floor_max_abs_delta": max(fmaxes) if fmaxes else None,
                "worst_ratio": None if worst is None or math.isinf(worst) else worst,
                "zero_floor_exceeded": worst is not None and math.isinf(worst),
                "flips_within_floor": within, "flips_beyond_floor": beyond, "n_tests": len(ratios)}
    return {"perturbations": {p: PERTURBATIONS[p].what if p in PERTURBATIONS else p for p in perts},
            "per": per, "summary": summary}


def _doc_order(doc_id: str):
    return (0, int(doc_id), "") if doc_id.isdigit() else (1, 0, doc_id)


def floor_lines(report: dict) -> list[str]:
    """Markdown: the perturbations, then per size and backend pair the tests with the floor beside the
    cross-stack numbers."""
    floor = report.get("floor")
    if not floor:
        return []
    ref = report["reference"]
    out = ["## Noise floor", "",
           "Each stack re-scored under perturbations that leave the mathematics unchanged: "
           + "; ".join(f"{p} ({what})" for p, what in floor["perturbations"].items())
           + ". floor = max |delta loglik| of either stack against itself; ratio = cross-stack max |delta| / floor;"
             " a cross-stack flip is within floor when the document also flips under a perturbation."]
    for s in report["sizes"]:
        for o in report["others"]:
            out += ["", f"### {s}: {ref} vs {o}", "",
                    "| test | max abs delta | floor max | floor mean | ratio | flips | within floor | beyond floor |",
                    "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
            for t, c in report["comparisons"][s][o].items():
                if c.get("floor_max_abs_delta") is None and c.get("max_abs_delta") is None:
                    continue
                out.append(f"| {t} | {_sci(c.get('max_abs_delta'))} | {_sci(c.get('floor_max_abs_delta'))} | "
                           f"{_sci(c.get('floor_mean_abs_delta'))} | {ratio_text(c)} | {c.get('flips', '-')} | "
                           f"{_docs(c.get('flips_within_floor'))} | {_docs(c.get('flips_beyond_floor'))} |")
    return out + per_stack_lines(report)


def per_stack_lines(report: dict) -> list[str]:
    """Markdown: each stack's own floor per test (the comparisons above show the larger of two)."""
    out = []
    for s, by_backend in ((report.get("floor") or {}).get("per") or {}).items():
        backends = [b for b in report["backends"] if b in by_backend]
        tests = [t for t in report["tests"] if any(t in by_backend[b] for b in backends)]
        out += ["", f"### {s}: each stack's floor", "",
                "max |delta loglik| / mean over the perturbations, and the documents that flip under one.", "",
                "| test | " + " | ".join(backends) + " |", "| --- |" + " ---: |" * len(backends)]
        for t in tests:
            cells = []
            for b in backends:
                f = by_backend[b].get(t)
                cells.append("-" if f is None else f"{_sci(f['max_abs_delta'])} / {_sci(f['mean_abs_delta'])}"
                             + (f" ({len(f['flipped_docs'])} flip: {_docs(f['flipped_docs'])})" if f["flipped_docs"] else ""))
            out.append(f"| {t} | " + " | ".join(cells) + " |")
    return out



def _sci(v) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.2e}")


def _docs(ids) -> str:
    if not ids:
        return "-"
    return ", ".join(ids[:6]) + (f" (+{len(ids) - 6})" if len(ids) > 6 else "")
