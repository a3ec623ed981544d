"""The tokenizer check inside `parity run`, `parity report` and `parity check`.

run:    check_run() compares, per size, every backend's own tokenizer (carried.py) with the reference
        ids of every test and stores RUN/tokenizers/<size>/<backend>.json; like a unit, a stored result
        is reused while its inputs (tokenizer files, library versions, request digests) are unchanged,
        and a completed check is also kept in the cache (<cache>/tokenizer-checks/<inputs>.json) for
        other runs with the same inputs.
report: report_section() reads those files into report["tokenizers"] (per size and backend: status,
        tokenizer, examples) and report["tokenizer_mismatches"][size][backend][test] (counts).
check:  failures() lists the (size, backend, test) with more mismatching requests than allowed.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from parity.errors import UserError
from parity.io import cache_dir, read_json, sha256_file, write_json
from parity.results import RunLayout
from parity.tokenizer_check.carried import Carried, carried, load_carried

CHECK_FORMAT = 1
LIBRARIES = ["transformers", "tokenizers", "sentencepiece", "megatron-core", "llama-models", "tiktoken"]
# status of a (size, backend): its tokenizer was compared | is the reference's own file | it has none |
# it did not load and --skip-bad-tokenizers let the run go on
CHECKED, SAME_FILE, NONE, NOT_CHECKED = "checked", "reference file", "no tokenizer", "not checked"


def _versions() -> list:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for p in LIBRARIES:
        try:
            out.append(version(p))
        except PackageNotFoundError:
            out.append(None)
    return out


def _inputs(tokenizer: str | None, ref_sha: str, data: dict) -> str:
    from parity.config import code_digest

    blob = json.dumps([CHECK_FORMAT, tokenizer, ref_sha, _versions(), code_digest("tokenizer_check/*.py"),
                       [[t, td.digest] for t, td in data.items()]], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_backend(c: Carried | None, ref_tok: Path, data: dict, skip_bad: bool = False, progress=None) -> dict:
    """The stored result of one (size, backend) carrying `c`: its tokenizer against the reference ids of
    `data` (test -> run.TestData)."""
    from parity.tokenizer_check.compare import compare_tests
    from parity.tokenizer_check.encoders import kind_of_file, load

    if c is None:
        return {"status": NONE, "kind": None, "source": None, "tests": {}}
    base = {"kind": c.kind, "source": str(c.named)}
    if c.files == [c.source] and sha256_file(c.source) == sha256_file(ref_tok):  # one file, the reference's
        return {"status": SAME_FILE, **base, "description": f"the reference's {ref_tok.name}",
                "tests": {t: {"n_requests": sum(len(r) for r in td.requests), "n_mismatches": 0, "examples": []}
                          for t, td in data.items() if td.docs}}
    try:
        enc = load_carried(c)
    except UserError as e:
        if not skip_bad:
            raise
        return {"status": NOT_CHECKED, **base, "note": str(e), "tests": {}}
    ref_enc = load(kind_of_file(ref_tok), ref_tok)
    return {"status": CHECKED, **base, "description": enc.description,
            "tests": compare_tests(enc, data, ref_enc, progress=progress)}


def check_run(plan, data_by_size: dict, progress=print) -> float:
    """Every (size, backend) of the plan; returns the seconds spent. A tokenizer that does not load is a
    UserError (exit 2) unless plan.skip_bad_tokenizers. A result is keyed by the tokenizer's own bytes (not by the
    checkpoint's fingerprint), so checkpoints sharing a tokenizer share one check."""
    from parity.checkpoints import tokenizer_path

    t0, done = time.perf_counter(), {}
    for size in plan.sizes:
        ref_tok = tokenizer_path(plan.checkpoints[size][plan.reference].path)
        ref_sha = sha256_file(ref_tok)
        data = data_by_size[size]
        for backend in plan.backends:
            ck = plan.checkpoints[size][backend]
            c = carried(ck.format, ck.path)
            inputs = _inputs(c.digest() if c else None, ref_sha, data)
            path = plan.layout.tokenizer_check(size, backend)
            if path.is_file():
                try:
                    stored = read_json(path, "tokenizer check")
                except UserError:
                    stored = {}  # damaged: recompute
                # a tokenizer that did not load is tried again: the next run may lack --skip-bad-tokenizers
                if stored.get("inputs") == inputs and stored.get("status") != NOT_CHECKED:
                    continue
            say = (lambda m, s=size, b=backend: progress(f"{s}/{b} tokenizer: {m}")) if progress else None
            if inputs not in done:
                done[inputs] = _shared(inputs, say) or check_backend(c, ref_tok, data, plan.skip_bad_tokenizers, say)
                if done[inputs]["status"] == CHECKED:
                    write_json(_shared_path(inputs), done[inputs])
            result = {**done[inputs], **({"source": str(c.named)} if c else {})}
            if result["status"] == NOT_CHECKED and progress:
                progress(f"{size}/{backend} tokenizer: not checked ({result['note']})")
            write_json(path, {"format": CHECK_FORMAT, "inputs": inputs, "reference": str(ref_tok), **result})
    return time.perf_counter() - t0


