"""Pure functions from per-sample lines (dicts read from RUN/<size>/<backend>/<test>.jsonl) to numbers.

Nothing here reads files or knows about sizes: every number in the report is one of these functions
applied to the lines of one or two per-sample files, so a test can recompute it independently.
"""

from __future__ import annotations

import math
from collections import OrderedDict

# |delta loglik| histogram: an exact-zero bucket, then log10 bins of HIST_BIN from 1e-10 to 1e3
# (fp32 sums over a few tokens differ by ~1e-6; a broken conversion by whole nats). Values outside
# the range go to the first / last bin so the counts always add up to the number of deltas.
HIST_BIN = 0.5  # bin width in log10 units: half a decade
_HIST_LOW, _HIST_HIGH = -10, 3  # log10 of the first and the last edge
HIST_EDGES = [round(_HIST_LOW + HIST_BIN * i, 1)
              for i in range(round((_HIST_HIGH - _HIST_LOW) / HIST_BIN) + 1)]  # -10.0, -9.5, ... 3.0


def doc_score(row: dict) -> float:
    """Multiple-choice grade of one document: BigBench = target score of the predicted choice,
    elsewhere 1 if the prediction is (one of) the gold index(es), else 0."""
    pred = row["pred"]
    if row.get("scores") is not None:
        return float(row["scores"][pred])
    gold = row["gold"]
    return 1.0 if (pred in gold if isinstance(gold, list) else pred == gold) else 0.0


def doc_correct(row: dict) -> bool:
    """Binary outcome for McNemar's test. BigBench target scores may be fractional: a document
    counts as correct when the predicted choice's target score is above 0.5 (1 for ordinary MC)."""
    return doc_score(row) > 0.5


def subtask(doc_id: str) -> str | None:
    """'reorder_words/12' -> 'reorder_words'; plain ids have no subtask."""
    return doc_id.rsplit("/", 1)[0] if "/" in doc_id else None


def test_score(rows: list[dict]) -> float | None:
    """Mean doc score; for a test whose doc ids name subtasks, the mean over subtasks of the subtask
    means (BigBench's rule for undo_permutation). None for no documents."""
    if not rows:
        return None
    if not any(subtask(str(r["doc_id"])) is not None for r in rows):
        return math.fsum(doc_score(r) for r in rows) / len(rows)
    by_sub: dict = OrderedDict()
    for r in rows:
        by_sub.setdefault(subtask(str(r["doc_id"])), []).append(doc_score(r))
    return math.fsum(math.fsum(v) / len(v) for v in by_sub.values()) / len(by_sub)


def pct_error(ref: float | None, other: float | None) -> float | None:
    """|ref - other| / ref * 100; None where it is undefined (a score missing, or ref == 0)."""
    if ref is None or other is None or ref == 0:
        return None
    return abs(ref - other) / abs(ref) * 100.0


def mean_or_none(values) -> float | None:
    vals = [v for v in values if v is not None]
    return math.fsum(vals) / len(vals) if vals else None


def mcnemar_p(b: int, c: int) -> float:
    """Exact (binomial) McNemar test, two-sided: b = ref right / other wrong, c = the reverse.
    With no discordant pair there is no evidence of a difference: p = 1."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def compare(ref_rows: list[dict], other_rows: list[dict]) -> dict:
    """Explain the difference between two backends on one test.

    Documents are matched by doc_id, choices by request hash (the same tokens were scored), so the
    deltas compare like with like even if the files list documents in another order.
    """
    other_by_id = {str(r["doc_id"]): r for r in other_rows}
    ref_ids = {str(r["doc_id"]) for r in ref_rows}
    flips, b, c, n_docs = [], 0, 0, 0
    unmatched_docs = 0
    for r in ref_rows:
        o = other_by_id.get(str(r["doc_id"]))
        if o is None:
            unmatched_docs += 1
            continue
        n_docs += 1
        if r["pred"] != o["pred"]:
            flips.append(str(r["doc_id"]))
        rc, oc = doc_correct(r), doc_correct(o)
        b += rc and not oc
        c += oc and not rc
    deltas, unmatched_choices = abs_deltas(ref_rows, other_rows)
    unmatched_docs += sum(1 for i in other_by_id if i not in ref_ids)
    return {
        "n_docs": n_docs,
        "flips": len(flips),
        "flipped_docs": flips,
        "discordant": [b, c],
        "p_mcnemar": mcnemar_p(b, c),
        "n_deltas": len(deltas),
        "max_abs_delta": max(deltas) if deltas else None,
        "mean_abs_delta": math.fsum(deltas) / len(deltas) if deltas else None,
        "unmatched_docs": unmatched_docs,
        "unmatched_choices": unmatched_choices,
        "hist": histogram(deltas),
    }


def abs_deltas(ref_rows: list[dict], other_rows: list[dict]) -> tuple[list[float], int]:
    """|delta loglik| of every request both sides scored (matched by hash; a request shared by several
    documents is one number, counted once), and the number of the reference's requests the other lacks."""
    other_ll = {h: ll for r in other_rows for h, ll in zip(r["request_hashes"], r["loglik"])}
    deltas, unmatched, seen = [], 0, set()
    for r in ref_rows:
        for h, ll in zip(r["request_hashes"], r["loglik"]):
            if h in seen:
                continue
            seen.add(h)
            if h in other_ll:
                deltas.append(abs(ll - other_ll[h]))
            else:
                unmatched += 1
    return deltas, unmatched


def histogram(deltas: list[float]) -> dict:
    """Counts of |delta| in HIST_EDGES (log10) bins plus an exact-zero count; small and exact."""
    counts = [0] * (len(HIST_EDGES) - 1)
    zeros = 0
    for d in deltas:
        if d == 0:
            zeros += 1
            continue
        x = math.log10(d)
        i = int((x - HIST_EDGES[0]) // HIST_BIN)
        counts[min(max(i, 0), len(counts) - 1)] += 1
    return {"zeros": zeros, "counts": counts}


def add_histograms(a: dict, b: dict) -> dict:
    return {"zeros": a["zeros"] + b["zeros"], "counts": [x + y for x, y in zip(a["counts"], b["counts"])]}


def empty_histogram() -> dict:
    return {"zeros": 0, "counts": [0] * (len(HIST_EDGES) - 1)}
