"""`parity report RUN`: write report.md / .json / .csv (+ plots) from stored results, print the tables."""

from __future__ import annotations

import sys

from parity.errors import UserError
from parity.report import FORMATS, build_report, render_markdown, write_report


def parse_formats(text: str | None) -> tuple[str, ...]:
    wanted = tuple(dict.fromkeys(f.strip() for f in (text or "md,json").split(",") if f.strip()))
    bad = [f for f in wanted if f not in FORMATS]
    if bad or not wanted:
        raise UserError(f"--format {text!r}: unknown format {', '.join(bad) or '(empty)'}; "
                        f"choose from {','.join(FORMATS)}")
    return wanted


def cli_report(args) -> int:
    formats = parse_formats(args.format)
    report = build_report(args.run_dir, reference=args.reference, judge=getattr(args, "judge", None),
                          judge_backend=getattr(args, "judge_backend", None))
    paths = write_report(args.run_dir, report, formats=formats, plots=not args.no_plots)
    print(render_markdown(report, details=False), end="")
    for p in paths:
        print(f"parity report: wrote {p}", file=sys.stderr)
    return 0
