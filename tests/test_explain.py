"""`parity explain` and `parity check --explain` as a user runs them, and their bad input.

The per-bug matrix is tests/test_explain_corpus.py; here: the command line end to end on one corpus
bug, a failing stored run explained by `parity check --explain`, and
the one-line refusals (an untraceable backend, a request longer than the context, a run whose
checkpoint changed since, fp64, --test without --run).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from cli_helpers import run_parity

from backend_helpers import converted, meta_checkpoint
from parity.backends import BACKENDS, BackendInfo, register
from parity.errors import UserError
from parity.io import load_torch
from parity.trace.capture import Tracer
from parity.trace.corpus import expected, make_buggy

SIZE = "7b-mini"
TESTS = "boolq,piqa,winogrande,hellaswag,xcopa_it,mmlu_anatomy"
ENV = {"OMP_NUM_THREADS": "1"}  # tiny shapes: one thread per rank is fastest


def test_explain_cli_names_a_corpus_bug(tmp_path):
    bad = make_buggy("gate_up", converted(meta_checkpoint(SIZE), "megatron", 1), tmp_path / "bad", layer=1)
    out = tmp_path / "explain"
    r = run_parity("explain", "--size", SIZE, "--backends", "meta,megatron", "--checkpoint",
                   f"{SIZE}:megatron={bad}", "--json", "--out", out, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["first_divergence"] == {"boundary": expected("gate_up", 1), "layer": 1, "module": "mlp_act"}
    rows = result["boundaries"]
    assert rows[0]["name"] == "embed" and rows[-1]["name"] == "logits" and len(rows) == 1 + 2 * 10 + 2
    assert set(rows[0]) == {"name", "layer", "module", "max_abs", "rel_l2", "cosine", "noise", "threshold", "diverged"}
    assert not any(r["diverged"] for r in rows[:rows.index(next(r for r in rows if r["diverged"]))])
    assert result["noise"]["reference_dtype"] == "fp64" and "fp64" in result["noise"]["method"]  # a fp32 run
    md = (out / "explain.md").read_text()
    assert "| layers.1.mlp_act |" in md and "<- first divergence" in md
    assert (out / "explain.png").read_bytes()[:4] == b"\x89PNG"
    assert "first divergence at layers.1.mlp_act" in r.stderr


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    """A stored run of meta and megatron on 7b-mini whose megatron checkpoint has layer 1's fused QKV rows
    shuffled (a converter that got the grouped layout wrong), scored on six tests with no baseline."""
    root = tmp_path_factory.mktemp("failing")
    bad = root / "megatron-shuffled"
    shutil.copytree(converted(meta_checkpoint(SIZE), "megatron", 1), bad)
    f = bad / "release" / "mp_rank_00" / "model_optim_rng.pt"
    ck = load_torch(f)
    key = "decoder.layers.1.self_attention.linear_qkv.weight"
    w = ck["model"][key]
    ck["model"][key] = w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))].clone()
    torch.save(ck, f)
    run = root / "run"
    r = run_parity("run", "--sizes", SIZE, "--backends", "meta,megatron", "--tests", TESTS, "--out", run,
                   "--checkpoint", f"{SIZE}:megatron={bad}", "--no-report", env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return run, bad


def test_check_names_the_tests_that_moved_and_where_the_stacks_part(failing_run):
    run, _ = failing_run
    r = run_parity("check", run, env=ENV)
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    moved = [ln for ln in r.stdout.splitlines() if ln.startswith(f"- {SIZE} / megatron / ")]
    assert moved, r.stdout  # the tests are named although there is no baseline
    assert "moved (worst first: percent error, flips, delta growth)" in r.stdout
    def rank(ln):  # worst first: percent error (n/a counts as none), then flips
        err = ln.split(": error ", 1)[1].split("%")[0]
        flips = re.search(r", (\d+) flip", ln)
        return (0.0 if err.startswith("n/a") else float(err), int(flips.group(1)) if flips else 0)
    assert [rank(ln) for ln in moved] == sorted(map(rank, moved), reverse=True), moved
    assert "first divergence" not in r.stdout  # only with --explain (it loads models)

    r = run_parity("check", run, "--explain", env=ENV)
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(f"{SIZE}/megatron: "))
    assert line.startswith(f"{SIZE}/megatron: first divergence at layers.1.q (rel "), line
    worst = moved[0].split(" / ")[2].split(":")[0]
    assert f"traced on {worst} doc" in line
    assert list((run / "explain").glob("*/explain.md"))


def one_line(capsys, argv: list, *needles: str) -> str:
    """`parity ARGV` in this process: exit 2 with one stderr line holding every needle."""
    from parity.cli import main

    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_explain_run_refuses_changed_checkpoints_and_unknown_docs(failing_run, capsys):
    run, bad = failing_run
    one_line(capsys, ["explain", "--run", run, "--test", "boolq", "--doc", "no-such-doc"], "--doc no-such-doc", "boolq")
    later = bad / "release" / "mp_rank_00" / "model_optim_rng.pt"
    os.utime(later, ns=(later.stat().st_atime_ns, later.stat().st_mtime_ns + 10**9))
    one_line(capsys, ["explain", "--run", run], "changed since run", f"{SIZE}/megatron", "fingerprint")


def test_explain_run_defaults_to_the_worst_backend_and_test(tmp_path):
    from report_fakes import make_run

    from parity.report import build_report
    from parity.trace.explain import worst_pair, worst_test

    report = build_report(make_run(tmp_path / "r"))  # megatron is the noisy one there
    assert worst_pair(report, "7b-mini") == ["meta", "megatron"]
    deltas = {t: c["max_abs_delta"] for t, c in report["comparisons"]["7b-mini"]["megatron"].items()}
    assert worst_test(report, "7b-mini", "megatron") == max(deltas, key=deltas.get)


def test_bad_requests_and_flags_are_one_line(capsys):
    meta = meta_checkpoint(SIZE)
    given = ["--size", SIZE, "--backends", "meta,hf", "--checkpoint", f"{SIZE}:meta={meta}",
             "--checkpoint", f"{SIZE}:hf={converted(meta, 'hf')}"]  # given: no progress lines on stderr
    long_text = " ".join(["word"] * 1100)  # over 7b-mini's context of 1024 tokens
    err = one_line(capsys, ["explain", *given, "--text", long_text], "tokens long", "context of 1024 tokens")
    assert int(err.split("request is ")[1].split()[0]) > 1024
    one_line(capsys, ["explain", *given, "--dtype", "fp64"], "fp64")
    one_line(capsys, ["explain", *given, "--test", "boolq"], "--run")
    one_line(capsys, ["explain", "--size", SIZE, "--backends", "meta"], "two backends")


@pytest.fixture
def untraceable(monkeypatch):
    register(BackendInfo("toy", "nowhere:ToyBackend", "hf", default=False))
    yield
    BACKENDS.pop("toy")


def test_untraceable_backend_is_one_line(untraceable, capsys):
    one_line(capsys, ["explain", "--size", SIZE, "--backends", "meta,toy"], "backend 'toy' cannot be traced")


def test_a_model_without_the_tables_modules_cannot_be_traced():
    class Fake:  # an adapter named like a traceable stack whose model is something else
        name = "hf"
        model = torch.nn.Sequential(torch.nn.Linear(2, 2))

    with pytest.raises(UserError, match="cannot be traced: its model has no 'model.layers'"):
        Tracer(Fake())
