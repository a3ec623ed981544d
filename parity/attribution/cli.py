"""`parity attribute`: score plain Meta, real megatron and each variant of Meta's model, then the table.

Every variant is an ordinary run directory (OUT/variants/<variant>/, backend meta with the worker option
"attribution"), and plain Meta with real megatron is one more (OUT/base/): stored, resumed and reused like
any run, and each readable by `parity report`. A variant costs one model load and one scoring pass of the
Meta stack. The table goes to OUT/attribution.md and .json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from parity.attribution import VARIANTS
from parity.errors import UserError
from parity.io import atomic_file, write_json

BACKENDS = ("meta", "megatron")  # what is attributed: Meta's reference against megatron-core


def _run_args(args, size: str):
    """`parity run`'s arguments for the base run, from its own parser's defaults."""
    from parity.cli import build_parser

    run = build_parser().parse_args(["run"])
    for name in ("tests", "suites", "limit", "dtype", "device", "data_dir", "config", "checkpoint", "tp",
                 "batch_size", "launcher", "megatron_spec", "skip_bad_docs", "online"):
        setattr(run, name, getattr(args, name))
    run.sizes, run.backends, run.reference, run.parallel = size, ",".join(BACKENDS), "meta", 1
    return run


def check_checkpoints(flags: list[str]) -> None:
    """Only Meta's own files can be patched; a --checkpoint for another stack is not used here."""
    from parity.checkpoints import detect_format
    from parity.config import parse_checkpoint_flags

    for (size, backend), path in parse_checkpoint_flags(flags).items():
        if backend not in BACKENDS:
            raise UserError(f"--checkpoint {size}:{backend}={path}: `parity attribute` compares Meta's reference "
                            f"with megatron only; leave {backend} out")
        if backend == "meta" and path.is_dir() and (fmt := detect_format(path)) != "meta":
            raise UserError(f"{path}: holds a {fmt} checkpoint, not Meta's; `parity attribute` patches Meta's "
                            f"reference code (llama_models), so pass Meta's consolidated files as "
                            f"--checkpoint {size}:meta=DIR (convert with `parity convert --to meta`)")


def variants_of(arg: str | None) -> dict[str, tuple[str, ...]]:
    if not arg:
        return dict(VARIANTS)
    names = [v.strip() for v in arg.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    return {v: VARIANTS[v] for v in names}


def plans(args):
    from parity.arch import get_size
    from parity.config import code_digest
    from parity.run import make_plan

    size = get_size(args.size).name
    check_checkpoints(args.checkpoint)
    variants = variants_of(args.variants)
    base = make_plan(_run_args(args, size))
    # the patches' source enters every meta unit's inputs: results of changed patches are never reused
    patches = code_digest("attribution/patches.py", "backends/meta.py")
    out = Path(args.out or f"results/attribute/{size}-{base.dtype}-{base.device}")
    # plain Meta as attribution runs it: the same loader path as the variants (fp64: fp32 casts widened)
    base = dataclasses.replace(base, run_dir=out / "base", tokenizer_vocab={},
                               backend_options={**base.backend_options, "meta": {"attribution": [], "patches": patches}})
    meta_only = {size: {"meta": base.checkpoints[size]["meta"]}}
    per_variant = {v: dataclasses.replace(base, run_dir=out / "variants" / v, backends=["meta"],
                                          checkpoints=meta_only, tokenizer_vocab={},
                                          backend_options={"meta": {"attribution": list(causes), "patches": patches}})
                   for v, causes in variants.items()}
    return size, out, base, per_variant


def cli_attribute(args) -> int:
    from parity.attribution.table import attribution, render
    from parity.report.build import read_samples
    from parity.results import UnitStatus
    from parity.run import RunLock, execute

    size, out, base, per_variant = plans(args)

    def say(m):
        print(m, file=sys.stderr, flush=True)

    # the cost is the units' own scoring times, so a resumed or reused table still states what it cost
    failed, seconds = [], {"plain": 0.0, "variants": 0.0, "units_without_time": 0}
    for i, (label, plan) in enumerate([("plain meta + megatron", base), *per_variant.items()]):
        say(f"parity attribute: [{i + 1}/{1 + len(per_variant)}] {label}")
        with RunLock(plan.run_dir):
            outcome = execute(plan, progress=say)
        failed += outcome["failed"]
        timed = [u.seconds for u in outcome["units"] if u.status is UnitStatus.DONE]
        seconds["plain" if plan is base else "variants"] += sum(t for t in timed if t is not None)
        seconds["units_without_time"] += sum(t is None for t in timed)
    if failed:
        say(f"parity attribute: {len(failed)} units failed (listed above); fix them and run again to resume")
        return 1

    def rows(plan, backend):
        return {t: read_samples(plan.layout.samples(size, backend, t)) for t in plan.tests
                if plan.layout.samples(size, backend, t).is_file()}

    result = attribution(rows(base, "meta"), rows(base, "megatron"),
                         {v: rows(p, "meta") for v, p in per_variant.items()})
    result["run"] = {"size": size, "dtype": base.dtype, "device": base.device, "out": str(out),
                     "data_dir": base.data_dir, "limit": base.limit,
                     "seconds": seconds}
    write_json(out / "attribution.json", result)
    md = render(result)
    with atomic_file(out / "attribution.md") as f:
        f.write(md)
    print(json.dumps(result, indent=2) if args.json else md, end="" if not args.json else "\n")
    say(f"parity attribute: {out}/attribution.md and .json")
    return 0
