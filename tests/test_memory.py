"""GPU memory logic without a GPU: the rows x length^2 bound of "auto" batches, the out-of-memory back-off
(a fake OOM), the largest batch a job reserves for, and Meta's kv cache allocated once."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from parity.backends import worker
from parity.backends.base import Backend
from parity.errors import UserError
from parity.requests import Request
from backend_helpers import meta_checkpoint


class Fake(Backend):
    """Logits from a cumulative one-hot (rows independent of each other); runs out of "memory" on batches
    of more than `fits` rows."""

    name = "fake"

    def __init__(self, fits: int | None = None, vocab: int = 13, max_length: int = 64):
        self.vocab_size, self.max_length, self.fits = vocab, max_length, fits
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
        self.calls: list[tuple[int, int]] = []

    def load(self) -> None:
        raise AssertionError("never called")

    def forward(self, tokens):
        if self.fits is not None and tokens.shape[0] > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fake, {tokens.shape[0]} rows)")
        self.calls.append(tuple(tokens.shape))
        return torch.nn.functional.one_hot(tokens, self.vocab_size).float().cumsum(1) @ self.table


def requests(n: int = 40) -> list[Request]:
    return [Request((1,) + tuple(2 + (i * 7 + j) % 9 for j in range(3 + i % 11)), (4 + i % 5, 3)) for i in range(n)]


def test_auto_batches_are_bounded_by_attention_scores():
    b = Fake()
    b.device = torch.device("cuda")  # the token budget of a GPU: 32768
    assert b.batch_rows("auto", 4096) == 8  # tokens alone: 8 rows of 4096 ...
    # ... but Meta keeps ~12 bytes per score element: 8 x 32 heads x 4096^2 x 12 = 51.5 GB for 7b at TP 1
    b.score_bytes, b.heads_per_rank, b.score_budget = 12, 32, 20 * 10**9
    assert b.batch_rows("auto", 4096) == 3
    assert b.batch_rows("auto", 512) == 64  # short inputs: the token / row caps bind first
    b.score_budget = 10**6
    assert b.batch_rows("auto", 4096) == 1  # never below one row
    assert b.batch_rows(16, 4096) == 16  # an explicit --batch-size is the user's choice


def test_out_of_memory_halves_the_batch_and_scores_the_same(capsys):
    rs = requests()
    want = Fake().loglikelihood(rs, 16)
    b = Fake(fits=5)
    got = b.loglikelihood(rs, 16)
    assert [(s.loglik, s.is_greedy) for s in got] == [(s.loglik, s.is_greedy) for s in want]
    assert max(r for r, _ in b.calls) <= 5 and b.oom_backoffs == 2  # 16 -> 8 -> 4 rows
    assert sum(r for r, _ in b.calls) == len({r.context + r.continuation[:-1] for r in rs})  # each input once
    err = capsys.readouterr().err
    assert "fake: out of GPU memory on a batch of 16 x " in err and "retrying the same requests in 8 rows" in err
    assert b.batch_rows(16, 10) == 4  # later batches keep the smaller budget


def test_out_of_memory_on_one_row_is_one_line():
    with pytest.raises(UserError, match="out of GPU memory on a single input of .* tokens"):
        Fake(fits=0).loglikelihood(requests(3), "auto")


def test_largest_batch_is_the_largest_forward():
    b = Fake()
    rs = requests(300)
    most = b.largest_batch(rs, 8)
    b.loglikelihood(rs, 8)
    assert most == max(r * w for r, w in b.calls)


def test_meta_kv_cache_is_allocated_once_for_the_job():
    meta = worker.load_backend("meta", meta_checkpoint("7b-mini"))
    rs = [Request((1,) + tuple(range(5, 5 + n)), (7, 8)) for n in range(1, 60, 3)]
    tokens = meta.largest_batch(rs, 4)
    meta.reserve(tokens)
    buffers = [(a.attention.flat_k.data_ptr(), a.attention.flat_v.data_ptr()) for a in meta.model.layers]
    shapes, forward = set(), meta.forward

    def watched(tokens):
        out = forward(tokens)
        for layer in meta.model.layers:  # the cache the model just used is a view of the job's buffer
            att = layer.attention
            assert att.cache_k.untyped_storage().data_ptr() == att.flat_k.data_ptr()
            assert att.cache_v.untyped_storage().data_ptr() == att.flat_v.data_ptr()
        shapes.add(tuple(tokens.shape))
        return out

    meta.forward = watched
    first = meta.loglikelihood(rs, 4)
    for batch in (3, 2):
        meta.loglikelihood(rs, batch)
    assert len(shapes) > 10  # many batch shapes ...
    # ... and not one new allocation
    assert [(a.attention.flat_k.data_ptr(), a.attention.flat_v.data_ptr()) for a in meta.model.layers] == buffers
    assert meta._cache_tokens == tokens
    again = meta.loglikelihood(rs, 4)  # stale cache contents never leak into a batch
    assert [s.loglik for s in again] == [s.loglik for s in first]


def test_ranks_load_in_turns(tmp_path):
    """dist.load_in_turns under torchrun (2 ranks, gloo): the two loads never overlap, rank 0 first."""
    from parity.backends.worker import _torchrun

    script = tmp_path / "turns.py"
    script.write_text(f"""
import json, os, time
from parity.backends.dist import init_distributed, load_in_turns, shutdown
rank, world = init_distributed("cpu")
def load():
    start = time.time(); time.sleep(1.0); return [start, time.time()]
span = load_in_turns(load)
open(os.path.join({str(tmp_path)!r}, f"rank{{rank}}.json"), "w").write(json.dumps(span))
shutdown(clean=True)
""")
    r = subprocess.run([*_torchrun(), "--standalone", "--nnodes", "1", "--nproc-per-node", "2", str(script)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (s0, e0), (s1, e1) = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert e0 <= s1  # rank 1 began after rank 0 had finished
