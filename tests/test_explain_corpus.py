"""`parity explain` on the converter bug corpus: for every bug kind and format (hf, megatron TP 1, TP 2),
on 7b-mini and 70b-mini (GQA), in fp32 and bf16, the first divergence is exactly the injected layer's
first boundary the bug can affect; the intact conversions of all three mini sizes show none.

Cost: every checkpoint is traced once, by one worker launch per stack and TP (meta, hf, megatron TP 1,
megatron TP 2; units with their own checkpoint and dtype), through the same machinery `parity explain`
uses (parity.trace.worker.launch_traces). One thread per rank: on these tiny shapes more threads only
add synchronisation (measured 5x slower per forward on a loaded 2-core machine).
"""

from __future__ import annotations

import time

import pytest
import torch

from backend_helpers import converted, meta_checkpoint
from parity.arch import MINI_SIZES, get_size
from parity.trace.boundaries import boundary_names
from parity.trace.compare import NOISE_REFERENCE, compare, first_divergence, summary
from parity.trace.corpus import BUGS, applies, expected, make_buggy
from parity.trace.explain import DEFAULT_TEXT, text_inputs
from parity.trace.worker import launch_traces

BUG_SIZES = ["7b-mini", "70b-mini"]
DTYPES = ["fp32", "bf16"]
FORMATS = {"hf": ("hf", 1), "megatron-tp1": ("megatron", 1), "megatron-tp2": ("megatron", 2)}
LAYER = 1  # the minis have layers 0 and 1: a bug in layer 1 must leave all of layer 0 clean


def _stack_ckpt(meta_dir, fmt, tp):
    return converted(meta_dir, fmt, tp if fmt == "megatron" else None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The comparisons here are ~4000 small tensor ops: on a loaded machine torch's thread pool makes each
    one wait for the others (seconds per test); one thread does them in milliseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """(format, size, kind or None, dtype) -> capture; ("meta", size, None, dtype) -> the reference's."""
    root = tmp_path_factory.mktemp("corpus")
    t0 = time.perf_counter()
    metas = {s: meta_checkpoint(s) for s in MINI_SIZES}
    inputs = text_inputs(DEFAULT_TEXT, metas["7b-mini"] / "tokenizer.model")
    keys: dict[str, list] = {}
    targets: dict[str, list] = {}
    for size in MINI_SIZES:
        for d in DTYPES + sorted({NOISE_REFERENCE[d] for d in DTYPES} - set(DTYPES)):
            keys.setdefault("meta", []).append(("meta", size, None, d))
            targets.setdefault("meta", []).append((metas[size], d))
        for name, (fmt, tp) in FORMATS.items():
            intact = _stack_ckpt(metas[size], fmt, tp)
            kinds = [None] + ([k for k in BUGS if applies(k, fmt, get_size(size))] if size in BUG_SIZES else [])
            for kind in kinds:
                ckpt = intact if kind is None else make_buggy(kind, intact, root / f"{size}-{name}-{kind}", LAYER)
                for d in DTYPES:
                    keys.setdefault(name, []).append((name, size, kind, d))
                    targets.setdefault(name, []).append((ckpt, d))
    made = time.perf_counter() - t0
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        for name in targets:
            fmt, tp = FORMATS.get(name, ("meta", 1))
            t = time.perf_counter()
            out.update(zip(keys[name], launch_traces(fmt, tp, targets[name], inputs, root / f"work-{name}")))
            print(f"{name}: {len(targets[name])} traces in {time.perf_counter() - t:.1f}s")
    print(f"checkpoints made in {made:.1f}s; {sum(map(len, targets.values()))} traces of {len(inputs[0])} tokens")
    return out


def _rows(traced, name, size, kind, dtype):
    return compare(traced[("meta", size, None, dtype)], traced[(name, size, kind, dtype)],
                   traced[("meta", size, None, NOISE_REFERENCE[dtype])], dtype)


def test_every_stack_fills_the_same_boundaries(traced):
    for size in MINI_SIZES:
        names = boundary_names(get_size(size).n_layers)
        shapes = {n: tuple(t.shape) for n, t in traced[("meta", size, None, "fp32")].items()}
        assert list(shapes) == names
        s = get_size(size)
        assert shapes["layers.0.q"] == (shapes["embed"][0], s.n_heads, s.head_dim)
        assert shapes["layers.0.k"] == shapes["layers.0.v"] == (shapes["embed"][0], s.n_kv_heads, s.head_dim)
        assert shapes["layers.0.mlp_act"][1] == s.ffn_dim
        for name in FORMATS:
            got = traced[(name, size, None, "fp32")]
            assert list(got) == names, (name, size)
            assert {n: tuple(t.shape) for n, t in got.items()} == shapes, (name, size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FORMATS))
def test_intact_conversions_show_no_divergence(traced, name, dtype):
    for size in MINI_SIZES:
        rows = _rows(traced, name, size, None, dtype)
        assert first_divergence(rows) is None, (size, summary(rows))
        worst = max(r.rel_l2 / r.threshold for r in rows)
        print(f"{name} {size} {dtype}: closest to its threshold at {worst:.2f} of it")


@pytest.mark.parametrize("kind", list(BUGS))
@pytest.mark.parametrize("name", list(FORMATS))
def test_bug_is_named_at_its_layer_and_first_boundary(traced, name, kind):
    fmt = FORMATS[name][0]
    cases = [(s, d) for s in BUG_SIZES for d in DTYPES if applies(kind, fmt, get_size(s))]
    if not cases:
        pytest.skip(f"{kind} is not a bug a {fmt} checkpoint can have")
    want = expected(kind, LAYER)
    for size, dtype in cases:
        rows = _rows(traced, name, size, kind, dtype)
        first = first_divergence(rows)
        assert first is not None and first.name == want, (size, dtype, summary(rows))
        print(f"{name} {kind} {size} {dtype}: {summary(rows)}, {first.rel_l2 / first.threshold:.1f}x its threshold")
