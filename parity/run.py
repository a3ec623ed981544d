"""`parity run`: tasks -> requests -> one worker per (size, backend) -> per-sample files -> report.

Resumability: a unit is one (size, backend, test). Its identity ("inputs") is a hash of everything that
determines its numbers: backend, checkpoint fingerprint, parallel size, dtype, device, the request
ids, and backend options that are not the default (megatron's layer spec). Workers write each unit's raw
scores atomically under scores/, named by that hash, as soon as the unit is done; a repeated run reuses
every unit whose inputs are unchanged and launches workers only for the rest. Nothing computed is
thrown away, and nothing stale is silently reused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import itertools
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
from parity.backends import backend_info, default_backends
from parity.config import load_config, parse_checkpoint_flags, resolve_checkpoints
from parity.errors import UserError
from parity.gpus import GpuPool, default_device, visible_gpus, worker_gpus
from parity.io import read_json, write_json, write_jsonl
from parity.jobs import Job, JobUnit
from parity.requests import Request, read_scores, write_requests
from parity.results import (RunLayout, UnitRecord, UnitStatus, check_format, describe_ran_on, error_path, ran_path,
                            unit_key)

VERSIONED = ["torch", "transformers", "megatron-core", "llama-models", "lm-eval", "fairscale"]


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


# ---------------------------------------------------------------------------------------------- lock
class RunLock:
    """One writer per results directory (fcntl lock: released by the kernel if the holder dies)."""

    def __init__(self, run_dir: Path):
        self.path = RunLayout(run_dir).lock

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
    status: UnitStatus = UnitStatus.PENDING
    error: str | None = None
    seconds: float | None = None
    ran_on: dict | None = None
    perturbation: str = ""  # a noise-floor unit: a parity.floor.PERTURBATIONS key

    @property
    def key(self) -> str:
        key = unit_key(self.size, self.backend, self.test)
        return f"{key}/{self.perturbation}" if self.perturbation else key

    def record(self) -> UnitRecord:
        return UnitRecord(self.status, self.error, self.seconds, self.inputs, self.ran_on)


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
    checkpoints: dict  # size -> backend -> parity.config.Checkpoint
    data_dir: str | None = None
    limit: int | None = None  # documents per test
    skip_bad_docs: bool = False
    skip_bad_tokenizers: bool = False  # a backend tokenizer that does not load is noted, not fatal
    online: bool = False  # lm-eval's hub datasets instead of data_dir
    parallel: int = 1  # worker groups side by side
    tokenizer_vocab: dict = field(default_factory=dict)  # size -> vocab of the tokenizer requests use
    backend_options: dict = field(default_factory=dict)  # backend -> its non-default options (Job.options)
    perturbations: list[str] = field(default_factory=list)  # --noise-floor: parity.floor.PERTURBATIONS keys

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)


def make_plan(args) -> Plan:
    from parity.tasks.registry import resolve_tests

    cfg = load_config(args.config)
    run_cfg = cfg.get("run") or {}
    sizes = _csv(args.sizes) or run_cfg.get("sizes") or list(arch.MINI_SIZES)
    sizes = [arch.get_size(s).name for s in (sizes if isinstance(sizes, list) else _csv(sizes))]
    backends = _csv(args.backends) or run_cfg.get("backends") or default_backends()
    for b in backends:
        backend_info(b, where="--backends")
    reference = args.reference
    if reference not in backends:
        raise UserError(f"reference backend {reference!r} is not among --backends {','.join(backends)}")
    data_dir = args.data_dir or run_cfg.get("data_dir")
    tests = resolve_tests(_csv(args.tests), _csv(args.suites), data_dir=data_dir)
    device = args.device or run_cfg.get("device") or default_device(args.launcher)
    dtype = args.dtype or run_cfg.get("dtype") or ("bf16" if device == "cuda" else "fp32")
    spec = getattr(args, "megatron_spec", None) or "local"
    if spec == "te" and device != "cuda":
        raise UserError(f"--megatron-spec te: Transformer Engine runs on cuda only, this run is on {device}; "
                        f"use --megatron-spec local (the default) or --device cuda")
    if spec == "te" and dtype == "fp64":
        raise UserError("--megatron-spec te --dtype fp64: Transformer Engine has no fp64 kernels; use "
                        "--megatron-spec local for the fp64 judge")
    options = {"megatron": {"spec": spec}} if spec != "local" else {}
    default_out = "results/default" if not (args.sizes or args.config) else \
        f"results/{'-'.join(sizes)}-{dtype}-{device}"
    run_dir = Path(args.out or run_cfg.get("out") or default_out)
    parallel = _parallel(args.parallel, device, args.launcher)
    tp = args.tp or run_cfg.get("tp")
    if tp is not None and (not isinstance(tp, int) or tp < 1):
        raise UserError(f"tp {tp!r}: must be a positive integer")
    perturbations = []
    if getattr(args, "noise_floor", False):
        from parity.floor import applicable, check_backends

        check_backends(backends)
        perturbations = applicable(device, dtype)
    checkpoints = resolve_checkpoints(sizes, backends, parse_checkpoint_flags(args.checkpoint), cfg, args.config,
                                      tp=tp)
    return Plan(run_dir, sizes, backends, reference, tests, dtype, device, str(args.batch_size),
                args.launcher, checkpoints, data_dir, limit=args.limit, skip_bad_docs=args.skip_bad_docs,
                skip_bad_tokenizers=args.skip_bad_tokenizers,
                online=args.online, parallel=parallel, backend_options=options, perturbations=perturbations)


def _parallel(requested: int | None, device: str, launcher: str) -> int:
    """Workers side by side: as asked; by default 1, or on cuda with the local launcher one per visible GPU
    (the GPU pool then runs as many as have GPUs of their own)."""
    if requested is not None and requested < 1:
        raise UserError(f"--parallel {requested}: must be at least 1")
    if device == "cuda" and launcher == "torchrun" and (requested or 1) > 1:
        raise UserError(f"--parallel {requested} with --launcher torchrun: every node runs every job on its own "
                        f"GPUs, so jobs side by side would share them; use --parallel 1")
    if requested is not None:
        return requested
    return max(1, len(visible_gpus())) if device == "cuda" and launcher == "local" else 1


def load_test_data(plan: Plan) -> dict[str, dict[str, TestData]]:
    """Per size: test -> documents and their token requests (tokenized once per distinct tokenizer)."""
    from parity.checkpoints import tokenizer_path
    from parity.io import sha256_file
    from parity.tasks.docs import load_docs
    from parity.tasks.tokenize import build_requests
    from parity.tokenizer import vocab_size

    docs_by_test = {}
    for test in plan.tests:
        docs_by_test[test] = load_docs(test, plan.data_dir, limit=plan.limit, skip_bad=plan.skip_bad_docs,
                                      online=plan.online)
    per_size, by_tok = {}, {}
    for size in plan.sizes:
        ref_tok = tokenizer_path(plan.checkpoints[size][plan.reference].path)
        tok_sha = sha256_file(ref_tok)
        plan.tokenizer_vocab[size] = vocab_size(ref_tok)
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


# ---------------------------------------------------------------------------------------------- units
def unit_inputs(backend: str, ckpt: dict, plan: Plan, td: TestData, perturbation: str = "") -> str:
    fields = [RESULTS_FORMAT, backend, ckpt["fingerprint"], ckpt["tp"], plan.dtype, plan.device, td.digest]
    if options := plan.backend_options.get(backend):  # only non-default options: default units keep their hash
        fields.append(options)
    if perturbation:  # a floor unit: also the perturbation and, unless it replaces it, the run's batch size
        from parity.floor import PERTURBATIONS

        fields += [PERTURBATIONS[perturbation].settings(), plan.batch_size]
    blob = json.dumps(fields, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def scores_path(plan: Plan, u: Unit) -> Path:
    return plan.layout.scores(u.size, u.backend, u.test, u.inputs, u.perturbation)


def sample_path(plan: Plan, u: Unit) -> Path:
    return plan.layout.samples(u.size, u.backend, u.test, u.perturbation)


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


def worker_record(raw: Path) -> tuple[float | None, dict | None]:
    """(scoring seconds, ran_on) the worker wrote beside a unit's scores; (None, None) when it wrote none."""
    ran = ran_path(raw)
    record = read_json(ran, "worker record") if ran.is_file() else {}
    return record.pop("seconds", None), record or None


