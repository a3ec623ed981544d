"""`parity explain`: run two stacks on the same request, line their internals up, name where they part.

    parity explain --size 7b-mini --backends meta,megatron [--checkpoint SIZE:BACKEND=DIR ...] [--dtype D]
                   [--run RESULTS [--test T] [--doc ID]] [--text "..."] [--json] [--out DIR]

The request: the documents of a stored run (default: its test with the largest |delta loglik| between
the two backends, and in it the document with the largest one; all its choices), or a text, or a fixed
sentence. Each stack is traced by the ordinary worker (parity.trace.worker; torchrun for TP > 1): the
reference in the run's dtype and in a wider one (the noise: parity.trace.compare), the other in the
run's dtype. A stored run is explained on the checkpoints it scored: one whose fingerprint changed is refused.

Writes explain.md, explain.json, explain.png into --out (default RUN/explain/<size>-<backend>-<test>-<doc>
with --run, else results/explain/<size>-<reference>-<backend>) and prints the markdown (or the json).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from parity.backends import backend_info
from parity.errors import UserError
from parity.io import atomic_file, write_json

DEFAULT_TEXT = "The capital of France is Paris, and the capital of Italy is Rome. Both cities are old."


@dataclass
class Side:
    backend: str
    checkpoint: Path
    tp: int


@dataclass
class Request:
    inputs: list[list[int]]  # model inputs, one per choice (duplicates dropped)
    source: str  # what was traced, in words
    test: str | None = None
    doc: str | None = None


# ---------------------------------------------------------------------------------------------- inputs
def _csv(v: str | None) -> list[str]:
    return [x.strip() for x in v.split(",") if x.strip()] if v else []


def text_inputs(text: str, tokenizer: Path) -> list[list[int]]:
    from parity.tokenizer import load_sp

    sp = load_sp(tokenizer)
    bos = sp.bos_id() if sp.bos_id() >= 0 else 1
    ids = sp.EncodeAsIds(text)
    if not ids:
        raise UserError("--text: the text tokenizes to nothing; give some words")
    return [[bos, *ids]]


def worst_test(report: dict, size: str, other: str) -> str:
    per_test = report["comparisons"][size][other]
    scored = [(c.get("max_abs_delta"), t) for t, c in per_test.items() if c.get("max_abs_delta") is not None]
    if not scored:
        raise UserError(f"{size}/{other}: no test of the run has log-likelihoods of both backends; pass --text")
    return max(scored, key=lambda x: (x[0], x[1]))[1]


def _rows(run_dir: Path, size: str, backend: str, test: str) -> list[dict]:
    from parity.report.build import read_samples
    from parity.results import RunLayout

    path = RunLayout(run_dir).samples(size, backend, test)
    if not path.is_file():
        raise UserError(f"{path}: no per-sample file for {size}/{backend}/{test}; pick a test the run scored")
    return read_samples(path)


def run_inputs(run_dir: Path, size: str, reference: str, other: str, test: str, doc: str | None) -> Request:
    """The model inputs of one document of a stored run: `doc`, or the one with the largest |delta loglik|."""
    from parity.requests import read_requests
    from parity.results import RunLayout

    ref_rows, oth_rows = _rows(run_dir, size, reference, test), _rows(run_dir, size, other, test)
    other_ll = {h: ll for r in oth_rows for h, ll in zip(r["request_hashes"], r["loglik"])}
    by_id = {str(r["doc_id"]): r for r in ref_rows}
    if doc is None:
        def delta(r):
            return max((abs(ll - other_ll[h]) for h, ll in zip(r["request_hashes"], r["loglik"]) if h in other_ll),
                       default=-1.0)
        doc = str(max(ref_rows, key=delta)["doc_id"])
    elif doc not in by_id:
        raise UserError(f"--doc {doc}: no such document in {size}/{reference}/{test} (ids like "
                        f"{', '.join(list(by_id)[:3])})")
    hashes = set(by_id[doc]["request_hashes"])
    found = {}
    for path in sorted(RunLayout(run_dir).requests(size, test, "x").parent.glob(f"{test}.*.jsonl")):
        for r in read_requests(path):
            if r.hash in hashes:
                found[r.hash] = r
    missing = hashes - set(found)
    if missing:
        raise UserError(f"{run_dir}/requests/{size}: the token ids of {test} doc {doc} are not stored "
                        f"({len(missing)} request(s) missing); rerun `parity run`")
    inputs: list[list[int]] = []
    for h in by_id[doc]["request_hashes"]:
        seq = list(found[h].context + found[h].continuation)[:-1]
        if seq not in inputs:
            inputs.append(seq)
    return Request(inputs, f"{test} doc {doc} of run {run_dir} ({len(inputs)} choice input(s))", test, doc)


# ---------------------------------------------------------------------------------------------- checkpoints
def run_sides(run_dir: Path, manifest: dict, size: str, backends: list[str], flags: dict) -> list[Side]:
    """The checkpoints the run scored, refused when they changed since (fingerprints)."""
    from parity.io import fingerprint_dir

    sides = []
    for b in backends:
        rec = ((manifest.get("checkpoints") or {}).get(size) or {}).get(b)
        if not rec:
            raise UserError(f"{run_dir}: the run has no {size}/{b} checkpoint; pick --size and --backends it ran")
        path = flags.get((size, b), Path(rec["path"]))
        if not path.is_dir():
            raise UserError(f"{path}: checkpoint of {size}/{b} from run {run_dir} not found; pass "
                            f"--checkpoint {size}:{b}=DIR with the same files")
        now = fingerprint_dir(path)
        if now != rec.get("fingerprint"):
            raise UserError(f"{path}: checkpoint of {size}/{b} changed since run {run_dir} (fingerprint {now}, "
                            f"the run scored {rec.get('fingerprint')}); rerun `parity run` before explaining it")
        sides.append(Side(b, path, int(rec.get("tp") or 1)))
    return sides


def resolved_sides(size: str, backends: list[str], flags: dict, config: str | None) -> list[Side]:
    from parity.config import load_config, resolve_checkpoints

    ckpts = resolve_checkpoints([size], backends, flags, load_config(config), config)[size]
    return [Side(b, ckpts[b].path, ckpts[b].tp) for b in backends]


# ---------------------------------------------------------------------------------------------- tracing
def trace(sides: list[Side], inputs: list[list[int]], dtype: str, high: str, device: str, launcher: str = "local",
          vocab: int | None = None) -> tuple[dict, dict, dict]:
    """(reference in dtype, reference in `high`, other in dtype) captures, one worker launch per stack."""
    from parity.trace.stacks import stack_trace
    from parity.trace.worker import launch_traces

    for s in sides:
        stack_trace(s.backend)  # an untraceable backend: one line before anything is launched
    with tempfile.TemporaryDirectory(prefix="parity-explain-") as tmp:
        ref, high = launch_traces(sides[0].backend, sides[0].tp, [(sides[0].checkpoint, dtype), (sides[0].checkpoint, high)],
                                  inputs, Path(tmp) / "ref", device=device, launcher=launcher, vocab=vocab)
        (other,) = launch_traces(sides[1].backend, sides[1].tp, [(sides[1].checkpoint, dtype)], inputs,
                                 Path(tmp) / "other", device=device, launcher=launcher, vocab=vocab)
    return ref, high, other


def explain(sides: list[Side], request: Request, dtype: str, device: str, launcher: str = "local",
            vocab: int | None = None, size: str | None = None) -> dict:
    """The explanation as report data (what --json prints)."""
    from parity.trace.compare import NOISE_FACTOR, NOISE_METHOD, NOISE_REFERENCE, compare, first_divergence, summary

    high = NOISE_REFERENCE.get(dtype)
    if high is None:
        raise UserError(f"--dtype {dtype}: explain measures a dtype's noise against a wider one and has none for "
                        f"{dtype}; explain in {', '.join(NOISE_REFERENCE)}")
    if size is not None:  # before any launch; the worker checks again against the loaded model's own context
        from parity.arch import get_size
        from parity.trace.capture import check_lengths

        check_lengths(request.inputs, get_size(size).max_seq_len)
    ref, ref_high, other = trace(sides, request.inputs, dtype, high, device, launcher, vocab)
    rows = compare(ref, other, ref_high, dtype)
    first = first_divergence(rows)
    return {
        "first_divergence": None if first is None else {"boundary": first.name, "layer": first.layer,
                                                        "module": first.module},
        "summary": summary(rows),
        "boundaries": [r.to_json() for r in rows],
        "size": size, "dtype": dtype, "device": device,
        "reference": {"backend": sides[0].backend, "checkpoint": str(sides[0].checkpoint), "tp": sides[0].tp},
        "other": {"backend": sides[1].backend, "checkpoint": str(sides[1].checkpoint), "tp": sides[1].tp},
        "request": {"source": request.source, "test": request.test, "doc": request.doc,
                    "tokens": [len(s) for s in request.inputs]},
        "captured_bytes": sum(t.numel() * t.element_size() for t in other.values()),  # one stack's capture
        "noise": {"method": NOISE_METHOD.format(high=high), "reference_dtype": high, "factor": NOISE_FACTOR,
                  "rule": "threshold = factor x noise + unit roundoff of the dtype"},
    }


# ---------------------------------------------------------------------------------------------- output
def render_markdown(result: dict) -> str:
    ref, oth = result["reference"]["backend"], result["other"]["backend"]
    lines = [f"## parity explain: {result['size']} {ref} vs {oth} ({result['dtype']}, {result['device']})", "",
             f"Request: {result['request']['source']}, {sum(result['request']['tokens'])} tokens.",
             f"Noise: {result['noise']['method']}; {result['noise']['rule']} (factor {result['noise']['factor']:g}).",
             "", f"**{oth}: {result['summary']}**", "",
             "| boundary | max abs | rel L2 | cosine | noise | threshold | |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    first = (result["first_divergence"] or {}).get("boundary")
    for r in result["boundaries"]:
        mark = "<- first divergence" if r["name"] == first else ("above" if r["diverged"] else "")
        lines.append(f"| {r['name']} | {r['max_abs']:.3g} | {r['rel_l2']:.3g} | {r['cosine']:.6f} | "
                     f"{r['noise']:.2g} | {r['threshold']:.2g} | {mark} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Relative difference vs depth, log scale, one line per boundary kind; the threshold of the first
    divergence's kind dashed."""
    from parity.report.plots import _plt, _save
    from parity.trace.boundaries import KINDS

    plt = _plt()
    rows = result["boundaries"]
    n_layers = 1 + max((r["layer"] for r in rows if r["layer"] is not None), default=-1)
    tiny = 1e-12  # exact agreement, drawn at the bottom of the log axis

    def x(r):
        return 0 if r["module"] == "embed" else (n_layers + 1 if r["layer"] is None else r["layer"] + 1)

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for kind in KINDS:
        pts = [(x(r), max(r["rel_l2"], tiny)) for r in rows if r["module"] == kind]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, linewidth=1, label=kind)
    first = result["first_divergence"]
    if first:
        r = next(r for r in rows if r["name"] == first["boundary"])
        ax.plot([x(r)], [max(r["rel_l2"], tiny)], marker="x", color="red", markersize=12, linestyle="none",
                label=f"first divergence: {first['boundary']}")
    ax.set_yscale("log")
    ax.set_xticks(range(n_layers + 2), labels=["embed", *map(str, range(n_layers)), "final"])
    ax.set_xlabel("layer")
    ax.set_ylabel("relative L2 difference")
    ax.set_title(f"{result['size']}: {result['reference']['backend']} vs {result['other']['backend']} "
                 f"({result['dtype']})", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "explain.md") as f:
        f.write(render_markdown(result))
    write_json(out / "explain.json", result)
    plot(result, out / "explain.png")


