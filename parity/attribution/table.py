"""The attribution table: pure functions from per-sample rows to numbers, and its markdown.

For each variant of Meta's model (parity.attribution.VARIANTS) two distances over all tests: to plain Meta
(what switching that cause alone moves) and to the real megatron backend (how much of Megatron's difference
is left). The real megatron backend's own distance to plain Meta is the thing to explain; the "all" variant's
distance to real Megatron is the residual, what the doc's four causes do not explain.
"""

from __future__ import annotations

import math

from parity.attribution import CAUSES, DOC_CAUSES, VARIANTS
from parity.report import metrics


def distance(pairs) -> dict:
    """(reference rows, other rows) per test -> |delta loglik| mean, p99 and max over every request (nats),
    flipped predictions, documents, and the mean over tests of the percent error of the test scores (tests
    whose reference score is 0 are left out, as in the report)."""
    deltas, flips, docs, errors = [], 0, 0, []
    for ref, other in pairs:
        d, _ = metrics.abs_deltas(ref, other)
        deltas += d
        c = metrics.compare(ref, other)
        flips += c["flips"]
        docs += c["n_docs"]
        errors.append(metrics.pct_error(metrics.test_score(ref), metrics.test_score(other)))
    deltas.sort()
    n = len(deltas)
    return {"mean_abs_delta": math.fsum(deltas) / n if n else None,
            "p99_abs_delta": deltas[max(0, math.ceil(0.99 * n) - 1)] if n else None,  # nearest rank
            "max_abs_delta": deltas[-1] if n else None,
            "flips": flips, "n_docs": docs, "n_requests": n,
            "pct_error": metrics.mean_or_none(errors)}


def attribution(meta: dict, megatron: dict, variants: dict[str, dict]) -> dict:
    """meta, megatron: test -> rows; variants: variant name -> test -> rows (the tests all three hold)."""
    tests = [t for t in meta if t in megatron and all(t in v for v in variants.values())]
    to_megatron = distance((meta[t], megatron[t]) for t in tests)
    out = []
    for name, rows in variants.items():
        entry = {"cause": name, "causes": list(VARIANTS.get(name, (name,))),
                 **distance((meta[t], rows[t]) for t in tests),
                 "vs_megatron": distance((rows[t], megatron[t]) for t in tests)}
        entry["share_of_megatron"] = _ratio(entry["mean_abs_delta"], to_megatron["mean_abs_delta"])
        out.append(entry)
    by_name = {v["cause"]: v for v in out}
    residual = None
    if "all" in by_name:
        residual = {"cause": "all", **by_name["all"]["vs_megatron"],
                    "share_of_megatron": _ratio(by_name["all"]["vs_megatron"]["mean_abs_delta"],
                                                to_megatron["mean_abs_delta"])}
    return {"tests": tests, "variants": out, "megatron": to_megatron, "residual": residual}


def _ratio(a, b):
    return None if a is None or not b else a / b


def render(result: dict) -> str:
    """Markdown: one row per variant, then real megatron and the residual."""
    meta = result.get("run", {})
    head = ["# Attribution: Meta's reference switched to Megatron's way, cause by cause", "",
            f"size {meta.get('size')}, {meta.get('dtype')} on {meta.get('device')}; "
            f"{len(result['tests'])} tests, {result['megatron']['n_docs']} documents, "
            f"{result['megatron']['n_requests']} requests. Deltas in nats against plain Meta (left) and against "
            f"the real megatron backend (right). \"share\": the variant's mean |delta| over real Megatron's "
            f"(rounding differences do not add up: the shares need not sum to 1).", "",
            "| variant | mean abs delta | p99 | max | flips | % error | share | vs megatron: mean | p99 | max "
            "| flips | % error |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = []
    for v in result["variants"]:
        m = v["vs_megatron"]
        rows.append(f"| {v['cause']} | {_sci(v['mean_abs_delta'])} | {_sci(v['p99_abs_delta'])} | "
                    f"{_sci(v['max_abs_delta'])} | {v['flips']} | {_pct(v['pct_error'])} | "
                    f"{_share(v['share_of_megatron'])} | {_sci(m['mean_abs_delta'])} | {_sci(m['p99_abs_delta'])} | "
                    f"{_sci(m['max_abs_delta'])} | {m['flips']} | {_pct(m['pct_error'])} |")
    g = result["megatron"]
    rows.append(f"| **megatron (real)** | {_sci(g['mean_abs_delta'])} | {_sci(g['p99_abs_delta'])} | "
                f"{_sci(g['max_abs_delta'])} | {g['flips']} | {_pct(g['pct_error'])} | 1 | 0 | 0 | 0 | 0 | - |")
    tail = [""]
    r = result.get("residual")
    if r:
        tail.append(f"Residual (\"all\" = the doc's four causes, against real Megatron): mean |delta| "
                    f"{_sci(r['mean_abs_delta'])}, max {_sci(r['max_abs_delta'])}, {r['flips']} flips, "
                    f"{_share(r['share_of_megatron'])} of Megatron's mean |delta| to plain Meta.")
        for v in result["variants"]:
            if v["cause"].startswith("all+"):
                m = v["vs_megatron"]
                tail.append(f"With {v['cause'][4:]} too (`{v['cause']}`): mean |delta| to real Megatron "
                            f"{_sci(m['mean_abs_delta'])}, max {_sci(m['max_abs_delta'])}, {m['flips']} flips.")
    tail += ["", "| cause | Megatron's way | Meta's code it replaces | in the doc |", "| --- | --- | --- | --- |"]
    for name, c in CAUSES.items():
        tail.append(f"| {name} | {c.megatron_way} | {c.where} | {'yes' if name in DOC_CAUSES else 'no (residual)'} |")
    if s := meta.get("seconds"):
        untimed = s.get("units_without_time")  # scored by a parity that did not record it
        if not (s["plain"] or s["variants"]):
            line = "Time: not recorded (these units were scored by a parity that did not record each unit's time)."
        else:
            line = (f"Time spent scoring (each unit's own time, whichever invocation scored it; model loads "
                    f"excluded): plain run (meta + megatron) {s['plain']:.0f} s, variants {s['variants']:.0f} s")
            # with units missing, a ratio would understate the cost
            line += (f"; {untimed} units have no recorded time and are not counted." if untimed or not s["plain"]
                     else f" ({s['variants'] / s['plain']:.1f}x the plain run).")
        tail += ["", line]
    return "\n".join(head + rows + tail) + "\n"


def _sci(v) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.2e}")


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.2f}%"


def _share(v) -> str:
    return "-" if v is None else f"{v:.2f}"
