"""Tokenizer, synthetic Meta checkpoints, the readers the backends use, format detection."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from parity.arch import MINI_SIZES, get_size
from parity.checkpoints import detect_format, tokenizer_path
from parity.checkpoints import megatron as mg
from parity.checkpoints import meta
from parity.checkpoints.convert import convert
from parity.checkpoints.synthetic import cached_checkpoint, make_checkpoint
from parity.errors import UserError
from parity.tokenizer import default_tokenizer, load_sp


def digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_default_tokenizer_is_llama2_like_and_deterministic(tmp_path, monkeypatch):
    first = default_tokenizer()
    sp = load_sp(first)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.vocab_size() % 64 == 0
    text = "Žluťoučký kůň 我喜欢读书 42"  # byte fallback: text outside the corpus round-trips
    assert sp.decode(sp.encode(text)) == text
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "fresh"))  # train again from scratch
    again = default_tokenizer()
    assert again != first and again.read_bytes() == first.read_bytes()


def test_make_checkpoint_is_deterministic_and_split_like_meta(tmp_path):
    a = make_checkpoint("70b-mini", tmp_path / "a")
    b = make_checkpoint("70b-mini", tmp_path / "elsewhere" / "b")
    assert digest(a) == digest(b)  # same args -> same bytes (torch.save's zip included)
    c = make_checkpoint("70b-mini", tmp_path / "c", seed=1)
    assert digest(c)["consolidated.00.pth"] != digest(a)["consolidated.00.pth"]

    size = get_size("70b-mini")
    assert json.loads((a / "params.json").read_text()) == size.params_json(-1)
    assert json.loads((a / "params.json").read_text())["vocab_size"] == -1
    assert meta.n_files(a) == size.n_files == 8
    shard = torch.load(a / "consolidated.03.pth", weights_only=True)
    vocab = load_sp(a / "tokenizer.model").vocab_size()
    hd = size.head_dim
    assert shard["tok_embeddings.weight"].shape == (vocab, size.dim // 8)  # dim split
    assert shard["output.weight"].shape == (vocab // 8, size.dim)  # vocab split
    assert shard["layers.0.attention.wk.weight"].shape == (size.n_kv_heads * hd // 8, size.dim)
    assert shard["layers.1.attention.wo.weight"].shape == (size.dim, size.dim // 8)
    assert shard["layers.1.feed_forward.w2.weight"].shape == (size.dim, size.ffn_dim // 8)
    assert shard["layers.0.attention_norm.weight"].shape == (size.dim,)
    assert shard["tok_embeddings.weight"].dtype == torch.bfloat16

    params, state = meta.load_meta(a)
    assert params == size.params_json(-1)
    norm = state["layers.0.attention_norm.weight"].float()
    assert 0.05 < norm.std() < 0.2 and abs(norm.mean() - 1) < 0.05  # varied around 1
    assert not torch.equal(state["layers.0.attention_norm.weight"], state["layers.0.ffn_norm.weight"])
    w = state["layers.0.attention.wq.weight"].float()
    assert 0.01 < w.std() < 0.5 and w.abs().max() > 0
    # replicated tensors are identical in every file
    shard7 = torch.load(a / "consolidated.07.pth", weights_only=True)
    assert torch.equal(shard["norm.weight"], shard7["norm.weight"])


@pytest.mark.parametrize("name", MINI_SIZES)
def test_readers_for_backends(name, tmp_path):
    src = cached_checkpoint(name)
    size = get_size(name)
    assert detect_format(src) == "meta" and tokenizer_path(src) == src / "tokenizer.model"
    assert meta.read_params(src)["n_heads"] == size.n_heads
    params, state = meta.load_meta(src)
    out = convert("meta", "megatron", src, tmp_path / "mg")
    assert detect_format(out) == "megatron" and tokenizer_path(out).is_file()
    args = mg.read_args(out)
    assert mg.tp_size(out) == size.tp == args.tensor_model_parallel_size
    vocab = state["tok_embeddings.weight"].shape[0]
    assert args.vocab_size == vocab and args.padded_vocab_size % (128 * size.tp) == 0
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
            args.num_query_groups) == (size.n_layers, size.dim, size.ffn_dim, size.n_heads, size.n_kv_heads)
    assert args.group_query_attention == (size.n_kv_heads != size.n_heads)
    assert args.tokenizer_type == "Llama2Tokenizer" and args.params_dtype == torch.bfloat16
    last = mg.load_rank(out, size.tp - 1)
    emb = last["embedding.word_embeddings.weight"]
    assert emb.shape[0] == args.padded_vocab_size // size.tp
    if args.padded_vocab_size > vocab:  # pad rows are zero
        pad = args.padded_vocab_size - vocab
        assert torch.count_nonzero(emb[-pad:]) == 0 and torch.count_nonzero(emb[:-pad]) > 0
    hf = convert("meta", "hf", src, tmp_path / "hf")
    assert detect_format(hf) == "hf"


def test_qkv_and_fc1_layout_matches_the_documented_rule():
    """linear_qkv rows per kv group: [q heads of g, k_g, v_g]; fc1: this rank's gate then up rows."""
    from parity.checkpoints.megatron import rank_state
    from parity.checkpoints.meta import MetaSource
    from parity.checkpoints.spec import permute

    src = MetaSource(cached_checkpoint("70b-mini"))
    s = src.spec.size
    hd, per = s.head_dim, s.n_heads // s.n_kv_heads
    tp = 2
    wq = permute(src.get("layers.0.attention.wq.weight"), s.n_heads)
    wk = permute(src.get("layers.0.attention.wk.weight"), s.n_kv_heads)
    wv = src.get("layers.0.attention.wv.weight")
    st = rank_state(src, tp, 1, src.dtype)
    qkv = st["decoder.layers.0.self_attention.linear_qkv.weight"]
    g = s.n_kv_heads // tp  # rank 1's first group
    block = (per + 2) * hd
    assert torch.equal(qkv[:per * hd], wq[g * per * hd:(g + 1) * per * hd])
    assert torch.equal(qkv[per * hd:per * hd + hd], wk[g * hd:(g + 1) * hd])
    assert torch.equal(qkv[block - hd:block], wv[g * hd:(g + 1) * hd])
    fc1 = st["decoder.layers.0.mlp.linear_fc1.weight"]
    half = s.ffn_dim // tp
    assert torch.equal(fc1[:half], src.get("layers.0.feed_forward.w1.weight")[half:])
    assert torch.equal(fc1[half:], src.get("layers.0.feed_forward.w3.weight")[half:])


def test_detect_format_errors(tmp_path):
    with pytest.raises(UserError, match="format"):
        detect_format(tmp_path)
    with pytest.raises(UserError, match="tokenizer.model"):
        tokenizer_path(tmp_path)


def test_make_checkpoint_cli(tmp_path, capsys):
    from parity.cli import main

    out = tmp_path / "ck"
    assert main(["make-checkpoint", "--size", "7b-mini", "--out", str(out), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert main(["make-checkpoint", "--size", "7b-mini", "--out", str(out)]) == 2  # exists, not clobbered
    assert "not empty" in capsys.readouterr().err
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    for tok in (bad, tmp_path / "missing.model"):
        assert main(["make-checkpoint", "--size", "7b-mini", "--out", str(tmp_path / "x"),
                     "--tokenizer", str(tok)]) == 2
        err = capsys.readouterr().err.strip()
        assert str(tok) in err and len(err.splitlines()) == 1
        assert not (tmp_path / "x").exists()