def finish_unit(plan: Plan, u: Unit, td: TestData) -> None:
    """Turn a worker's raw scores (or its error file) into the unit's per-sample file and status."""
    raw = scores_path(plan, u)
    err = error_path(raw)
    if raw.is_file():
        scores = read_scores(raw)
        missing = [r.hash for r in td.unique if r.hash not in scores]
        if missing:
            u.status, u.error = UnitStatus.FAILED, f"scores file {raw} lacks {len(missing)} requests"
            return
        write_jsonl(sample_path(plan, u), per_sample_rows(td, scores))
        u.status, u.error = UnitStatus.DONE, None
        u.seconds, u.ran_on = worker_record(raw)
    elif err.is_file():
        info = read_json(err)
        u.status, u.error = UnitStatus.FAILED, info.get("error", "worker error")
        docs = [d.doc_id for d, reqs in zip(td.docs, td.requests) if any(r.hash == info.get("request") for r in reqs)]
        if docs:
            u.error += f" [test {u.test}, doc {', '.join(docs[:5])}]"
    else:
        u.status = UnitStatus.FAILED
        u.error = u.error or "worker produced no results"


def group_gpus(plan: Plan, size: str, backend: str, available: int | None) -> int:
    """GPUs the (size, backend) worker gets on cuda (parity.gpus.worker_gpus); `available`: the pool's
    size (None: the launcher's allocation decides, e.g. slurm)."""
    from parity.backends.dist import ranks_share_gpus

    return worker_gpus(backend_info(backend).gpus, plan.checkpoints[size][backend].tp, arch.get_size(size).tp,
                       available, ranks_share_gpus())


