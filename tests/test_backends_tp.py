"""Tensor / model parallel through the real worker path (torchrun + gloo on CPU), on 70b-mini.

Megatron at TP 1, 2 and 8 and Meta at MP 1, 2 (8 files re-sharded) and at its native 8 files agree
with themselves within 1e-5 (+ 1e-6 relative). With the real Llama-2 tokenizer (vocab 32000, from
../shared; the module is skipped without it) Megatron's TP 8 checkpoint pads the vocab to 32768: the
padded rows are filled with NaN and the scores must still agree. A repeated launch (TP 2, both stacks)
writes byte-identical scores. Few launches: each is one job with two units. The TP 1 references are
scored in this process (as tests/test_backends_parity.py scores them; every `parity run` in the suite
takes the worker path at TP 1): a launch would only add a worker's start-up.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from parity.backends.worker import launch
from backend_helpers import compare, converted, meta_checkpoint, read_unit_scores, real_requests, write_job

SIZE = "70b-mini"
ATOL_SELF = 1e-5
RTOL_SELF = 1e-6  # sharded matmuls sum in another order: a few fp32 ulps on log-likelihoods near -100


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama2_tokenizer):
    meta_dir = meta_checkpoint(SIZE, tokenizer=llama2_tokenizer)
    reqs = real_requests(meta_dir / "tokenizer.model", n_copa=40, n_mmlu=15)
    units = {"copa": [r for r in reqs if len(r.continuation) > 1], "mmlu": [r for r in reqs if len(r.continuation) == 1]}
    assert units["copa"] and units["mmlu"]
    return meta_dir, units, tmp_path_factory.mktemp("tp")


def run(setup, backend: str, ckpt, tp: int, name: str | None = None, only: str | None = None
        ) -> tuple[list, list[bytes]]:
    """(scores in request order, the raw bytes of each unit's scores file) of one launch (`only`: one unit)."""
    _, units, tmp = setup
    units = {only: units[only]} if only else units
    job = tmp / f"{name or f'{backend}-tp{tp}'}.json"
    outs = write_job(job, backend, ckpt, tp, units)
    proc = launch(job, tp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(p.with_name(p.name + ".error.json").exists() for p in outs.values())
    return ([s for name, reqs in units.items() for s in read_unit_scores(reqs, outs[name])],
            [outs[name].read_bytes() for name in units])


def in_process(setup, backend: str, ckpt) -> list:
    """Scores in request order at TP 1, loaded in this process (world size 1 needs no torchrun)."""
    from parity.backends.worker import load_backend

    b = load_backend(backend, ckpt, tp=1, device="cpu", dtype="fp32")
    return [s for reqs in setup[1].values() for s in b.loglikelihood(reqs, "auto")]


def poisoned_padding(tp8: Path, out: Path) -> Path:
    """A copy of a TP 8 checkpoint whose padded vocab rows (embedding and output layer) are NaN."""
    import torch

    from parity.checkpoints.megatron import read_args
    from parity.io import load_torch

    shutil.copytree(tp8, out)
    args = read_args(out)
    assert (args.vocab_size, args.padded_vocab_size) == (32000, 32768)  # Llama-2's vocab at TP 8
    per_rank = args.padded_vocab_size // 8
    last = out / "release" / "mp_rank_07" / "model_optim_rng.pt"
    ck = load_torch(last)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        w = ck["model"][key]
        assert w.shape[0] == per_rank and not w[args.vocab_size - 7 * per_rank:].any()  # written as zeros
        w[args.vocab_size - 7 * per_rank:] = float("nan")
    torch.save(ck, last)
    return out


def test_megatron_tp_1_2_8_and_meta_mp_1_8_agree(setup):
    meta_dir, units, tmp = setup
    runs = {
        "meta mp1": (in_process(setup, "meta", meta_dir), None),
        "megatron tp1": (in_process(setup, "megatron", converted(meta_dir, "megatron", 1)), None),
        "meta mp8 (native files)": run(setup, "meta", meta_dir, 8),
        "meta mp2 (re-sharded files)": run(setup, "meta", meta_dir, 2),
        "megatron tp2": run(setup, "megatron", converted(meta_dir, "megatron", 2), 2),
        # TP 8 on a copy whose 768 padded vocab rows are NaN: equal to TP 1 below, so the padded logits are
        # never scored (one NaN would show)
        "megatron tp8": run(setup, "megatron", poisoned_padding(converted(meta_dir, "megatron", 8),
                                                                tmp / "megatron-tp8-nan-padding"), 8),
    }
    scores = {k: v[0] for k, v in runs.items()}
    for a, b in [("meta mp8 (native files)", "meta mp1"), ("meta mp2 (re-sharded files)", "meta mp1"),
                 ("megatron tp2", "megatron tp1"),
                 ("megatron tp8", "megatron tp1")]:
        worst, _, flips = compare(scores[a], scores[b])
        print(f"{SIZE} {a} vs {b}: max |diff| {worst:.2e}, greedy flips {flips}")
        assert flips == 0
        assert all(math.isclose(x.loglik, y.loglik, rel_tol=RTOL_SELF, abs_tol=ATOL_SELF)
                   for x, y in zip(scores[a], scores[b]))
    worst, _, flips = compare(scores["megatron tp8"], scores["meta mp8 (native files)"])
    print(f"{SIZE} megatron tp8 vs meta mp8: max |diff| {worst:.2e}")
    assert worst < 1e-4 and flips == 0
    # Determinism at TP 2 under torchrun (gloo all-reduce and all-gather), both stacks: a second launch
    # writes the very same bytes (one unit: the mmlu requests, which the first launch wrote second).
    for key, backend, ckpt in [("meta mp2 (re-sharded files)", "meta", meta_dir),
                               ("megatron tp2", "megatron", converted(meta_dir, "megatron", 2))]:
        _, again = run(setup, backend, ckpt, 2, name=f"{backend}-tp2-again", only="mmlu")
        assert again == runs[key][1][1:], key


def test_wrong_tp_for_megatron_checkpoint_is_user_error(setup, capfd):
    meta_dir, units, tmp = setup
    job = tmp / "bad-tp.json"
    outs = write_job(job, "megatron", converted(meta_dir, "megatron", 2), 1, {"mmlu": units["mmlu"][:4]})
    proc = launch(job, 1)
    assert proc.returncode == 2
    assert "tensor-parallel shards" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(p.exists() for p in outs.values())