# ---------------------------------------------------------------------------------------------- entry points
def _device(device: str | None, manifest: dict | None, launcher: str) -> str:
    if device:
        return device
    if manifest and manifest.get("device"):
        return manifest["device"]
    from parity.gpus import default_device

    return default_device(launcher)


def explain_run_unit(run_dir: Path, size: str, reference: str, other: str, test: str | None = None,
                     doc: str | None = None, report: dict | None = None, flags: dict | None = None,
                     launcher: str = "local", dtype: str | None = None, device: str | None = None) -> dict:
    """Explain one (size, backend, test) of a stored run on the checkpoints it scored."""
    from parity.checkpoints import tokenizer_path
    from parity.report.build import load_manifest
    from parity.tokenizer import load_sp

    manifest = load_manifest(run_dir)
    for b in (reference, other):
        if b not in manifest["backends"]:
            raise UserError(f"{run_dir}: backend {b!r} is not in the run ({', '.join(manifest['backends'])})")
    if size not in manifest["sizes"]:
        raise UserError(f"{run_dir}: size {size!r} is not in the run ({', '.join(manifest['sizes'])})")
    sides = run_sides(run_dir, manifest, size, [reference, other], flags or {})
    if test is None:
        if report is None:
            from parity.report.build import build_report

            report = build_report(run_dir, reference=reference)
        test = worst_test(report, size, other)
    request = run_inputs(run_dir, size, reference, other, test, doc)
    vocab = load_sp(tokenizer_path(sides[0].checkpoint)).get_piece_size()
    return explain(sides, request, dtype or manifest.get("dtype") or "fp32", _device(device, manifest, launcher), launcher,
                   vocab, size)


