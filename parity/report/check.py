"""`parity check RUN`: the CI gate. Exit 0 pass, 1 regression (CheckFailed), 2 unusable input (UserError).

The run is re-reported from its per-sample files (report.json need not exist), then judged against
absolute thresholds and, with --baseline, against a stored report.json: the mean error per size and
backend may not rise by more than `margin` points, one test's error not by more than `test_margin`,
and a test may not gain more than `max_new_flips` flipped predictions. A unit that failed or is
missing fails the gate; a test with no data or ref == 0 is reported, never failed.
"""

from __future__ import annotations

from pathlib import Path

from parity.errors import CheckFailed, UserError
from parity.io import read_json, read_yaml_mapping
from parity.report.build import REPORT_FORMAT, build_report, fmt_pct
from parity.report.moved import moved_tests, render_moved
from parity.results import UnitStatus

# Used when neither --thresholds nor ./configs/thresholds.yaml exists (an installed parity has no
# repo checkout around it). Keep in step with configs/thresholds.yaml. None = not checked.
DEFAULT_THRESHOLDS = {
    "max_mean_error": 1.0,  # percent, per size and non-reference backend
    "max_test_error": None,  # percent, any single test
    "max_flips": None,  # flipped predictions in any single test
    "margin": 0.1,  # points the mean error may rise over the baseline
    "test_margin": 1.0,  # points one test's error may rise over the baseline
    "max_new_flips": 0,  # flips a test may gain over the baseline
    # A broken conversion can move log-likelihoods by whole nats without flipping a prediction on a
    # small sample, so the deltas are gated too: a test's max |delta loglik| may not exceed
    # delta_growth x the baseline's, nor the absolute max_abs_delta; below delta_floor nats it is noise.
    "max_abs_delta": None,  # nats, any single test
    "delta_growth": 10.0,
    "delta_floor": 0.001,
    "max_tokenizer_mismatches": 0,  # requests whose ids differ between a backend's tokenizer and the reference
    # cross-stack max |delta loglik| / the same-stack noise floor, any single test (`parity run --noise-floor`)
    "max_floor_ratio": None,
}
FLAG_KEYS = {"max_mean_error": "max_mean_error", "max_test_error": "max_test_error",
             "max_flips": "max_flips", "margin": "margin", "max_tokenizer_mismatches": "max_tokenizer_mismatches",
             "max_floor_ratio": "max_floor_ratio"}
REPO_THRESHOLDS = Path("configs") / "thresholds.yaml"


def load_thresholds(path: str | None, flags: dict | None = None) -> tuple[dict, str]:
    """Defaults <- yaml (--thresholds, else ./configs/thresholds.yaml) <- flags. Returns (values, source)."""
    values, source = dict(DEFAULT_THRESHOLDS), "built-in defaults"
    p = Path(path) if path else (REPO_THRESHOLDS if REPO_THRESHOLDS.is_file() else None)
    if path and not p.is_file():
        raise UserError(f"{p}: thresholds file not found; pass an existing yaml to --thresholds")
    if p is not None:
        data = read_yaml_mapping(p, "thresholds file")
        unknown = sorted(set(data) - set(DEFAULT_THRESHOLDS))
        if unknown:
            raise UserError(f"{p}: unknown threshold {', '.join(unknown)}; known: {', '.join(DEFAULT_THRESHOLDS)}")
        for k, v in data.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise UserError(f"{p}: {k} must be a non-negative number or null, not {v!r}")
            values[k] = v
        source = str(p)
    for k, v in (flags or {}).items():
        if v is not None:
            if v < 0:
                raise UserError(f"--{k.replace('_', '-')} must be non-negative, not {v}")
            values[k] = v
            source += f" + --{k.replace('_', '-')}"
    return values, source


