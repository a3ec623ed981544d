"""A backend is one adapter class plus one registry row: a toy stack registered from this module, with no
other file touched, is scored by `parity run` end to end (issue 10's acceptance test)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from parity.backends import BACKENDS, BackendInfo, register
from parity.backends.base import Backend
from parity.dtypes import torch_dtype


class ToyBackend(Backend):
    """transformers' AutoModelForCausalLM on an HF directory: the whole adapter contract."""

    name = "toy"

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(self.checkpoint, dtype=torch_dtype(self.dtype)).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.check_vocab(self.vocab_size)
        self.max_length = self.requested_max_length or int(self.model.config.max_position_embeddings)

    def forward(self, tokens):
        return self.model(input_ids=tokens).logits


@pytest.fixture
def toy_registered(monkeypatch):
    # the worker is another process: it imports this module by the adapter path the Job carries
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    register(BackendInfo("toy", f"{__name__}:ToyBackend", "hf", default=False))
    yield
    BACKENDS.pop("toy")


def test_toy_backend_is_scored_end_to_end(toy_registered, tmp_path, capsys):
    from parity.cli import main

    out = tmp_path / "run"
    rc = main(["run", "--sizes", "7b-mini", "--backends", "meta,toy", "--tests", "boolq,mmlu_anatomy",
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: u["status"] for k, u in manifest["units"].items()} == {
        f"7b-mini/{b}/{t}": "done" for b in ("meta", "toy") for t in ("boolq", "mmlu_anatomy")}
    job = json.loads((out / "jobs" / "7b-mini-toy.json").read_text())
    assert job["adapter"] == f"{__name__}:ToyBackend"
    # the toy runs the same converted HF weights as the hf backend would: it agrees with the reference
    for test in ("boolq", "mmlu_anatomy"):
        ref = [json.loads(x) for x in (out / "7b-mini" / "meta" / f"{test}.jsonl").open()]
        toy = [json.loads(x) for x in (out / "7b-mini" / "toy" / f"{test}.jsonl").open()]
        assert [r["request_hashes"] for r in ref] == [t["request_hashes"] for t in toy]
        assert max(abs(a - b) for r, t in zip(ref, toy) for a, b in zip(r["loglik"], t["loglik"])) < 1e-4
    assert "7b-mini  toy" in printed  # the first screen: one line per size and backend
    assert "toy" not in BACKENDS or not BACKENDS["toy"].default  # not in anyone's default set


def test_unknown_backend_names_the_registry(capsys):
    from parity.cli import main

    assert main(["run", "--backends", "meta,vllm", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'vllm'; known backends: meta, hf, megatron" in err