def run_out_dir(run_dir: Path, result: dict) -> Path:
    req = result["request"]
    return Path(run_dir) / "explain" / f"{result['size']}-{result['other']['backend']}-{req['test']}-{req['doc']}".replace("/", "_")


def check_line(run_dir, report: dict, verdict: dict) -> str:
    """`parity check --explain`: the first divergence of the worst moved (size, backend, test), one line."""
    worst = verdict["moved"][0] if verdict["moved"] else next(
        (f for f in verdict["failures"] if f["test"] != "-" and f["backend"] in report["others"]), None)
    if worst is None:
        return "explain: no failed test to trace (the failures name no single test)"
    size, backend, test = worst["size"], worst["backend"], worst["test"]
    try:
        result = explain_run_unit(Path(run_dir), size, report["reference"], backend, test, report=report)
    except UserError as e:
        return f"{size}/{backend}: explain failed: {e}"
    out = run_out_dir(run_dir, result)
    write_outputs(result, out)
    return f"{size}/{backend}: {result['summary']}; traced on {test} doc {result['request']['doc']}, table in {out / 'explain.md'}"


def worst_pair(report: dict, size: str) -> list[str]:
    """[the run's reference, its backend with the largest mean error on `size`]."""
    others = report["others"]
    if not others:
        raise UserError("the run has only its reference backend; there is nothing to compare it with")
    return [report["reference"], max(others, key=lambda o: report["mean_error"][size][o]["mean"] or 0.0)]


