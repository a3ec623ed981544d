"""Numerical faults: a NaN weight and an fp16 overflow are detected, named (backend, test, doc) and
reported as failed units, while the rest of the run completes and `parity check` fails the run.

The worker-level rule (a non-finite unit fails alone, the next unit still runs) is unit-tested in
tests/test_backends_worker.py::test_nonfinite_unit_fails_alone_and_existing_outputs_are_skipped; here
it is shown through `parity run` with real checkpoints.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import run_parity

from parity.checkpoints.convert import convert
from parity.tasks.docs import load_docs
from parity.tasks.tokenize import build_requests

TESTS = ["boolq", "mmlu_anatomy"]
SPECIALS = {0, 1, 2}  # pad / bos / eos: used by every request or by padding


def _tokens(reqs) -> set[int]:
    return {t for r in reqs for t in r.context}


def poisoned_token(tokenizer) -> tuple[int, str]:
    """A token id that occurs in the context of exactly one boolq document and in no anatomy
    document, so a NaN in its embedding row poisons exactly that document's requests."""
    per_test = {t: build_requests(load_docs(t).docs, tokenizer) for t in TESTS}
    docs = load_docs("boolq").docs
    elsewhere = set().union(*(_tokens(reqs) for reqs in per_test["mmlu_anatomy"]))
    for i, reqs in enumerate(per_test["boolq"]):
        others = set().union(*(_tokens(r) for j, r in enumerate(per_test["boolq"]) if j != i))
        only_here = sorted(_tokens(reqs) - others - elsewhere - SPECIALS)
        if only_here:
            return only_here[0], docs[i].doc_id
    raise AssertionError("no token unique to one boolq document in the samples")


@pytest.fixture(scope="module")
def nan_megatron(tmp_path_factory, mini_meta):
    """7b-mini in Megatron's layout, converted from Meta files with a NaN embedding row."""
    root = tmp_path_factory.mktemp("nan")
    meta = root / "meta"
    shutil.copytree(mini_meta, meta)
    token, doc_id = poisoned_token(meta / "tokenizer.model")
    f = meta / "consolidated.00.pth"
    sd = torch.load(f, weights_only=True)
    sd["tok_embeddings.weight"][token] = float("nan")
    torch.save(sd, f)
    return convert("meta", "megatron", meta, root / "megatron"), doc_id


def test_nan_weight_fails_one_unit_and_the_run_completes(nan_megatron, tmp_path):
    mg, doc_id = nan_megatron
    out = tmp_path / "run"
    # meta and megatron only: hf, scored before megatron like meta, would show nothing more
    r = run_parity("run", "--sizes", "7b-mini", "--backends", "meta,megatron", "--tests", ",".join(TESTS),
                   "--out", out, "--checkpoint", f"7b-mini:megatron={mg}")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    failed = [ln for ln in r.stderr.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 1, r.stderr[-3000:]
    line = failed[0]
    assert "7b-mini/megatron/boolq" in line and "megatron" in line and "non-finite" in line
    assert f"doc {doc_id}" in line and "request" in line, line
    units = json.loads((out / "manifest.json").read_text())["units"]
    assert units["7b-mini/megatron/boolq"]["status"] == "failed"
    assert {k: u["status"] for k, u in units.items() if k != "7b-mini/megatron/boolq"} == {
        f"7b-mini/{b}/{t}": "done" for b in ("meta", "megatron") for t in TESTS
        if (b, t) != ("megatron", "boolq")}
    # the megatron backend's other test was scored by the same worker, after the failed unit
    assert (out / "7b-mini" / "megatron" / "mmlu_anatomy.jsonl").is_file()
    assert not (out / "7b-mini" / "megatron" / "boolq.jsonl").exists()  # never a wrong score
    report = (out / "report.md").read_text()
    assert "megatron" in report and "failed" in report
    # the CI gate fails the run
    check = run_parity("check", out)
    assert check.returncode == 1, check.stdout + check.stderr
    assert "megatron" in check.stdout + check.stderr


FFN_SCALE = 30.0  # layer 0's MLP weights x30: its output reaches ~1e6, past fp16's 65504, fine in fp32
FFN_KEYS = [f"layers.0.feed_forward.{w}.weight" for w in ("w1", "w3", "w2")]


@pytest.fixture(scope="module")
def overflowing_meta(tmp_path_factory, mini_meta):
    meta = tmp_path_factory.mktemp("overflow") / "meta"
    shutil.copytree(mini_meta, meta)
    f = meta / "consolidated.00.pth"
    sd = torch.load(f, weights_only=True)
    for k in FFN_KEYS:
        sd[k] = (sd[k].float() * FFN_SCALE).to(sd[k].dtype)
        assert sd[k].half().isfinite().all()  # the weights fit fp16: only activations overflow
    torch.save(sd, f)
    return meta


@pytest.mark.parametrize("dtype, code", [("fp16", 1), ("fp32", 0)])
def test_fp16_overflow_on_large_activations(dtype, code, overflowing_meta, tmp_path):
    out = tmp_path / "run"
    r = run_parity("run", "--sizes", "7b-mini", "--tests", "boolq", "--backends", "meta,hf", "--dtype", dtype,
                   "--out", out, "--checkpoint", f"7b-mini:meta={overflowing_meta}")
    assert r.returncode == code, r.stderr[-3000:]
    units = json.loads((out / "manifest.json").read_text())["units"]
    if dtype == "fp32":
        assert {u["status"] for u in units.values()} == {"done"}
        return
    assert {u["status"] for u in units.values()} == {"failed"}
    for backend in ("meta", "hf"):
        err = units[f"7b-mini/{backend}/boolq"]["error"]
        assert err.startswith(f"{backend}: non-finite log-likelihood") and "boolq" in err and "doc" in err, err
    assert (out / "report.md").is_file()
    assert run_parity("check", out).returncode == 1
