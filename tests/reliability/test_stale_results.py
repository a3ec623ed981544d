"""Results are never silently reused when the checkpoint that produced them changed.

tests/test_run_e2e.py shows a changed dtype recomputes and kill-and-resume reuses finished units; here
the checkpoint itself changes under an existing results directory: its fingerprint (file names, sizes,
mtimes) changes, so exactly that backend's units are rescored and the others reused.
"""

from __future__ import annotations

import json

import torch
from cli_helpers import counts, run_parity

from parity.checkpoints.convert import convert

ARGS = ["run", "--sizes", "7b-mini", "--backends", "meta,hf", "--tests", "boolq,mmlu_anatomy", "--no-report"]


def test_changed_checkpoint_is_rescored_not_reused(mini_meta, tmp_path):
    from safetensors.torch import load_file, save_file

    hf = convert("meta", "hf", mini_meta, tmp_path / "hf")
    out = tmp_path / "run"
    flag = ["--checkpoint", f"7b-mini:hf={hf}", "--out", out]
    r = run_parity(*ARGS, *flag)
    assert r.returncode == 0, r.stderr[-3000:]
    before = (out / "7b-mini" / "hf" / "boolq.jsonl").read_text()
    assert counts(run_parity(*ARGS, *flag).stderr) == (4, 0)  # unchanged: everything reused

    # another model under the same path: the final norm doubled (same file names and sizes)
    shard = sorted(hf.glob("*.safetensors"))[-1]
    tensors = load_file(shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, shard, metadata={"format": "pt"})
    r = run_parity(*ARGS, *flag)
    assert r.returncode == 0, r.stderr[-3000:]
    assert counts(r.stderr) == (2, 2)  # meta's units reused, hf's rescored
    after = (out / "7b-mini" / "hf" / "boolq.jsonl").read_text()
    assert after != before
    ll = [json.loads(x)["loglik"] for x in after.splitlines()]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in ll)