def cli_explain(args) -> int:
    from parity.arch import get_size
    from parity.checkpoints import tokenizer_path
    from parity.config import parse_checkpoint_flags
    from parity.tokenizer import load_sp
    from parity.trace.stacks import stack_trace

    flags = parse_checkpoint_flags(args.checkpoint)
    backends = _csv(args.backends)
    for b in backends:  # before any checkpoint is made or converted
        backend_info(b, where="--backends")
        stack_trace(b)
    if args.run:
        from parity.report.build import load_manifest

        run_dir = Path(args.run)
        manifest = load_manifest(run_dir)
        if args.text:
            raise UserError("--text and --run: pick one request (a text, or a stored run's document)")
        size = args.size or (manifest["sizes"][0] if len(manifest["sizes"]) == 1 else None)
        if size is None:
            raise UserError(f"{run_dir}: the run has sizes {', '.join(manifest['sizes'])}; pass --size")
        if not backends:
            from parity.report.build import build_report

            backends = worst_pair(build_report(run_dir), size)
        if len(backends) != 2:
            raise UserError(f"--backends {args.backends}: name two backends, the reference first (e.g. meta,megatron)")
        result = explain_run_unit(run_dir, size, backends[0], backends[1], args.test, args.doc, flags=flags,
                                  launcher=args.launcher, dtype=args.dtype, device=args.device)
        out = Path(args.out) if args.out else run_out_dir(run_dir, result)
    else:
        if args.test or args.doc:
            raise UserError("--test and --doc pick a document of a stored run; pass --run RESULTS too")
        if not args.size:
            raise UserError("--size is required without --run (e.g. --size 7b-mini)")
        size = get_size(args.size).name
        if len(backends) != 2:
            raise UserError(f"--backends {args.backends or ''}: name two backends, the reference first "
                            f"(e.g. --backends meta,megatron)")
        sides = resolved_sides(size, backends, flags, args.config)
        tok = tokenizer_path(sides[0].checkpoint)
        text = args.text if args.text is not None else DEFAULT_TEXT
        request = Request(text_inputs(text, tok), "the text given" if args.text is not None else
                          f"the fixed sentence {DEFAULT_TEXT!r}")
        device = _device(args.device, None, args.launcher)
        dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
        result = explain(sides, request, dtype, device, args.launcher, load_sp(tok).get_piece_size(), size)
        out = Path(args.out or Path("results") / "explain" / f"{size}-{backends[0]}-{backends[1]}")
    write_outputs(result, out)
    result["outputs"] = {k: str(out / f"explain.{k}") for k in ("md", "json", "png")}
    if args.json:
        import json

        print(json.dumps(result, indent=2))
    else:
        print(render_markdown(result), end="")
    print(f"parity explain: {result['other']['backend']}: {result['summary']}; written to {out}", file=sys.stderr)
    return 0
