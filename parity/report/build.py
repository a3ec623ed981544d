"""Read a run directory (manifest + per-sample files) and compute everything the report shows.

The result is one plain dict (what report.json holds): scores per size / backend / test, percent
error of every non-reference backend against the reference, the explanations (flips, |delta
loglik|, McNemar p), the four suite tables with MMLU folded into its four supercategories, the mean
errors, and a list of the pieces that are missing. It never loads a model or task data.
"""

from __future__ import annotations

import json
from pathlib import Path

from parity import __version__
from parity.errors import UserError
from parity.io import read_json
from parity.report import metrics
from parity.results import REQUIRED_SAMPLE_FIELDS, RunLayout, UnitRecord, UnitStatus, check_format, unit_key

REPORT_FORMAT = 1  # layout of report.json; `parity check --baseline` refuses other values

MANIFEST_KEYS = ("reference", "sizes", "backends", "tests", "suites")


def load_manifest(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: results directory not found; pass the directory `parity run` wrote")
    path = RunLayout(run_dir).manifest
    if not path.is_file():
        raise UserError(f"{path}: not found; {run_dir} is not a parity results directory")
    m = read_json(path, "manifest")
    check_format(m, path)
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise UserError(f"{path}: manifest lacks {', '.join(missing)}; the run directory is damaged, rerun it")
    return m


def read_samples(path: Path) -> list[dict]:
    """The per-sample lines of one unit. Parsed as one JSON array (a real run has ~37,000 lines per size
    and backend: one parser call instead of one per line); a damaged file is read line by line to name
    its first bad line."""
    numbered = [(n, ln) for n, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
    try:
        rows = json.loads("[" + ",".join(ln for _, ln in numbered) + "]")
    except json.JSONDecodeError:
        rows = None
    if rows is not None and len(rows) == len(numbered) and all(_complete(r) for r in rows):
        return rows
    for n, line in numbered:  # a line holding two values also lands here
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {n} is not valid JSON ({e.msg}); rerun the unit "
                            f"(delete the file and run `parity run` again)") from None
        if not _complete(row):
            lack = [k for k in REQUIRED_SAMPLE_FIELDS if k not in row] if isinstance(row, dict) else ["everything"]
            raise UserError(f"{path}: line {n} lacks {', '.join(lack)}; not a per-sample file of this parity")
    raise AssertionError("unreachable: every line parsed alone and was complete")


def _complete(row) -> bool:
    return isinstance(row, dict) and all(k in row for k in REQUIRED_SAMPLE_FIELDS)


def _unit(run_dir: Path, manifest: dict, size: str, backend: str, test: str) -> tuple[dict, list | None]:
    """Status, score and rows of one (size, backend, test); missing pieces say why."""
    layout = RunLayout(run_dir)
    rel = layout.samples_rel(size, backend, test)
    stored = (manifest.get("units") or {}).get(unit_key(size, backend, test))
    record = UnitRecord.from_json(stored) if stored else None
    status = record.status if record else None
    path = layout.samples(size, backend, test)
    out = {"status": (status or UnitStatus.MISSING).value, "score": None, "n_docs": 0,
           "error": record.error if record else None, "file": rel}
    if status is UnitStatus.NO_DATA:
        detail = str(out["error"] or manifest["tests"][test].get("source") or "")
        out["error"] = detail[len("no data"):].lstrip(": ") if detail.startswith("no data") else detail
        return out, None
    if status is UnitStatus.FAILED:
        return out, None
    if status in (None, UnitStatus.DONE) and path.is_file():
        rows = read_samples(path)
        out.update(status=UnitStatus.DONE.value, score=metrics.test_score(rows), n_docs=len(rows))
        return out, rows
    if status is UnitStatus.DONE:
        out.update(status=UnitStatus.MISSING.value, error=f"per-sample file {rel} not found")
    elif status not in (None, UnitStatus.MISSING):
        out.update(status=UnitStatus.NOT_RUN.value,
                   error=f"unit status {stored.get('status')!r} (run interrupted? run it again)")
    else:
        out["error"] = "not in this run"
    return out, None


def _note(ref: dict, oth: dict, reference: str, other: str) -> str | None:
    """Why a comparison has no percent error (None when it has one)."""
    if UnitStatus.NO_DATA in (ref["status"], oth["status"]):
        return UnitStatus.NO_DATA.value
    for u, who in ((ref, reference), (oth, other)):
        if u["status"] != UnitStatus.DONE:
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
                if u["status"] != UnitStatus.DONE:
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


def build_report(run_dir, reference: str | None = None, judge=None, judge_backend: str | None = None) -> dict:
    """judge: an fp64 run directory to measure every backend's distance to exact against (report["judge"])."""
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
                if ref["status"] == oth["status"] == UnitStatus.DONE:
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
    report["tables"] = {o: suite_tables(report, o) for o in others}
    from parity.tokenizer_check.in_run import report_section  # "tokenizers", "tokenizer_mismatches"
    report.update(report_section(run_dir, m))
    from parity.report.floor import floor_section  # the noise floor (`parity run --noise-floor`), if run

    if (floor := floor_section(run_dir, m, report, rows)) is not None:
        report["floor"] = floor
    if judge:
        from parity.report.judge import judge_section

        report["judge"] = judge_section(report, rows, judge, judge_backend)
    return report


def suite_tables(report: dict, other: str) -> dict:
    """The four suite tables (BigBench, XCOPA, lm-eval, MMLU) of one backend pair: suite -> rows (test
    label, percent error and its text per size).

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