def job_slot(plan: Plan, size: str, backend: str) -> int:
    """The (size, backend) job's number in the plan: the same on every node of a multi-node run."""
    return plan.sizes.index(size) * len(plan.backends) + plan.backends.index(backend)


def run_worker_group(plan: Plan, size: str, backend: str, units: list[Unit], data: dict[str, TestData],
                     progress, pool: GpuPool | None = None, ticket: object | None = None) -> float:
    from parity.backends.worker import launch

    ckpt = plan.checkpoints[size][backend]
    job_units = []
    for u in units:
        req_path = plan.layout.requests(size, u.test, data[u.test].digest)
        if not req_path.is_file():
            write_requests(req_path, data[u.test].unique)
        job_units.append(JobUnit(u.test, str(req_path), str(scores_path(plan, u)), perturbation=u.perturbation))
    job = Job(backend=backend, adapter=backend_info(backend).adapter, checkpoint=str(ckpt.path), tp=ckpt.tp,
              device=plan.device, dtype=plan.dtype, batch_size=plan.batch_size, size=size,
              vocab_size=plan.tokenizer_vocab.get(size), units=job_units,
              options=plan.backend_options.get(backend, {}))
    job_path = plan.layout.job(size, backend)
    job.write(job_path)
    gpus = group_gpus(plan, size, backend, pool.size if pool else None) if plan.device == "cuda" else None
    with (pool.lease(gpus, ticket) if pool else contextlib.nullcontext(None)) as visible:
        t0 = time.perf_counter()
        on = f", GPUs {','.join(visible)}" if visible else ""
        n_floor = sum(bool(u.perturbation) for u in units)
        floor = f" + {n_floor} noise-floor units" if n_floor else ""
        progress(f"{size}/{backend}: scoring {len(units) - n_floor} tests{floor} "
                 f"({sum(len(data[u.test].unique) for u in units)} requests, {ckpt.tp} rank{'s' if ckpt.tp > 1 else ''}{on})")
        # the stacks' own chatter (deprecation warnings, "> initializing model parallel") goes to the run's log;
        # the terminal keeps the progress bar, where it runs, and parity's own lines (errors included)
        proc = launch(job_path, ckpt.tp, launcher=plan.launcher, device=plan.device, gpus=gpus, visible=visible,
                      slot=job_slot(plan, size, backend), log=plan.layout.log(size, backend),
                      show=(f"{size}/{backend}", f"{backend}:", "parity"))
        seconds = time.perf_counter() - t0
    for u in units:
        if proc.returncode != 0 and not scores_path(plan, u).is_file():
            tail = (getattr(proc, "stderr", None) or "").strip().splitlines()[-1:] or [""]
            u.error = (f"worker exited with code {proc.returncode}: {tail[0][:300]} "
                       f"(its output: {plan.layout.log(size, backend)})")
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
    """manifest.json; noise-floor units go under "floor" (perturbations run, units by key size/backend/test/p)."""
    from parity.tasks.registry import MMLU_GROUPS, SUITES, get_spec

    any_size = next(iter(data_by_size.values()))
    tests = {}
    for t in plan.tests:
        spec, td = get_spec(t), any_size[t]
        tests[t] = {"suite": spec.suite, "name": spec.name, "group": spec.group, "source": td.source,
                    "n_docs": len(td.docs), "n_bad": td.n_bad}
    units_out = dict((previous or {}).get("units") or {})
    floor_out = dict(((previous or {}).get("floor") or {}).get("units") or {})
    # a floor unit counts only beside the plain unit it was measured against (parity.report.floor)
    base_out = dict(((previous or {}).get("floor") or {}).get("base_inputs") or {})
    plain = {unit_key(u.size, u.backend, u.test): u.inputs for u in units if not u.perturbation}
    for u in units:
        (floor_out if u.perturbation else units_out)[u.key] = u.record().to_json()
        if u.perturbation:
            base_out[u.key] = plain.get(unit_key(u.size, u.backend, u.test))
    ran = list(((previous or {}).get("floor") or {}).get("perturbations") or [])
    ran += [p for p in plan.perturbations if p not in ran]
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
    if floor_out:
        manifest["floor"] = {"perturbations": ran, "units": floor_out, "base_inputs": base_out}
    write_json(plan.layout.manifest, manifest)