def _shared_path(inputs: str) -> Path:
    return cache_dir() / "tokenizer-checks" / f"{inputs}.json"


def _shared(inputs: str, say) -> dict | None:
    """A check with these very inputs made by an earlier run (another results directory, the same tokenizer
    files, requests and libraries): its result, so that a run does not load the stack's tokenizer (for
    Megatron: import megatron-core, ~5 s of CPU) to learn it again."""
    path = _shared_path(inputs)
    if not path.is_file():
        return None
    try:
        result = read_json(path, "cached tokenizer check")
    except UserError:
        return None  # damaged: check again
    if say:
        n = sum(v["n_requests"] for v in result["tests"].values())
        say(f"{sum(v['n_mismatches'] for v in result['tests'].values())} of {n} requests differ "
            "(checked by an earlier run, kept in the cache)")
    return result


# ---------------------------------------------------------------------------------------------- report
def report_section(run_dir, manifest: dict) -> dict:
    """report["tokenizers"] and report["tokenizer_mismatches"] from the stored results (no tokenizer is
    loaded). A run without stored results (older parity, or the check skipped) gives empty dicts."""
    details, counts = {}, {}
    tests = list(manifest["tests"])
    for size in manifest["sizes"]:
        for backend in manifest["backends"]:
            path = RunLayout(Path(run_dir)).tokenizer_check(size, backend)
            if not path.is_file():
                continue
            r = read_json(path, "tokenizer check")
            per_test = {t: r["tests"][t] for t in tests if t in r.get("tests", {})}
            examples = [{"test": t, **e} for t, v in per_test.items() for e in v.get("examples", [])]
            details.setdefault(size, {})[backend] = {
                "status": r.get("status"), "kind": r.get("kind"), "source": r.get("source"),
                "description": r.get("description"), "note": r.get("note"),
                "n_requests": sum(v["n_requests"] for v in per_test.values()),
                "n_mismatches": sum(v["n_mismatches"] for v in per_test.values()),
                "tests_with_mismatches": [t for t, v in per_test.items() if v["n_mismatches"]],
                "examples": examples,
            }
            if r.get("status") in (CHECKED, SAME_FILE):
                counts.setdefault(size, {})[backend] = {t: v["n_mismatches"] for t, v in per_test.items()}
    return {"tokenizers": details, "tokenizer_mismatches": counts}


# ---------------------------------------------------------------------------------------------- check
def failures(report: dict, limit: int | None) -> list[dict]:
    """(size, backend, test) whose mismatching requests exceed `limit` (None: not checked)."""
    if limit is None:
        return []
    out = []
    for size, per_backend in (report.get("tokenizer_mismatches") or {}).items():
        for backend, per_test in per_backend.items():
            for test, n in per_test.items():
                if n > limit:
                    out.append({"size": size, "backend": backend, "test": test, "value": str(n),
                                "limit": str(limit)})
    return out
