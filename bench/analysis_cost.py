"""Benchmark: what the noise floor and the attribution cost, as multiples of a plain run of the same work.

    python bench/analysis_cost.py [--size 7b-mini] [--dtype fp32] [--tests T1,T2] [--limit N]
                                  [--data-dir D] [--checkpoint SIZE:meta=DIR] [--workdir DIR]

1. `parity run --backends meta,megatron` (plain), into a new results directory;
2. the same with `--noise-floor` into another new directory (plain units + one unit per perturbation);
3. `parity attribute` (plain meta + megatron, then every variant) into a third.
Each step is timed wall-clock as a user runs it (start-up, tokenization and model loads included) after
one warm-up run that makes the synthetic checkpoint and its conversions, so no step pays for those.
Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--size", default="7b-mini")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--tests", default="boolq,piqa,winogrande,hellaswag,xcopa_en,mmlu_anatomy,"
                                       "bigbench_date_understanding,mmlu_marketing")
    ap.add_argument("--limit", default=None)
    ap.add_argument("--data-dir")
    ap.add_argument("--checkpoint", action="append", default=[])
    ap.add_argument("--workdir", help="default: a temp dir")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="parity-analysis-cost-"))
    common = ["--size", a.size, "--dtype", a.dtype, "--tests", a.tests]
    for flag, value in (("--limit", a.limit), ("--data-dir", a.data_dir)):
        if value:
            common += [flag, str(value)]
    for c in a.checkpoint:
        common += ["--checkpoint", c]
    run_common = ["--sizes" if x == "--size" else x for x in common] + ["--backends", "meta,megatron", "--no-report"]

    def timed(label, *args) -> float:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "parity", *args], capture_output=True, text=True)
        secs = time.perf_counter() - t
        if r.returncode != 0:
            print(f"{label} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
            raise SystemExit(1)
        return secs

    timed("warm-up", "run", *run_common, "--out", str(work / "warmup"))
    plain = timed("plain", "run", *run_common, "--out", str(work / "plain"))
    floor = timed("floor", "run", *run_common, "--noise-floor", "--out", str(work / "floor"))
    attribute = timed("attribute", "attribute", *common, "--out", str(work / "attribute"))
    print(f"{a.size} {a.dtype}, tests {a.tests}" + (f", limit {a.limit}" if a.limit else ""))
    print("| run | wall s | x plain |\n| --- | ---: | ---: |")
    for label, secs in (("plain (meta + megatron)", plain), ("with --noise-floor", floor),
                        ("parity attribute (plain + every variant)", attribute)):
        print(f"| {label} | {secs:.1f} | {secs / plain:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
