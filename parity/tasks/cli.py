"""`parity tasks`: which tests exist, where their data comes from, how many documents were found.

Only reads and validates the files (no prompts, no lm-eval import), so it stays fast.
"""

from __future__ import annotations

import json

from parity.tasks.docs import count_docs
from parity.tasks.registry import SUITES, get_spec, resolve_tests


def task_rows(tests: list[str] | None = None, data_dir=None, skip_bad: bool = False) -> list[dict]:
    rows = []
    for test_id in resolve_tests(tests, data_dir=data_dir):
        source, n, n_bad = count_docs(test_id, data_dir, skip_bad=skip_bad)
        row = {"test": test_id, "suite": get_spec(test_id).suite, "source": source, "n_docs": n}
        if skip_bad:
            row["n_bad"] = n_bad
        rows.append(row)
    return rows


def cli_tasks(args) -> int:
    tests = [t for t in args.tests.split(",") if t.strip()] if args.tests else None
    rows = task_rows(tests, args.data_dir, args.skip_bad_docs)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ["test", "suite", "source", "n_docs"] + (["n_bad"] if args.skip_bad_docs else [])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) if c != "n_docs" else str(r[c]).rjust(widths[c])
                        for c in cols).rstrip())
    missing = sum(r["source"].startswith("no data") for r in rows)
    per_suite = {s: sum(r["suite"] == s for r in rows) for s in SUITES}
    print(f"\n{len(rows)} tests ({', '.join(f'{SUITES[s]} {n}' for s, n in per_suite.items() if n)}); "
          f"{missing} without data" + ("; data: bundled samples" if args.data_dir is None else ""))
    return 0
