"""Report dict -> markdown (jinja2 template), csv rows, and the headline sentence."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from parity.report.build import fmt_pct
from parity.results import UnitStatus

TEMPLATES = Path(__file__).parent / "templates"
# notes of comparisons whose unit has no score: listed under missing pieces already, per unit
UNSCORED = tuple(s.value for s in (UnitStatus.NO_DATA, UnitStatus.FAILED, UnitStatus.MISSING, UnitStatus.NOT_RUN))


def _cell(v) -> str:
    """Markdown table cells: a '|' or a newline in an error message would break the table."""
    return " ".join(str(v).split()).replace("|", "\\|")


def _oneline(v) -> str:
    text = " ".join(str(v).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _score(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _sci(v) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.2e}")


def _pval(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _num(v) -> str:
    return "-" if v is None else str(v)


def mean_sentence(report: dict, other: str) -> str:
    """The headline of one backend pair: 'Across N tests per size, the mean error between meta and
    megatron is ...'."""
    ref, sizes = report["reference"], report["sizes"]
    per = [report["mean_error"][s][other] for s in sizes]
    n = len(report["tests"])
    parts = [f"{fmt_pct(p['mean'], 'n/a (no test has a percent error)')} ({s})" for s, p in zip(sizes, per)]
    text = f"Across {n} tests per size, the mean error between {ref} and {other} is {', '.join(parts)}."
    left_out = [f"{n - p['n_with_error']} ({s})" for s, p in zip(sizes, per) if p["n_with_error"] < n]
    if left_out:
        text += (f" Tests without a percent error are left out of the mean: {', '.join(left_out)};"
                 f" see Missing pieces.")
    return text


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(cell=_cell, oneline=_oneline, score=_score, sci=_sci, pval=_pval, num=_num,
                       pct=lambda v, note=None: fmt_pct(v, note))
    return env


def render_markdown(report: dict, details: bool = True) -> str:
    """The report as markdown: per backend pair the mean-error sentence and one table per suite
    (rows = tests, columns = sizes), the missing pieces, and (details=True) the explanations."""
    # tests scored by every backend that still have no percent error (ref 0, no documents): one line per
    # cause with a count per size and the tests named (ref 0 affects every backend pair alike)
    from parity.report.summary import no_error_groups

    no_error = no_error_groups(report)
    from parity.report.floor import floor_lines
    from parity.report.judge import judge_lines
    from parity.report.summary import summary_rows
    from parity.tokenizer_check.render import section as tokenizer_section

    text = _environment().get_template("report.md.j2").render(
        **report, details=details, no_error=no_error,
        tokenizers_md=tokenizer_section(report.get("tokenizers") or {}, report.get("tokenizer_mismatches") or {},
                                        details),
        judge_md="\n".join(judge_lines(report.get("judge") or {})),
        floor_md="\n".join(floor_lines(report)), summary=summary_rows(report),
        sentences={o: mean_sentence(report, o) for o in report["others"]})
    # Collapse the blank-line runs jinja leaves around skipped blocks: stable, tidy output.
    lines, out = text.splitlines(), []
    for line in lines:
        if line.strip() == "" and (not out or out[-1] == ""):
            continue
        out.append(line.rstrip())
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


CSV_COLUMNS = ["size", "reference", "backend", "suite", "test", "group", "ref_score", "score", "pct_error",
               "note", "flips", "max_abs_delta", "mean_abs_delta", "p_mcnemar", "n_docs", "floor_max_abs_delta",
               "floor_ratio"]


def render_csv(report: dict) -> str:
    """One row per (size, non-reference backend, test): every per-test number of the report."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for s in report["sizes"]:
        for o in report["others"]:
            for t, c in report["comparisons"][s][o].items():
                spec = report["tests"][t]
                w.writerow([s, report["reference"], o, spec.get("suite"), t, spec.get("group") or "",
                            *("" if c.get(k) is None else c.get(k) for k in CSV_COLUMNS[6:])])
    return buf.getvalue()
