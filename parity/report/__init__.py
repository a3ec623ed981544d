"""The reporter: stored per-sample results -> percent-error tables, explanations, plots.

Public API (what `parity run` and `parity check` use):
    build_report(run_dir, reference=None) -> dict      everything report.json holds
    render_markdown(report, details=True) -> str        the four suite tables + explanations
    write_report(run_dir, report, formats=("md", "json"), plots=True) -> list[Path]

report.json (= the dict), keys in manifest order:
    reference, sizes, backends, others (non-reference backends), suites, tests, mmlu_groups
    units[size][backend][test]        status (done | failed | no data | missing | not run), score, n_docs,
                                      error, file (the per-sample file it was computed from)
    comparisons[size][other][test]    ref_score, score, pct_error (None: see note), note, files, n_docs,
                                      flips, flipped_docs, discordant [b, c], p_mcnemar, max_abs_delta,
                                      mean_abs_delta, n_deltas, unmatched_docs, unmatched_choices
    mean_error[size][other]           mean, n_tests, n_with_error, excluded {test: note}
    tables[other][suite]              suite_tables' rows: test label, values {size: pct}, cells {size: text}
    histograms                        log10_edges + per other: zeros, counts (|delta loglik| per choice)
    missing                           units without a score, grouped; plots {other: {heatmap, deltas}}
    tokenizer_mismatches[size][backend][test]  requests whose ids differ between the backend's own tokenizer
                                      and the scored ids; tokenizers[size][backend]: status, tokenizer,
                                      examples (parity.tokenizer_check.in_run.report_section)
"""

from __future__ import annotations

from pathlib import Path

from parity.report.build import REPORT_FORMAT, build_report
from parity.report.render import render_csv, render_markdown

FORMATS = ("md", "json", "csv")

__all__ = ["REPORT_FORMAT", "build_report", "render_markdown", "render_csv", "write_report", "FORMATS"]


def write_report(run_dir, report: dict, formats=("md", "json"), plots: bool = True) -> list[Path]:
    """Write RUN/report.{md,json,csv} (and RUN/plots/*.png) atomically; returns the paths written.
    Plots are drawn first so that the markdown and json link only to files that exist."""
    from parity.io import atomic_file, write_json

    run_dir = Path(run_dir)
    written = []
    if plots and "md" in formats:
        from parity.report.plots import write_plots

        report["plots"] = write_plots(report, run_dir)
        written += [run_dir / p for pair in report["plots"].values() for p in pair.values()]
    else:
        report["plots"] = {}
    if "json" in formats:
        write_json(run_dir / "report.json", report)
        written.append(run_dir / "report.json")
    if "md" in formats:
        with atomic_file(run_dir / "report.md") as f:
            f.write(render_markdown(report))
        written.append(run_dir / "report.md")
    if "csv" in formats:
        with atomic_file(run_dir / "report.csv") as f:
            f.write(render_csv(report))
        written.append(run_dir / "report.csv")
    return written