def load_baseline(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    base = read_json(p, "baseline report")
    if not isinstance(base, dict) or base.get("report_format") != REPORT_FORMAT or "comparisons" not in base:
        fmt = base.get("report_format") if isinstance(base, dict) else None
        raise UserError(f"{p}: not a parity report.json of this version (report_format {fmt}, expected "
                        f"{REPORT_FORMAT}); regenerate the baseline with `parity report --format json`")
    return base


def evaluate(report: dict, th: dict, baseline: dict | None = None) -> dict:
    """Pure judgement: {"failures": [...], "moved": [...]} where each item names size, backend, test
    (moved: parity.report.moved, worst first)."""
    failures = []

    def fail(check, size, backend, test, value, limit):
        failures.append({"check": check, "size": size, "backend": backend, "test": test,
                         "value": value, "limit": limit})

    for m in report["missing"]:
        if m["status"] != UnitStatus.NO_DATA:
            fail(f"unit {m['status']}", m["size"], m["backend"], m["what"], m["detail"] or "-", "a score")
    for s in report["sizes"]:
        for o in report["others"]:
            me = report["mean_error"][s][o]["mean"]
            if th["max_mean_error"] is not None and me is not None and me > th["max_mean_error"]:
                fail("mean error", s, o, "-", fmt_pct(me), fmt_pct(th["max_mean_error"]))
            for t, c in report["comparisons"][s][o].items():
                e, f = c["pct_error"], c.get("flips")
                if th["max_test_error"] is not None and e is not None and e > th["max_test_error"]:
                    fail("test error", s, o, t, fmt_pct(e), fmt_pct(th["max_test_error"]))
                if th["max_flips"] is not None and f is not None and f > th["max_flips"]:
                    fail("flips", s, o, t, str(f), str(th["max_flips"]))
                d = c.get("max_abs_delta")
                if th["max_abs_delta"] is not None and d is not None and d > th["max_abs_delta"]:
                    fail("max abs delta", s, o, t, f"{d:.3g}", f"{th['max_abs_delta']:.3g}")
    if th.get("max_floor_ratio") is not None:
        _floor_ratios(report, th["max_floor_ratio"], fail)
    from parity.tokenizer_check.in_run import failures as tokenizer_failures

    for f in tokenizer_failures(report, th.get("max_tokenizer_mismatches")):
        fail("tokenizer mismatches", f["size"], f["backend"], f["test"], f["value"], f["limit"])
    if baseline is not None:
        check_same_setup(report, baseline)
        if baseline.get("reference") != report["reference"]:
            raise UserError(f"baseline reference is {baseline.get('reference')!r}, this check's is "
                            f"{report['reference']!r}; pass --reference {baseline.get('reference')}")
        try:
            _against_baseline(report, baseline, th, fail)
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"baseline report is damaged (missing {e}); regenerate it with "
                            f"`parity report --format json`") from None
    return {"failures": failures, "moved": moved_tests(report, th, baseline)}


def _floor_ratios(report: dict, limit: float, fail) -> None:
    """Every test whose cross-stack max |delta| is more than `limit` times the same-stack floor."""
    if not report.get("floor"):
        raise UserError("max_floor_ratio: this run has no noise floor; score it with `parity run --noise-floor` "
                        "(same --out: finished units are reused), or drop --max-floor-ratio")
    for s in report["sizes"]:
        for o in report["others"]:
            for t, c in report["comparisons"][s][o].items():
                if c.get("floor_max_abs_delta") is None:
                    continue
                r = c.get("floor_ratio")
                if r is None:  # floor exactly 0, the stacks differ
                    fail("floor ratio", s, o, t, f"inf (floor 0, max abs delta {c['max_abs_delta']:.3g})", f"{limit:g}")
                elif r > limit:
                    fail("floor ratio", s, o, t, f"{r:.3g} (max abs delta {c['max_abs_delta']:.3g}, floor "
                                                 f"{c['floor_max_abs_delta']:.3g})", f"{limit:g}")


# What a baseline was made with, beyond the checkpoints: numbers of another device or dtype differ by
# design (bf16 rounding, other kernels), so comparing them would report false regressions.
PINNED = ("device", "dtype")


def check_same_setup(report: dict, baseline: dict) -> None:
    now = {k: (report.get("run") or {}).get(k) for k in PINNED}
    was = {k: (baseline.get("run") or {}).get(k) for k in PINNED}
    if now != was:
        def show(d):
            return "/".join(str(d[k]) for k in PINNED)
        raise UserError(f"the baseline was made on {show(was)} but this run is {show(now)}; compare runs of the "
                        f"same device and dtype (`parity run --device {was['device']} --dtype {was['dtype']}`), "
                        f"or make a baseline on {show(now)}")


