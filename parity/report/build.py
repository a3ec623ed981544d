"""Read a run directory (manifest + per-sample files) and compute everything the report shows.

The result is one plain dict (what report.json holds): scores per size / backend / test, percent
error of every non-reference backend against the reference, the explanations (flips, |delta
loglik|, McNemar p), the seed's tables with MMLU folded into its four supercategories, the mean
errors, and a list of the pieces that are missing. It never loads a model or task data.
"""

from __future__ import annotations

import json
from pathlib import Path

from parity import RESULTS_FORMAT, __version__
from parity.errors import UserError
from parity.io import read_json
from parity.report import metrics

REPORT_FORMAT = 1  # layout of report.json; `parity check --baseline` refuses other values

REQUIRED_FIELDS = ("doc_id", "request_hashes", "loglik", "pred", "gold")
MANIFEST_KEYS = ("reference", "sizes", "backends", "tests", "suites")


def load_manifest(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: results directory not found; pass the directory `parity run` wrote")
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise UserError(f"{path}: not found; {run_dir} is not a parity results directory")
    m = read_json(path, "manifest")
    if not isinstance(m, dict) or m.get("format") != RESULTS_FORMAT:
        fmt = m.get("format") if isinstance(m, dict) else None
        raise UserError(f"{path}: results from an incompatible version of parity (format {fmt}, this parity "
                        f"reads {RESULTS_FORMAT}); rerun `parity run` or use the parity version that wrote it")
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise UserError(f"{path}: manifest lacks {', '.join(missing)}; the run directory is damaged, rerun it")
    return m


def read_samples(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {n} is not valid JSON ({e.msg}); rerun the unit "
                                f"(delete the file and run `parity run` again)") from None
            lack = [k for k in REQUIRED_FIELDS if k not in row] if isinstance(row, dict) else ["everything"]
            if lack:
                raise UserError(f"{path}: line {n} lacks {', '.join(lack)}; not a per-sample file of this parity")
            rows.append(row)
    return rows


def _unit(run_dir: Path, manifest: dict, size: str, backend: str, test: str) -> tuple[dict, list | None]:
    """Status, score and rows of one (size, backend, test); missing pieces say why."""
    rel = f"{size}/{backend}/{test}.jsonl"
    info = (manifest.get("units") or {}).get(f"{size}/{backend}/{test}") or {}
    status = info.get("status")
    path = run_dir / rel
    out = {"status": status or "missing", "score": None, "n_docs": 0, "error": info.get("error"), "file": rel}
    if status == "no data":
        detail = str(out["error"] or manifest["tests"][test].get("source") or "")
        out["error"] = detail[len("no data"):].lstrip(": ") if detail.startswith("no data") else detail
        return out, None
    if status == "failed":
        return out, None
    if status in (None, "done") and path.is_file():
        rows = read_samples(path)
        out.update(status="done", score=metrics.test_score(rows), n_docs=len(rows))
        return out, rows
    if status == "done":
        out.update(status="missing", error=f"per-sample file {rel} not found")
    elif status not in (None, "missing"):
        out.update(status="not run", error=f"unit status {status!r} (run interrupted? run it again)")
    else:
        out["error"] = "not in this run"
    return out, None


def _note(ref: dict, oth: dict, reference: str, other: str) -> str | None:
    """Why a comparison has no percent error (None when it has one)."""
    if "no data" in (ref["status"], oth["status"]):
        return "no data"
    for u, who in ((ref, reference), (oth, other)):
        if u["status"] != "done":
            return f"{u['status']} ({who})"
        if u["score"] is None:
            return f"no documents ({who})"
    if ref["score"] == 0:
        return "n/a (ref 0)"
    return None


def _missing(units: dict, sizes: list, backends: list, tests: list) -> list[dict]:
    """Units without a score, grouped by (size, backend, status, detail): a backend that failed on
    all 80 tests is one line, not 80."""
    groups: dict = {}
    for s in sizes:
        for b in backends:
            for t in tests:
                u = units[s][b][t]
                if u["status"] != "done":
                    groups.setdefault((s, b, u["status"], u["error"] or ""), []).append(t)
    out = []
    for (s, b, status, detail), ts in groups.items():
        what = f"all {len(tests)} tests" if len(ts) == len(tests) and len(tests) > 1 else ", ".join(ts)
        out.append({"size": s, "backend": b, "tests": ts, "what": what, "status": status, "detail": detail})
    return out


def fmt_pct(v: float | None, note: str | None = None) -> str:
    if v is None:
        return note or "n/a"
    return f"{v:.2f}%"


def build_report(run_dir, reference: str | None = None) -> dict:
    run_dir = Path(run_dir)
    m = load_manifest(run_dir)
    reference = reference or m["reference"]
    sizes, backends, tests = list(m["sizes"]), list(m["backends"]), list(m["tests"])
    if reference not in backends:
        raise UserError(f"{run_dir / 'manifest.json'}: reference backend {reference!r} is not in this run "
                        f"(backends: {', '.join(backends)}); pass --reference with one of them")
    others = [b for b in backends if b != reference]

    units, rows = {}, {}
    for s in sizes:
        for b in backends:
            for t in tests:
                info, rows[(s, b, t)] = _unit(run_dir, m, s, b, t)
                units.setdefault(s, {}).setdefault(b, {})[t] = info

    comparisons, mean_error, histograms = {}, {}, {}
    missing = _missing(units, sizes, backends, tests)
    for o in others:
        histograms[o] = metrics.empty_histogram()
    for s in sizes:
        for o in others:
            per_test, excluded = {}, {}
            for t in tests:
                ref, oth = units[s][reference][t], units[s][o][t]
                note = _note(ref, oth, reference, o)
                c = {"ref_score": ref["score"], "score": oth["score"], "pct_error": None, "note": note,
                     "files": [ref["file"], oth["file"]]}
                if ref["status"] == "done" and oth["status"] == "done":
                    cmp = metrics.compare(rows[(s, reference, t)], rows[(s, o, t)])
                    histograms[o] = metrics.add_histograms(histograms[o], cmp.pop("hist"))
                    c.update(cmp)
                    c["pct_error"] = metrics.pct_error(ref["score"], oth["score"])
                if c["pct_error"] is None:
                    excluded[t] = note or "n/a"
                per_test[t] = c
            comparisons.setdefault(s, {})[o] = per_test
            errs = [per_test[t]["pct_error"] for t in tests]
            mean_error.setdefault(s, {})[o] = {
                "mean": metrics.mean_or_none(errs), "n_tests": len(tests),
                "n_with_error": sum(e is not None for e in errs), "excluded": excluded}

    report = {
        "report_format": REPORT_FORMAT,
        "results_format": m["format"],
        "parity_version": __version__,
        "run": {k: m.get(k) for k in ("parity_version", "git_revision", "command", "versions", "dtype",
                                      "device", "samples", "checkpoints")},
        "reference": reference, "sizes": sizes, "backends": backends, "others": others,
        "suites": dict(m["suites"]), "tests": m["tests"], "mmlu_groups": dict(m.get("mmlu_groups") or {}),
        "units": units, "comparisons": comparisons, "mean_error": mean_error,
        "histograms": {"log10_edges": metrics.HIST_EDGES, **histograms},
        "missing": missing, "plots": {},
    }
    report["tables"] = {o: seed_tables(report, o) for o in others}
    from parity.tokenizer_check.in_run import report_section  # "tokenizers", "tokenizer_mismatches"
    report.update(report_section(run_dir, m))
    return report


def seed_tables(report: dict, other: str) -> dict:
    """The seed's tables for one backend pair: suite -> rows (test label, value and text per size).

    MMLU subjects fold into their supercategory rows ("STEM [18]"): value = mean of the subjects'
    percent errors; when some subjects of a group have none (not run, ref 0), the text says how many
    of the group's subjects the mean covers.
    """
    sizes, tests = report["sizes"], report["tests"]
    tables = {}
    for suite in report["suites"]:
        ids = [t for t in tests if tests[t].get("suite") == suite]
        if not ids:
            continue
        out = []
        grouped = [t for t in ids if tests[t].get("group")]
        for t in ids:
            if t in grouped:
                continue
            row = {"test": tests[t].get("name") or t, "ids": [t], "values": {}, "cells": {}}
            for s in sizes:
                c = report["comparisons"][s][other][t]
                row["values"][s] = c["pct_error"]
                row["cells"][s] = fmt_pct(c["pct_error"], c["note"])
            out.append(row)
        # every supercategory gets its row once the suite is in the run: an empty group shows as
        # "n/a (0 of 12)" rather than vanishing
        group_order = list(report["mmlu_groups"]) if grouped else []
        group_order += sorted({tests[t]["group"] for t in grouped} - set(report["mmlu_groups"]))
        for g in group_order:
            members = [t for t in grouped if tests[t]["group"] == g]
            total = report["mmlu_groups"].get(g, len(members))
            row = {"test": f"{g} [{total}]", "ids": members, "values": {}, "cells": {}}
            for s in sizes:
                errs = [report["comparisons"][s][other][t]["pct_error"] for t in members]
                v = metrics.mean_or_none(errs)
                n = sum(e is not None for e in errs)
                row["values"][s] = v
                row["cells"][s] = fmt_pct(v, "n/a") + ("" if n == total else f" ({n} of {total})")
            out.append(row)
        tables[suite] = out
    return tables
