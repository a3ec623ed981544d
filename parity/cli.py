"""Command line: argument parsing only. Every verb hands its parsed args to one function elsewhere.

Imports are lazy so that `parity --help` and `parity report` do not pay for torch / megatron imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from parity.attribution import VARIANTS
from parity.backends import BACKENDS, default_backends
from parity.checkpoints import MARKERS, MEGATRON_FORMATS, MEGATRON_SPECS
from parity.dtypes import DTYPES
from parity.errors import CheckFailed, UserError

FORMATS = list(MARKERS)  # checkpoint formats, by the file that marks each


def _verb(sub, name: str, target: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(_target=target)
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="parity",
        description="Numerical parity harness for Llama-2: do converted weights, run by another stack, "
                    "score the same as Meta's reference, task by task?")
    from parity import __version__
    ap.add_argument("--version", action="version", version=f"parity {__version__}")
    sub = ap.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = _verb(sub, "run", "parity.run:cli_run",
              "score every backend on every test for the given sizes and print the report")
    p.add_argument("--sizes", help="comma-separated sizes (default: the three mini sizes)")
    p.add_argument("--backends", help=f"comma-separated backends of {','.join(BACKENDS)} "
                                      f"(default: {','.join(default_backends())})")
    p.add_argument("--reference", default="meta", help="backend the others are compared with")
    p.add_argument("--suites", help="comma-separated suite ids: bigbench,xcopa,lm-eval,mmlu")
    p.add_argument("--tests", help="comma-separated test ids (see `parity tasks`)")
    p.add_argument("--limit", type=int, help="score at most N documents per test")
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default fp32 on cpu, bf16 on cuda)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--data-dir", help="real data in the layout of docs (default: the bundled samples)")
    p.add_argument("--config", help="yaml with checkpoint locations per size and backend (configs/)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="SIZE:BACKEND=DIR",
                   help="point one backend of one size at a checkpoint directory (repeatable)")
    p.add_argument("--tp", type=int, help="tensor-parallel size of the megatron backend (default: a legacy "
                                          "checkpoint's shard count, else the size's TP in parity/arch.py); a "
                                          "torch_dist checkpoint runs at any TP dividing heads, kv groups and ffn")
    p.add_argument("--out", help="results directory (default results/<timestamp>)")
    p.add_argument("--batch-size", default="auto", help="N or auto")
    p.add_argument("--launcher", choices=["local", "torchrun", "slurm"], default="local",
                   help="how tensor-parallel workers are started")
    p.add_argument("--parallel", type=int, default=None,
                   help="workers run side by side (default: 1 on cpu; on cuda with the local launcher, as many "
                        "as the GPUs hold, each worker on GPUs of its own)")
    p.add_argument("--megatron-spec", choices=list(MEGATRON_SPECS), default="local",
                   help="megatron-core layer spec: local modules (default), or te: Transformer Engine's, as "
                        "Megatron-LM trains with (needs transformer_engine and cuda)")
    p.add_argument("--skip-bad-docs", action="store_true", help="skip malformed documents and count them")
    p.add_argument("--skip-bad-tokenizers", action="store_true",
                   help="a backend tokenizer that does not load: note it in the report instead of exit 2")
    p.add_argument("--online", action="store_true", help="fetch datasets from the hub instead of --data-dir")
    p.add_argument("--no-report", action="store_true", help="store results only")
    p.add_argument("--noise-floor", action="store_true",
                   help="also re-score every size and backend under perturbations that leave the math unchanged "
                        "(batch 1, shortest first, a repeat, another thread count on cpu, TF32 on cuda fp32): "
                        "the report judges each cross-stack difference against this floor")
    p.add_argument("--judge", metavar="FP64_RUN",
                   help="an fp64 run of the same sizes and tests (e.g. `--dtype fp64 --backends meta`): the report "
                        "gives each backend's distance to exact arithmetic")

    p = _verb(sub, "report", "parity.report.cli:cli_report",
              "render markdown / json / csv tables from stored results (no model needed)")
    p.add_argument("run_dir")
    p.add_argument("--reference", default=None, help="reference backend (default: the run's)")
    p.add_argument("--format", default="md,json", help="comma-separated: md,json,csv")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--judge", metavar="FP64_RUN",
                   help="an fp64 run of the same sizes and tests: each backend's distance to exact arithmetic")
    p.add_argument("--judge-backend", help="the judge run's backend to measure against (default: its reference)")

    p = _verb(sub, "check", "parity.report.check:cli_check",
              "CI gate: exit 1 when a stored run regresses past thresholds or a baseline")
    p.add_argument("run_dir")
    p.add_argument("--max-mean-error", type=float, help="percent, per size and backend")
    p.add_argument("--max-test-error", type=float, help="percent, any single test")
    p.add_argument("--max-flips", type=int, help="flipped predictions, any single test")
    p.add_argument("--baseline", help="a stored report.json to compare with")
    p.add_argument("--margin", type=float, help="allowed rise of mean error over the baseline (points)")
    p.add_argument("--max-tokenizer-mismatches", type=int,
                   help="requests whose ids differ between a backend's own tokenizer and the reference, "
                        "any single test (default 0)")
    p.add_argument("--max-floor-ratio", type=float,
                   help="cross-stack max |delta loglik| / the same-stack noise floor, any single test (needs a run "
                        "with --noise-floor)")
    p.add_argument("--thresholds", help="yaml (default configs/thresholds.yaml when present)")
    p.add_argument("--reference", default=None)
    p.add_argument("--explain", action="store_true",
                   help="on failure, trace the worst test's stacks and name the first divergence (loads models)")

    p = _verb(sub, "explain", "parity.trace.explain:cli_explain",
              "run two stacks on one request, compare their internals layer by layer, name the first divergence")
    p.add_argument("--size", help="model size (default: the run's, when it has one)")
    p.add_argument("--backends", help="two backends, the reference first (default with --run: the run's "
                                      "reference and its worst backend)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="SIZE:BACKEND=DIR",
                   help="point one backend at a checkpoint directory (repeatable)")
    p.add_argument("--config", help="yaml with checkpoint locations (as for `parity run`)")
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: the run's, else fp32 on cpu)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--launcher", choices=["local", "torchrun", "slurm"], default="local")
    p.add_argument("--run", help="a stored run: explain one of its documents on the checkpoints it scored")
    p.add_argument("--test", help="with --run: the test (default: the largest |delta loglik|)")
    p.add_argument("--doc", help="with --run: the document id (default: the largest |delta loglik| in the test)")
    p.add_argument("--text", help="explain this text instead (default without --run: a fixed sentence)")
    p.add_argument("--out", help="where explain.md/.json/.png go")
    p.add_argument("--json", action="store_true", help="print the json instead of the markdown table")

    p = _verb(sub, "attribute", "parity.attribution.cli:cli_attribute",
              "score variants of Meta's reference switched to Megatron's way at one cause each (fused "
              "projections, baddbmm, sin/cos rotary, default dtype, ...): what explains Meta vs Megatron")
    p.add_argument("--size", required=True, help="one size (e.g. 7b-mini, 7b)")
    p.add_argument("--variants", help=f"comma-separated variants (default all: {','.join(VARIANTS)})")
    p.add_argument("--tests", help="comma-separated test ids (see `parity tasks`)")
    p.add_argument("--suites", help="comma-separated suite ids: bigbench,xcopa,lm-eval,mmlu")
    p.add_argument("--limit", type=int, help="score at most N documents per test")
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default fp32 on cpu, bf16 on cuda)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--data-dir", help="real data in the layout of docs (default: the bundled samples)")
    p.add_argument("--config", help="yaml with checkpoint locations (as for `parity run`)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="SIZE:BACKEND=DIR",
                   help="Meta's files (SIZE:meta=DIR) and optionally the megatron checkpoint (SIZE:megatron=DIR)")
    p.add_argument("--tp", type=int, help="tensor-parallel size of the megatron backend (as for `parity run`)")
    p.add_argument("--batch-size", default="auto", help="N or auto")
    p.add_argument("--launcher", choices=["local", "torchrun", "slurm"], default="local")
    p.add_argument("--megatron-spec", choices=list(MEGATRON_SPECS), default="local")
    p.add_argument("--skip-bad-docs", action="store_true")
    p.add_argument("--online", action="store_true", help="fetch datasets from the hub instead of --data-dir")
    p.add_argument("--out", help="results directory (default results/attribute/<size>-<dtype>-<device>)")
    p.add_argument("--json", action="store_true", help="print the json instead of the markdown table")

    p = _verb(sub, "convert", "parity.checkpoints.convert:cli_convert",
              "convert a checkpoint between the meta, hf and megatron formats")
    p.add_argument("--from", dest="src", choices=FORMATS, required=True)
    p.add_argument("--to", dest="dst", choices=FORMATS, required=True)
    p.add_argument("--load-dir", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--size", help="size name (checked against the files; default: inferred)")
    p.add_argument("--megatron-format", choices=list(MEGATRON_FORMATS),
                   help="on-disk format of a megatron output: legacy (Megatron-LM --ckpt-format torch, "
                        "mp_rank_TT[_PPP] files; the default) or torch_dist (megatron-core distributed "
                        "checkpoint, Megatron-LM's default; loads at any TP). --from megatron reads both")
    p.add_argument("--target-tp", type=int, help="tensor-parallel size of a legacy megatron output")
    p.add_argument("--target-pp", type=int, help="pipeline-parallel size of a legacy megatron output "
                                                 "(layers split evenly, as Megatron-LM does)")
    p.add_argument("--target-files", type=int, help="number of consolidated files of a meta output")
    p.add_argument("--dtype", choices=list(DTYPES), help="dtype of the output (default: as stored)")
    p.add_argument("--tokenizer", help="tokenizer.model to ship with the output")
    p.add_argument("--megatron-spec", choices=list(MEGATRON_SPECS),
                   help="tensor names of a megatron output: local (default) or te (Transformer Engine's)")
    p.add_argument("--overwrite", action="store_true")

    p = _verb(sub, "make-checkpoint", "parity.checkpoints.synthetic:cli_make_checkpoint",
              "write a deterministic synthetic checkpoint in Meta's layout")
    p.add_argument("--size", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="a tokenizer.model of the size's family (default: Llama 2 sizes train a small "
                   "sentencepiece one, Llama 3 sizes take llama-models' tiktoken model)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="stored dtype (Llama-2's files are bf16)")
    p.add_argument("--overwrite", action="store_true")

    p = _verb(sub, "tasks", "parity.tasks.cli:cli_tasks",
              "list the tests, their suite, data source and document counts")
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--tests", help="comma-separated test or suite ids")
    p.add_argument("--skip-bad-docs", action="store_true")

    p = _verb(sub, "tokenizers", "parity.tokenizer_check.cli:cli_tokenizers",
              "compare a tokenizer (HF dir, Megatron checkpoint, file) with the reference on every request")
    p.add_argument("--reference", required=True, help="the reference tokenizer file (Meta's tokenizer.model)")
    p.add_argument("--other", required=True, help="HF directory or model id, Megatron checkpoint, or tokenizer file")
    p.add_argument("--data-dir", help="real data (default: the bundled samples)")
    p.add_argument("--tests", help="comma-separated test ids (default: all 80)")
    p.add_argument("--suites", help="comma-separated suite ids")
    p.add_argument("--limit", type=int, help="at most N documents per test")
    p.add_argument("--skip-bad-docs", action="store_true")
    p.add_argument("--max-tokenizer-mismatches", type=int, default=0, help="exit 1 above this, any test")
    p.add_argument("--json", help="also write the result as json to this file")

    p = _verb(sub, "score", "parity.backends.worker:cli_score",
              "low level: run one backend on a job file (what `parity run` launches)")
    p.add_argument("job", help="job json written by `parity run`")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, func = args._target.split(":")
    try:
        return getattr(importlib.import_module(module), func)(args) or 0
    except (UserError, CheckFailed) as e:
        print(f"parity {args.verb}: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `parity tasks | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"parity {args.verb}: interrupted; finished results are kept, run again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
