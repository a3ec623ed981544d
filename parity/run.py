"""`parity run`: tasks -> requests -> one worker per (size, backend) -> per-sample files -> report.

Resumability: a unit is one (size, backend, test). Its identity ("inputs") is a hash of everything that
determines its numbers: backend, checkpoint fingerprint, parallel size, dtype, device and the request
ids. Workers write each unit's raw scores atomically under scores/, named by that hash, as soon as the
unit is done; a repeated run reuses every unit whose inputs are unchanged and launches workers only for
the rest. Nothing computed is thrown away, and nothing stale is silently reused.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from parity import RESULTS_FORMAT, __version__, arch
from parity.config import load_config, parse_checkpoint_flags, resolve_checkpoints
from parity.errors import UserError
from parity.io import read_json, write_json, write_jsonl
from parity.requests import Request, read_scores, write_requests

DEFAULT_BACKENDS = ["meta", "hf", "megatron"]
VERSIONED = ["torch", "transformers", "megatron-core", "llama-models", "lm-eval", "fairscale"]


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


# ---------------------------------------------------------------------------------------------- lock
class RunLock:
    """One writer per results directory (fcntl lock: released by the kernel if the holder dies)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(self.path).read_text(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UserError(f"{self.path.parent}: results directory is in use by {holder} "
                            f"(lock {self.path}); wait for it or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"parity run pid {os.getpid()} on {socket.gethostname()}".encode())
        return self

    def __exit__(self, *exc):
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class TestData:
    test: str
    docs: list  # parity.tasks Doc
    requests: list[list[Request]]  # per doc, per choice
    source: str
    n_bad: int

    @cached_property  # requests never change after tokenization; asked for per size and backend
    def unique(self) -> list[Request]:
        seen, out = set(), []
        for doc in self.requests:
            for r in doc:
                if r.hash not in seen:
                    seen.add(r.hash)
                    out.append(r)
        return out

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256()
        for doc in self.requests:
            h.update(",".join(r.hash for r in doc).encode() + b"\n")
        return h.hexdigest()[:16]


@dataclass
class Unit:
    size: str
    backend: str
    test: str
    inputs: str
    status: str = "pending"
    error: str | None = None
    seconds: float | None = None

    @property
    def key(self) -> str:
        return f"{self.size}/{self.backend}/{self.test}"


@dataclass
class Plan:
    run_dir: Path
    sizes: list[str]
    backends: list[str]
    reference: str
    tests: list[str]
    dtype: str
    device: str
    batch_size: str
    launcher: str
    checkpoints: dict
    data_dir: str | None = None
    tokenizer_vocab: dict = field(default_factory=dict)  # size -> vocab of the tokenizer requests use


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_plan(args) -> Plan:
    from parity.tasks.registry import resolve_tests

    cfg = load_config(args.config)
    run_cfg = cfg.get("run") or {}
    sizes = _csv(args.sizes) or run_cfg.get("sizes") or list(arch.MINI_SIZES)
    sizes = [arch.get_size(s).name for s in (sizes if isinstance(sizes, list) else _csv(sizes))]
    backends = _csv(args.backends) or run_cfg.get("backends") or list(DEFAULT_BACKENDS)
    for b in backends:
        if b not in DEFAULT_BACKENDS:
            raise UserError(f"unknown backend {b!r}; known backends: {', '.join(DEFAULT_BACKENDS)}")
    reference = args.reference
    if reference not in backends:
        raise UserError(f"reference backend {reference!r} is not among --backends {','.join(backends)}")
    data_dir = args.data_dir or run_cfg.get("data_dir")
    tests = resolve_tests(_csv(args.tests), _csv(args.suites), data_dir=data_dir)
    device = args.device or run_cfg.get("device") or _default_device()
    dtype = args.dtype or run_cfg.get("dtype") or ("bf16" if device == "cuda" else "fp32")
    default_out = "results/default" if not (args.sizes or args.config) else \
        f"results/{'-'.join(sizes)}-{dtype}-{device}"
    run_dir = Path(args.out or run_cfg.get("out") or default_out)
    checkpoints = resolve_checkpoints(sizes, backends, parse_checkpoint_flags(args.checkpoint), cfg, args.config)
    return Plan(run_dir, sizes, backends, reference, tests, dtype, device, str(args.batch_size),
                args.launcher, checkpoints, data_dir)


def load_test_data(plan: Plan, args) -> dict[str, dict[str, TestData]]:
    """Per size: test -> documents and their token requests (tokenized once per distinct tokenizer)."""
    from parity.checkpoints import tokenizer_path
    from parity.io import sha256_file
    from parity.tasks.docs import load_docs
    from parity.tasks.tokenize import build_requests

    docs_by_test = {}
    for test in plan.tests:
        docs_by_test[test] = load_docs(test, plan.data_dir, limit=args.limit, skip_bad=args.skip_bad_docs,
                                      online=getattr(args, "online", False))
    per_size, by_tok = {}, {}
    for size in plan.sizes:
        ref_tok = tokenizer_path(plan.checkpoints[size][plan.reference].path)
        tok_sha = sha256_file(ref_tok)
        plan.tokenizer_vocab[size] = _sp_vocab(ref_tok)
        for backend, ckpt in plan.checkpoints[size].items():
            other = tokenizer_path(ckpt.path)
            if other.is_file() and sha256_file(other) != tok_sha:
                raise UserError(f"{other}: tokenizer of {size}/{backend} differs from the reference's "
                                f"{ref_tok}; all backends must score the same token ids")
        if tok_sha not in by_tok:
            by_tok[tok_sha] = {t: TestData(t, ld.docs, build_requests(ld.docs, ref_tok), ld.source, ld.n_bad)
                               for t, ld in docs_by_test.items()}
        per_size[size] = by_tok[tok_sha]
    return per_size


def _sp_vocab(path) -> int:
    from parity.tokenizer import load_sp

    return load_sp(path).get_piece_size()


# ---------------------------------------------------------------------------------------------- units
def unit_inputs(backend: str, ckpt: dict, plan: Plan, td: TestData) -> str:
    blob = json.dumps([RESULTS_FORMAT, backend, ckpt["fingerprint"], ckpt["tp"], plan.dtype, plan.device,
                       td.digest], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def scores_path(run_dir: Path, u: Unit) -> Path:
    return run_dir / "scores" / u.size / u.backend / f"{u.test}.{u.inputs}.jsonl"


def sample_path(run_dir: Path, u: Unit) -> Path:
    return run_dir / u.size / u.backend / f"{u.test}.jsonl"


def per_sample_rows(td: TestData, scores: dict) -> list[dict]:
    rows = []
    for doc, reqs in zip(td.docs, td.requests):
        ll = [scores[r.hash].loglik for r in reqs]
        pred = max(range(len(ll)), key=lambda i: (ll[i], -i))  # first index on ties
        row = {"doc_id": doc.doc_id, "request_hashes": [r.hash for r in reqs], "loglik": ll,
               "is_greedy": [scores[r.hash].is_greedy for r in reqs],
               "n_tokens": [len(r.continuation) for r in reqs], "gold": doc.gold, "pred": pred}
        if doc.scores is not None:
            row["scores"] = list(doc.scores)
        rows.append(row)
    return rows


def finish_unit(plan: Plan, u: Unit, td: TestData) -> None:
    """Turn a worker's raw scores (or its error file) into the unit's per-sample file and status."""
    raw = scores_path(plan.run_dir, u)
    err = raw.with_name(raw.name + ".error.json")
    if raw.is_file():
        scores = read_scores(raw)
        missing = [r.hash for r in td.unique if r.hash not in scores]
        if missing:
            u.status, u.error = "failed", f"scores file {raw} lacks {len(missing)} requests"
            return
        write_jsonl(sample_path(plan.run_dir, u), per_sample_rows(td, scores))
        u.status, u.error = "done", None
    elif err.is_file():
        info = read_json(err)
        u.status, u.error = "failed", info.get("error", "worker error")
        docs = [d.doc_id for d, reqs in zip(td.docs, td.requests) if any(r.hash == info.get("request") for r in reqs)]
        if docs:
            u.error += f" [test {u.test}, doc {', '.join(docs[:5])}]"
    else:
        u.status = "failed"
        u.error = u.error or "worker produced no results"


def run_worker_group(plan: Plan, size: str, backend: str, units: list[Unit], data: dict[str, TestData],
                     progress) -> float:
    from parity.backends.worker import launch

    ckpt = plan.checkpoints[size][backend]
    job_units = []
    for u in units:
        req_path = plan.run_dir / "requests" / size / f"{u.test}.{data[u.test].digest}.jsonl"
        if not req_path.is_file():
            write_requests(req_path, data[u.test].unique)
        job_units.append({"name": u.test, "requests": str(req_path), "output": str(scores_path(plan.run_dir, u))})
    job = {"backend": backend, "checkpoint": str(ckpt.path), "tp": ckpt.tp, "device": plan.device,
           "dtype": plan.dtype, "batch_size": plan.batch_size, "size": size,
           "vocab_size": plan.tokenizer_vocab.get(size), "units": job_units}
    job_path = plan.run_dir / "jobs" / f"{size}-{backend}.json"
    write_json(job_path, job)
    t0 = time.perf_counter()
    progress(f"{size}/{backend}: scoring {len(units)} tests ({sum(len(data[u.test].unique) for u in units)} "
             f"requests, {ckpt.tp} rank{'s' if ckpt.tp > 1 else ''})")
    proc = launch(job_path, ckpt.tp, launcher=plan.launcher, device=plan.device)
    seconds = time.perf_counter() - t0
    for u in units:
        if proc.returncode != 0 and not scores_path(plan.run_dir, u).is_file():
            tail = (getattr(proc, "stderr", None) or "").strip().splitlines()[-1:] or [""]
            u.error = f"worker exited with code {proc.returncode}: {tail[0][:300]}"
        finish_unit(plan, u, data[u.test])
    return seconds


# ---------------------------------------------------------------------------------------------- manifest
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "parity": __version__}
    for p in VERSIONED:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def _git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent.parent
        r = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(plan: Plan, data_by_size: dict, units: list[Unit], ckpts: dict, timings: dict,
                   previous: dict | None) -> None:
    from parity.tasks.registry import MMLU_GROUPS, SUITES, get_spec

    any_size = next(iter(data_by_size.values()))
    tests = {}
    for t in plan.tests:
        spec, td = get_spec(t), any_size[t]
        tests[t] = {"suite": spec.suite, "name": spec.name, "group": spec.group, "source": td.source,
                    "n_docs": len(td.docs), "n_bad": td.n_bad}
    units_out = dict((previous or {}).get("units") or {})
    for u in units:
        units_out[u.key] = {"status": u.status, "error": u.error, "seconds": u.seconds, "inputs": u.inputs}
    manifest = {
        "format": RESULTS_FORMAT, "parity_version": __version__,
        "created": (previous or {}).get("created") or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["parity", *sys.argv[1:]], "git_revision": _git_revision(), "versions": _versions(),
        "reference": plan.reference, "sizes": plan.sizes, "backends": plan.backends,
        "dtype": plan.dtype, "device": plan.device, "batch_size": plan.batch_size,
        "samples": all(td.source == "samples" for td in any_size.values()),
        "suites": dict(SUITES), "tests": tests, "mmlu_groups": dict(MMLU_GROUPS),
        "checkpoints": ckpts, "units": units_out, "timings": timings,
    }
    write_json(plan.run_dir / "manifest.json", manifest)


def _check_previous(run_dir: Path) -> dict | None:
    path = run_dir / "manifest.json"
    if not path.is_file():
        return None
    prev = read_json(path, "manifest")
    if prev.get("format") != RESULTS_FORMAT:
        raise UserError(f"{path}: results from an incompatible parity version (format {prev.get('format')}, "
                        f"this parity writes {RESULTS_FORMAT}); use a new --out directory")
    return prev


# ---------------------------------------------------------------------------------------------- main
def execute(plan: Plan, args, progress=print) -> dict:
    t_start = time.perf_counter()
    previous = _check_previous(plan.run_dir)
    t0 = time.perf_counter()
    data_by_size = load_test_data(plan, args)
    timings = {"tasks_s": round(time.perf_counter() - t0, 3)}
    ckpts = {s: {b: c.manifest() for b, c in plan.checkpoints[s].items()} for s in plan.sizes}
    from parity.tokenizer_check.in_run import check_run  # each backend's own tokenizer vs the reference ids
    timings["tokenizers_s"] = round(check_run(plan, data_by_size, getattr(args, "skip_bad_tokenizers", False),
                                              progress), 3)

    units, groups = [], {}
    for size in plan.sizes:
        for backend in plan.backends:
            for test in plan.tests:
                td = data_by_size[size][test]
                u = Unit(size, backend, test, unit_inputs(backend, ckpts[size][backend], plan, td))
                units.append(u)
                prev = ((previous or {}).get("units") or {}).get(u.key) or {}
                if not td.docs:
                    u.status, u.error = "no data", td.source
                elif prev.get("inputs") == u.inputs and prev.get("status") == "done" \
                        and sample_path(plan.run_dir, u).is_file():
                    u.status, u.seconds = "done", prev.get("seconds")
                elif scores_path(plan.run_dir, u).is_file():
                    finish_unit(plan, u, td)  # scored before an interruption: only assemble
                else:
                    groups.setdefault((size, backend), []).append(u)
    n_cached = sum(u.status == "done" for u in units)
    progress(f"parity: {len(units)} units ({len(plan.sizes)} sizes x {len(plan.backends)} backends x "
             f"{len(plan.tests)} tests), {n_cached} reused, {sum(len(g) for g in groups.values())} to score, "
             f"results in {plan.run_dir}")
    write_manifest(plan, data_by_size, units, ckpts, timings, previous)

    finished = []

    def work(key):
        size, backend = key
        secs = run_worker_group(plan, size, backend, groups[key], data_by_size[size], progress)
        timings[f"{size}/{backend}_s"] = round(secs, 3)
        done = sum(u.status == "done" for u in groups[key])
        finished.append(key)
        progress(f"[{len(finished)}/{len(groups)}] {size}/{backend}: {done}/{len(groups[key])} tests done "
                 f"in {secs:.1f}s ({time.perf_counter() - t_start:.0f}s elapsed)")
        return key

    with ThreadPoolExecutor(max_workers=max(1, getattr(args, "parallel", 1))) as pool:
        for _ in pool.map(work, list(groups)):
            write_manifest(plan, data_by_size, units, ckpts, timings, previous)
    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    write_manifest(plan, data_by_size, units, ckpts, timings, previous)
    failed = [u for u in units if u.status == "failed"]
    for u in failed:
        progress(f"FAILED {u.key}: {u.error}")
    return {"units": units, "failed": failed, "timings": timings}


def cli_run(args) -> int:
    plan = make_plan(args)
    with RunLock(plan.run_dir):
        outcome = execute(plan, args, progress=lambda m: print(m, file=sys.stderr, flush=True))
        if not args.no_report:
            from parity.report import build_report, render_markdown, write_report

            report = build_report(plan.run_dir, reference=plan.reference)
            write_report(plan.run_dir, report)
            print(render_markdown(report, details=False))
    print(f"parity: results in {plan.run_dir} ({outcome['timings']['total_s']:.1f}s)", file=sys.stderr)
    return 1 if outcome["failed"] else 0