def _against_baseline(report, baseline, th, fail) -> None:
    for s, per_other in baseline["comparisons"].items():
        for o, per_test in per_other.items():
            if s not in report["comparisons"] or o not in report["comparisons"][s]:
                fail("missing vs baseline", s, o, "-", "not in this run", "present in the baseline")
                continue
            now, was = report["mean_error"][s][o]["mean"], baseline["mean_error"][s][o]["mean"]
            if now is not None and was is not None and th["margin"] is not None and now - was > th["margin"] + 1e-9:
                fail("mean error vs baseline", s, o, "-", f"{fmt_pct(now)} (was {fmt_pct(was)}, {now - was:+.2f})",
                     f"+{th['margin']:.2f} points")
            for t, b in per_test.items():
                c = report["comparisons"][s][o].get(t)
                if c is None:
                    fail("missing vs baseline", s, o, t, "not in this run", "present in the baseline")
                    continue
                e, be = c["pct_error"], b.get("pct_error")
                if e is not None and be is not None and e != be:
                    if th["test_margin"] is not None and e - be > th["test_margin"] + 1e-9:
                        fail("test error vs baseline", s, o, t, f"{fmt_pct(e)} (was {fmt_pct(be)}, {e - be:+.2f})",
                             f"+{th['test_margin']:.2f} points")
                d, bd = c.get("max_abs_delta"), b.get("max_abs_delta")
                if d is not None and bd is not None and th["delta_growth"] is not None:
                    limit = max(bd * th["delta_growth"], th["delta_floor"] or 0.0)
                    if d > limit:
                        fail("max abs delta vs baseline", s, o, t, f"{d:.3g} (was {bd:.3g})", f"{limit:.3g}")
                f, bf = c.get("flips"), b.get("flips")
                if f is not None and bf is not None and th["max_new_flips"] is not None \
                        and f - bf > th["max_new_flips"]:
                    fail("new flips vs baseline", s, o, t, f"{f} (was {bf})", f"+{th['max_new_flips']}")


def render_verdict(report: dict, result: dict, th: dict, source: str, run_dir, baseline_path) -> str:
    ok = not result["failures"]
    lines = [f"## parity check: {'PASS' if ok else 'FAIL'}", ""]
    shown = ", ".join(f"{k} {v}" for k, v in th.items() if v is not None)
    lines.append(f"Run `{run_dir}`, reference {report['reference']}; thresholds ({source}): {shown}"
                 + (f"; baseline `{baseline_path}`." if baseline_path else "; no baseline."))
    lines += ["", "| size | backend | mean error | tests with an error |", "| --- | --- | ---: | ---: |"]
    for s in report["sizes"]:
        for o in report["others"]:
            me = report["mean_error"][s][o]
            lines.append(f"| {s} | {o} | {fmt_pct(me['mean'])} | {me['n_with_error']} of {me['n_tests']} |")
    if result["failures"]:
        lines += ["", f"{len(result['failures'])} regression(s):", "",
                  "| check | size | backend | test | value | limit |", "| --- | --- | --- | --- | --- | --- |"]
        for f in result["failures"]:
            cells = [f["check"], f["size"], f["backend"], f["test"], f["value"], f["limit"]]
            lines.append("| " + " | ".join(" ".join(str(x).split()).replace("|", "\\|")[:200] for x in cells) + " |")
    if result["moved"] and (baseline_path or not ok):  # without a baseline, listed when the gate fails
        lines += ["", f"{len(result['moved'])} test(s) moved{' against the baseline' if baseline_path else ''} "
                      f"(worst first: percent error, flips, delta growth):", ""]
        lines += [render_moved(m) for m in result["moved"]]
    elif baseline_path:
        lines += ["", "No test's percent error moved against the baseline."]
    return "\n".join(lines) + "\n"


def cli_check(args) -> int:
    flags = {k: getattr(args, k, None) for k in FLAG_KEYS}
    th, source = load_thresholds(getattr(args, "thresholds", None), flags)
    baseline = load_baseline(args.baseline) if getattr(args, "baseline", None) else None
    report = build_report(args.run_dir, reference=getattr(args, "reference", None))
    result = evaluate(report, th, baseline)
    print(render_verdict(report, result, th, source, args.run_dir, getattr(args, "baseline", None)), end="")
    if result["failures"] and getattr(args, "explain", False):
        from parity.trace.explain import check_line

        print("", check_line(args.run_dir, report, result), sep="\n", flush=True)
    if result["failures"]:
        names = [f"{f['size']}/{f['backend']}/{f['test']} ({f['check']})" if f["test"] != "-"
                 else f"{f['size']}/{f['backend']} ({f['check']})" for f in result["failures"]]
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        raise CheckFailed(f"{len(names)} regression(s): {', '.join(names[:8])}{more}")
    return 0