def _check_previous(layout: RunLayout) -> dict | None:
    if not layout.manifest.is_file():
        return None
    prev = read_json(layout.manifest, "manifest")
    check_format(prev, layout.manifest)
    return prev


# ---------------------------------------------------------------------------------------------- main
def execute(plan: Plan, progress=print) -> dict:
    t_start = time.perf_counter()
    previous = _check_previous(plan.layout)
    t0 = time.perf_counter()
    data_by_size = load_test_data(plan)
    timings = {"tasks_s": round(time.perf_counter() - t0, 3)}
    ckpts = {s: {b: c.manifest() for b, c in plan.checkpoints[s].items()} for s in plan.sizes}
    from parity.tokenizer_check.in_run import check_run  # each backend's own tokenizer vs the reference ids
    timings["tokenizers_s"] = round(check_run(plan, data_by_size, progress), 3)

    units, groups = [], {}
    prev_units = dict((previous or {}).get("units") or {}) | (((previous or {}).get("floor") or {}).get("units") or {})
    for pert, size, backend, test in itertools.product(["", *plan.perturbations], plan.sizes, plan.backends,
                                                       plan.tests):
        td = data_by_size[size][test]
        u = Unit(size, backend, test, unit_inputs(backend, ckpts[size][backend], plan, td, pert), perturbation=pert)
        units.append(u)
        prev = UnitRecord.from_json(prev_units.get(u.key) or {})
        if not td.docs:
            u.status, u.error = UnitStatus.NO_DATA, td.source
        elif prev.inputs == u.inputs and prev.status is UnitStatus.DONE and sample_path(plan, u).is_file():
            # the worker's record beside the scores is the source; the manifest's copy may be an older parity's
            u.status, (u.seconds, u.ran_on) = UnitStatus.DONE, worker_record(scores_path(plan, u))
            if u.ran_on is None:  # scored before workers wrote a record
                u.seconds, u.ran_on = prev.seconds, prev.ran_on
        elif scores_path(plan, u).is_file():
            finish_unit(plan, u, td)  # scored before an interruption: only assemble
        else:
            groups.setdefault((size, backend), []).append(u)
    n_cached = sum(u.status is UnitStatus.DONE for u in units)
    floor = f" x {1 + len(plan.perturbations)} (noise floor: {', '.join(plan.perturbations)})" \
        if plan.perturbations else ""
    progress(f"parity: {len(units)} units ({len(plan.sizes)} sizes x {len(plan.backends)} backends x "
             f"{len(plan.tests)} tests{floor}), {n_cached} reused, {sum(len(g) for g in groups.values())} to score, "
             f"results in {plan.run_dir}")
    gpu_pool, tickets = None, {}
    if plan.device == "cuda" and plan.launcher == "local" and groups:
        gpu_pool = GpuPool(visible_gpus())
        for size, backend in groups:  # refused now, not after the sizes before it were scored
            gpu_pool.check(group_gpus(plan, size, backend, gpu_pool.size), f"{size}/{backend}")
        tickets = {key: gpu_pool.ticket() for key in groups}  # GPUs go to workers in this order
    write_manifest(plan, data_by_size, units, ckpts, timings, previous)

    finished = []

    def work(key):
        size, backend = key
        try:
            secs = run_worker_group(plan, size, backend, groups[key], data_by_size[size], progress, gpu_pool,
                                    tickets.get(key))
        finally:
            if gpu_pool:
                gpu_pool.cancel(tickets[key])
        timings[f"{size}/{backend}_s"] = round(secs, 3)
        done = sum(u.status is UnitStatus.DONE for u in groups[key])
        finished.append(key)
        ran = next((u.ran_on for u in groups[key] if u.ran_on), None)
        progress(f"[{len(finished)}/{len(groups)}] {size}/{backend}: {done}/{len(groups[key])} tests done "
                 f"in {secs:.1f}s ({time.perf_counter() - t_start:.0f}s elapsed)"
                 + (f" on {describe_ran_on(ran)}" if ran else ""))
        return key

    with ThreadPoolExecutor(max_workers=plan.parallel) as pool:
        for _ in pool.map(work, list(groups)):
            write_manifest(plan, data_by_size, units, ckpts, timings, previous)
    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    write_manifest(plan, data_by_size, units, ckpts, timings, previous)
    failed = [u for u in units if u.status is UnitStatus.FAILED]
    for u in failed:
        progress(f"FAILED {u.key}: {u.error}")
    return {"units": units, "failed": failed, "timings": timings}


def cli_run(args) -> int:
    plan = make_plan(args)
    if getattr(args, "judge", None):  # refused now, not after the scoring
        from parity.report.judge import check_judge

        check_judge(args.judge)
    with RunLock(plan.run_dir):
        outcome = execute(plan, progress=lambda m: print(m, file=sys.stderr, flush=True))
        if not args.no_report:
            from parity.report import build_report, write_report
            from parity.report.summary import render_summary

            report = build_report(plan.run_dir, reference=plan.reference, judge=getattr(args, "judge", None))
            write_report(plan.run_dir, report)
            print(render_summary(report, plan.run_dir), end="")
    print(f"parity: results in {plan.run_dir} ({outcome['timings']['total_s']:.1f}s)", file=sys.stderr)
    return 1 if outcome["failed"] else 0
