"""The worker and launcher: job handling, failed units, resumption, launch commands, bad input."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from parity.backends import worker
from parity.backends.base import Backend
from parity.errors import UserError
from parity.requests import Request, read_scores
from backend_helpers import meta_checkpoint, write_job


class TinyBackend(Backend):
    """A deterministic stand-in stack: logits depend on the previous tokens through a cumulative sum."""

    name = "tiny"

    def __init__(self, vocab: int = 11, max_length: int = 16, poison: int | None = None):
        # a test double: no checkpoint to load, so it skips Backend's constructor
        self.vocab_size, self.max_length, self.poison = vocab, max_length, poison
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(vocab, vocab, generator=g)
        self.calls: list[tuple[int, int]] = []

    def load(self) -> None:
        raise AssertionError("never called: __init__ does not use Backend's constructor")

    def forward(self, tokens):
        self.calls.append(tuple(tokens.shape))
        h = torch.nn.functional.one_hot(tokens, self.vocab_size).float().cumsum(1)
        out = h @ self.table
        if self.poison is not None:
            out[tokens == self.poison] = float("nan")
        return out


def reqs(n: int = 12) -> list[Request]:
    return [Request((1, 2 + i % 5, 3), tuple(range(4, 4 + 1 + i % 3))) for i in range(n)]


def test_results_in_request_order_and_independent_of_batching():
    b = TinyBackend()
    rs = reqs() + [Request((1, 2, 3), (t,)) for t in (4, 5, 6, 7)]
    one, auto = b.loglikelihood(rs, 1), b.loglikelihood(rs, "auto")
    for r, s1, s2 in zip(rs, one, auto):
        assert abs(s1.loglik - s2.loglik) < 1e-5 and s1.is_greedy == s2.is_greedy
        # recompute request r alone from full logits: order is preserved
        ids = list(r.context + r.continuation)
        lp = b.logits(ids[:-1]).log_softmax(-1)
        want = sum(lp[len(r.context) - 1 + k, t].item() for k, t in enumerate(r.continuation))
        assert abs(s1.loglik - want) < 1e-5


def test_single_token_choices_share_one_forward():
    b = TinyBackend()
    b.loglikelihood([Request((1, 2, 3), (t,)) for t in (4, 5, 6, 7)], "auto")
    assert b.calls == [(1, 3)]


def test_token_outside_vocab_is_user_error():
    with pytest.raises(UserError, match="outside the checkpoint's vocab"):
        TinyBackend(vocab=11).loglikelihood([Request((1, 2), (40,))])


def _fake_loader(monkeypatch, backend):
    monkeypatch.setattr(worker, "_construct", lambda *a, **k: backend)


def test_nonfinite_unit_fails_alone_and_existing_outputs_are_skipped(tmp_path, monkeypatch, capsys):
    _fake_loader(monkeypatch, TinyBackend(poison=9))
    good, bad, done = reqs(6), [Request((1, 9), (4,))] + reqs(2), reqs(3)
    outs = write_job(tmp_path / "job.json", "meta", tmp_path, 1, {"bad": bad, "good": good, "done": done})
    outs["done"].write_text("sentinel\n")  # already complete: must not be recomputed or touched
    from parity.cli import main

    assert main(["score", str(tmp_path / "job.json")]) == 2
    assert f"meta: non-finite log-likelihood (nan) for request {bad[0].hash}" in capsys.readouterr().err
    err = json.loads(outs["bad"].with_name(outs["bad"].name + ".error.json").read_text())
    assert "meta: non-finite log-likelihood (nan) for request " + bad[0].hash in err["error"]
    assert err["request"] == bad[0].hash
    assert not outs["bad"].exists()
    scores = read_scores(outs["good"])
    assert set(scores) == {r.hash for r in good} and all(math.isfinite(s.loglik) for s in scores.values())
    assert outs["done"].read_text() == "sentinel\n"


def test_cli_score_bad_job_exits_2(tmp_path, capsys):
    from parity.cli import main

    assert main(["score", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: job file not found" in capsys.readouterr().err
    (tmp_path / "j.json").write_text('{"backend": "meta", "adapter": "parity.backends.meta:MetaBackend", '
                                     '"checkpoint": "x", "tp": 1, "units": [], "dtype": "fp8"}')
    assert main(["score", str(tmp_path / "j.json")]) == 2
    assert "dtype 'fp8'" in capsys.readouterr().err
    (tmp_path / "j.json").write_text('{"backend": "meta", "tp": 1, "units": []}')
    assert main(["score", str(tmp_path / "j.json")]) == 2
    assert "job file lacks 'checkpoint'" in capsys.readouterr().err
    # without an adapter the job names a registered backend, whose row gives it
    (tmp_path / "j.json").write_text('{"backend": "nope", "checkpoint": "x", "tp": 1, "units": []}')
    assert main(["score", str(tmp_path / "j.json")]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


def test_launch_commands(monkeypatch, tmp_path):
    job = tmp_path / "j.json"
    assert worker.launch_command(job, 1) == [sys.executable, "-m", "parity", "score", str(job)]
    cmd = worker.launch_command(job, 8)
    assert Path(cmd[0]).name == "torchrun" and cmd[1:] == [
        "--standalone", "--nnodes", "1", "--nproc-per-node", "8", "-m", "parity", "score", str(job)]
    monkeypatch.setenv("PARITY_NNODES", "2")
    monkeypatch.setenv("PARITY_RDZV_ENDPOINT", "node0:29400")
    cmd = worker.launch_command(job, 16, launcher="torchrun")
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--nproc-per-node") + 1] == "8"
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "node0:29400"
    monkeypatch.setenv("PARITY_NPROC_PER_NODE", "8")
    cmd = worker.launch_command(job, 16, launcher="slurm", device="cuda")
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8"]
    assert "--nproc-per-node 8" in cmd[-1] and "node0:29400" in cmd[-1] and str(job) in cmd[-1]


def test_torchrun_missing_is_user_error(monkeypatch, tmp_path):
    monkeypatch.setattr(worker.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(worker.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="torchrun not found"):
        worker.launch_command(tmp_path / "j.json", 2)


def test_bad_checkpoint_inputs_are_user_errors(tmp_path):
    meta_dir = meta_checkpoint("7b-mini")
    with pytest.raises(UserError, match="checkpoint directory not found"):
        worker.load_backend("meta", tmp_path / "nope")
    with pytest.raises(UserError, match="tokenizer vocab 32000"):
        worker.load_backend("meta", meta_dir, tp=1, tokenizer_vocab=32000)
    with pytest.raises(UserError, match="does not divide"):
        worker.load_backend("meta", meta_dir, tp=3)
    with pytest.raises(UserError, match="tokenizer vocab 32000"):
        worker.load_backend("hf", _hf(meta_dir), tokenizer_vocab=32000)
    empty = tmp_path / "empty-meta"
    empty.mkdir()
    (empty / "params.json").write_text((meta_dir / "params.json").read_text())
    with pytest.raises(UserError, match=f"{empty}: no consolidated.NN.pth files"):
        worker.load_backend("meta", empty, tp=1)


def _hf(meta_dir):
    from backend_helpers import converted

    return converted(meta_dir, "hf")


def test_megatron_tp_not_dividing_heads_is_user_error():
    from backend_helpers import converted

    mg = converted(meta_checkpoint("70b-mini"), "megatron", 8)
    with pytest.raises(UserError, match="tensor-parallel shards"):
        worker.load_backend("megatron", mg, tp=3)
