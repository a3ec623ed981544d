"""The tests that moved, worst first: what `parity check` lists so a failed gate names its tests.

With a baseline a test moved when its percent error changed, it gained flips, or its max |delta loglik|
grew past the gate's limit (delta_growth x the baseline's, at least delta_floor). Without one, when it
has a percent error, a flip, or a max |delta loglik| above delta_floor (below it is fp noise).
Worst first: percent error, then flips, then delta growth (the delta itself without a baseline).
"""

from __future__ import annotations

from parity.report.build import fmt_pct


def moved_tests(report: dict, th: dict, baseline: dict | None = None) -> list[dict]:
    floor = th.get("delta_floor") or 0.0
    out = []
    for s in report["sizes"]:
        for o in report["others"]:
            base_tests = ((baseline or {}).get("comparisons") or {}).get(s, {}).get(o, {})
            for t, c in report["comparisons"][s][o].items():
                e, f, d = c.get("pct_error"), c.get("flips"), c.get("max_abs_delta")
                b = base_tests.get(t) if baseline is not None else None
                if baseline is not None and b is None:
                    continue  # not in the baseline: the gate reports it, there is nothing to move from
                was, bf, bd = (b or {}).get("pct_error"), (b or {}).get("flips"), (b or {}).get("max_abs_delta")
                growth = d / bd if d is not None and bd else None
                if b is not None:
                    limit = max((bd or 0.0) * (th.get("delta_growth") or 1.0), floor)
                    moved = ((e is not None and was is not None and e != was) or (f or 0) > (bf or 0)
                             or (d is not None and bd is not None and d > limit))
                else:
                    moved = (e or 0) > 0 or (f or 0) > 0 or (d or 0) > floor
                if moved:
                    out.append({"size": s, "backend": o, "test": t, "now": e, "note": c.get("note"), "was": was, "flips": f,
                                "flips_was": bf, "delta": d, "delta_was": bd, "growth": growth})
    out.sort(key=lambda m: (-(m["now"] or 0), -(m["flips"] or 0),
                            -(m["growth"] if m["growth"] is not None else (m["delta"] or 0))))
    return out


def render_moved(m: dict) -> str:
    """'- 7b-mini / megatron / boolq: error 0.00% -> 33.33% (+33.33 points), 1 flip(s) (was 0), max |delta
    loglik| 1.3 (x400 the baseline's)'"""
    if m["was"] is not None and m["now"] is not None:
        text = f"error {fmt_pct(m['was'])} -> {fmt_pct(m['now'])} ({m['now'] - m['was']:+.2f} points)"
    else:
        text = f"error {fmt_pct(m['now'], m.get('note'))}"
    if m["flips"]:
        text += f", {m['flips']} flip(s)" + (f" (was {m['flips_was']})" if m["flips_was"] is not None else "")
    if m["delta"] is not None:
        text += f", max |delta loglik| {m['delta']:.3g}"
        if m["growth"] is not None:
            text += f" (x{m['growth']:.3g} the baseline's)"
    return f"- {m['size']} / {m['backend']} / {m['test']}: {text}"
