"""The Llama 3 family (issue 16): sizes as released, requests with Llama 3's tiktoken tokenizer, the HF
tokenizer that encodes like it, bit-exact round trips, the three stacks' logits with 3.1's scaled rotary,
and the bad inputs.

The minis carry the real 128256-token vocabulary, so their embedding is most of their weights: each is
made once per test cache (backend_helpers.meta_checkpoint) and converted once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from parity.arch import LLAMA3_MINI_SIZES, LLAMA31_SCALING, SIZES, get_size
from parity.requests import Request
from backend_helpers import SHARED_DATA, compare, converted, meta_checkpoint, string_pairs
from parity.cli import main

ATOL = 1e-4  # fp32 logits / log-likelihoods across stacks, as for Llama 2 (test_backends_parity.py)
SCALED_APART = 1e-2  # scaled vs unscaled rotary must move the logits more than this


# ---------------------------------------------------------------------------------------------- sizes
def test_real_sizes_are_llama_models_own():
    """Every Llama 3 / 3.1 size against llama_models' sku_list (arch_args, pth_file_count; 405b: MP8)."""
    from llama_models.sku_list import all_registered_models

    by_id = {}
    for m in all_registered_models():
        if m.variant in (None, "", "bf16-mp8") and m.quantization_format.value == "bf16":
            by_id[m.core_model_id.value] = m
    names = {"llama3-8b": "Llama-3-8B", "llama3-70b": "Llama-3-70B", "llama3.1-8b": "Llama3.1-8B",
             "llama3.1-70b": "Llama3.1-70B", "llama3.1-405b": "Llama3.1-405B"}
    for name, model_id in names.items():
        for suffix in ("", "-instruct"):
            s, m = get_size(name + suffix), by_id[model_id + ("-Instruct" if suffix else "")]
            a = m.arch_args
            assert (s.dim, s.n_layers, s.n_heads, s.n_kv_heads, s.multiple_of, s.ffn_dim_multiplier, s.norm_eps,
                    s.rope_theta) == (a["dim"], a["n_layers"], a["n_heads"], a["n_kv_heads"], a["multiple_of"],
                                      a["ffn_dim_multiplier"], a["norm_eps"], a["rope_theta"]), name + suffix
            assert (s.rope_scaling is not None) == a["use_scaled_rope"], name
            assert s.n_files == m.pth_file_count == s.tp, name
            assert s.params_json(a["vocab_size"]) == {k: v for k, v in a.items()}, name
    assert get_size("llama3.1-405b").ffn_dim == 53248 and get_size("llama3-8b").ffn_dim == 14336


@pytest.mark.parametrize("mini", LLAMA3_MINI_SIZES)
def test_minis_keep_what_matters(mini):
    real = get_size(mini.removesuffix("-mini"))
    s = get_size(mini)
    assert (s.n_heads, s.n_kv_heads, s.multiple_of, s.ffn_dim_multiplier, s.n_files, s.tp, s.rope_theta,
            s.rope_scaling, s.family) == (real.n_heads, real.n_kv_heads, real.multiple_of, real.ffn_dim_multiplier,
                                          real.n_files, real.tp, real.rope_theta, real.rope_scaling, "llama3")
    assert s.dim < 1024 and s.n_layers == 2 and s.valid_tp(s.tp)
    if s.rope_scaling:  # a rotary frequency the scaling changes exists at this head_dim
        freqs = 1.0 / s.rope_theta ** (torch.arange(0, s.head_dim, 2).float() / s.head_dim)
        wavelen = 2 * torch.pi / freqs
        assert (wavelen > LLAMA31_SCALING.original_max_position_embeddings / LLAMA31_SCALING.high_freq_factor).any()


def test_llama2_names_unchanged():
    for name in ("7b", "13b", "70b", "7b-mini", "13b-mini", "70b-mini", "70b-chat"):
        s = SIZES[name]
        assert s.family == "llama2" and s.rope_theta == 10000.0 and s.rope_scaling is None
        assert "rope_theta" not in s.params_json()  # Llama 2's params.json does not name it


# ---------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def llama3_tok():
    from parity.tokenizer import llama3_tokenizer, load_tokenizer

    return load_tokenizer(llama3_tokenizer())


def test_requests_use_tiktoken_and_lm_eval_split(llama3_tok):
    from parity.tasks.tokenize import encode_pair

    r = encode_pair(llama3_tok, "Question: 2+2=\nAnswer: ", "4")
    assert r.context[0] == 128000 == llama3_tok.bos_id  # <|begin_of_text|>
    assert list(r.context[1:]) == llama3_tok.encode("Question: 2+2=\nAnswer:")
    whole = llama3_tok.encode("Question: 2+2=\nAnswer: 4")
    assert list(r.continuation) == whole[len(r.context) - 1:] == llama3_tok.encode(" 4")
    # tiktoken itself, not a re-implementation: llama-models' encode with BOS
    assert [*r.context, *r.continuation] == llama3_tok.tok.encode("Question: 2+2=\nAnswer: 4", bos=True, eos=False)
    assert llama3_tok.vocab_size == 128256


def test_hf_tokenizer_encodes_like_tiktoken_on_xcopa(llama3_tok, tmp_path):
    """The HF output's tokenizer: AutoTokenizer offline, every XCOPA language, as tiktoken encodes."""
    from transformers import AutoTokenizer

    from parity.checkpoints.hf_tokenizer import write_tokenizer_files

    write_tokenizer_files(llama3_tok.path, tmp_path, 131072)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    texts = ["<|begin_of_text|>is text", "  x  y\n\n\t", "Ça va? 1234567"]
    langs = sorted((SHARED_DATA / "xcopa").glob("*/test.*.jsonl"))
    if not langs:
        pytest.skip("../shared/data/xcopa is absent")
    for f in langs:
        for line in f.read_text(encoding="utf-8").splitlines()[:25]:
            d = json.loads(line)
            texts += [d["premise"], " " + d["choice1"], d["choice2"]]
    got = hf(texts)["input_ids"]
    want = [[llama3_tok.bos_id, *llama3_tok.encode(t)] for t in texts]
    assert len(langs) >= 11 and got == want


# ---------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("mini", LLAMA3_MINI_SIZES)
def test_round_trip_bit_exact(mini, tmp_path):
    """meta -> hf -> megatron legacy (Meta's TP) [-> megatron torch_dist] -> meta: the very same files."""
    from parity.checkpoints.convert import convert, open_source
    from parity.checkpoints.megatron import read_args

    src = meta_checkpoint(mini)
    s = get_size(mini)
    params = json.loads((src / "params.json").read_text())
    assert params["vocab_size"] == 128256 and params["rope_theta"] == 500000.0
    assert params["use_scaled_rope"] == (s.rope_scaling is not None)
    emb = torch.load(src / "consolidated.00.pth", weights_only=True, mmap=True)["tok_embeddings.weight"]
    assert tuple(emb.shape) == (128256 // s.n_files, s.dim)  # Llama 3 files split the embedding on vocab
    hf = converted(src, "hf")  # meta -> hf, shared with the backend tests below
    cfg = json.loads((hf / "config.json").read_text())
    if s.rope_scaling:
        assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert cfg["rope_parameters"]["rope_theta"] == 500000.0 and cfg["bos_token_id"] == 128000
    mg = convert("hf", "megatron", hf, tmp_path / "mg", target_tp=s.tp)
    a = read_args(mg)
    assert (a.rotary_base, a.use_rope_scaling, a.rope_scaling_factor, a.tokenizer_type) == (
        500000, s.rope_scaling is not None, 8.0, "HuggingFaceTokenizer")
    if s.tp == 1:  # torch_dist is written in TP-1 layout from any source: the 8b minis cover it (time)
        mg = convert("megatron", "megatron", mg, tmp_path / "td", megatron_format="torch_dist")
    back = convert("megatron", "meta", mg, tmp_path / "back")
    assert open_source("meta", back).spec == open_source("meta", src).spec
    for f in src.iterdir():
        assert f.read_bytes() == (back / f.name).read_bytes(), f.name


# ---------------------------------------------------------------------------------------------- backends
_loaded: dict = {}


def backend(kind: str, mini: str):
    key = (kind, mini)
    if key not in _loaded:
        from parity.backends.worker import load_backend

        meta_dir = meta_checkpoint(mini)
        ckpt = {"meta": meta_dir, "hf": converted(meta_dir, "hf"),
                "megatron": converted(meta_dir, "megatron", tp=1)}[kind]
        _loaded[key] = load_backend(kind, ckpt, tp=1, device="cpu", dtype="fp32")
    return _loaded[key]


def long_ids(tok, n: int = 400) -> list[int]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    return [tok.bos_id, *tok.encode(text)][:n]


def unscaled_hf(hf: Path, out: Path) -> Path:
    """The HF checkpoint with its rope scaling removed (the weights linked, not copied)."""
    out.mkdir()
    for f in hf.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    cfg = json.loads((hf / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("mini", LLAMA3_MINI_SIZES)
def test_hf_and_megatron_logits_equal_meta(mini, llama3_tok, tmp_path):
    ids = long_ids(llama3_tok)
    ref = backend("meta", mini).logits(ids)
    assert ref.shape == (len(ids), 128256)
    for kind in ("hf", "megatron"):
        diff = (backend(kind, mini).logits(ids) - ref).abs().max().item()
        print(f"{mini}: {len(ids)} positions, max |logit diff| {kind} vs meta {diff:.2e}")
        assert diff < ATOL
    if get_size(mini).rope_scaling:  # the same weights without 3.1's scaling are far off: the test can fail
        from parity.backends.worker import load_backend

        plain = load_backend("hf", unscaled_hf(converted(meta_checkpoint(mini), "hf"), tmp_path / "plain"),
                             tp=1, device="cpu", dtype="fp32")
        apart = (plain.logits(ids) - ref).abs().max().item()
        print(f"{mini}: scaled vs unscaled rotary, max |logit diff| {apart:.2e}")
        assert apart > SCALED_APART


def test_three_backends_agree_on_real_data(llama3_tok):
    from parity.tasks.tokenize import encode_pair

    mini = "llama3.1-8b-mini"  # loaded for the logits test already; TP 8 is covered by the default run
    reqs = [encode_pair(llama3_tok, c, x) for c, x in string_pairs(n_copa=30, n_mmlu=8)]
    assert all(isinstance(r, Request) and r.context[0] == 128000 for r in reqs)
    ref = backend("meta", mini).loglikelihood(reqs, "auto")
    for kind in ("hf", "megatron"):
        worst, mean, flips = compare(ref, backend(kind, mini).loglikelihood(reqs, "auto"))
        print(f"{mini} {kind} vs meta: {len(reqs)} requests, max |diff| {worst:.2e}, mean {mean:.2e}")
        assert worst < ATOL and flips == 0


# ---------------------------------------------------------------------------------------------- bad input
def run_parity(*argv) -> tuple[int, str]:
    """`parity ARGV` in this process (a subprocess costs seconds of imports per call on 2 cores)."""
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue().strip()


def assert_one_line_error(r: tuple[int, str], *needles: str) -> None:
    rc, err = r
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (rc, err)
    for n in needles:
        assert n in err, (n, err)


def test_family_mismatch_is_one_line(tmp_path):
    """Llama 2 70b and Llama 3 70b have the same shapes: a params.json names its family by its rope."""
    l3 = meta_checkpoint("llama3.1-8b-mini")
    as_l2 = tmp_path / "as-l2"  # a Llama 2 params.json (no rope_theta: 10000) on llama3.1-8b-mini's shapes
    shutil.copytree(l3, as_l2)
    params = json.loads((as_l2 / "params.json").read_text())
    for k in ("rope_theta", "use_scaled_rope"):
        params.pop(k)
    (as_l2 / "params.json").write_text(json.dumps(params))
    r = run_parity("convert", "--from", "meta", "--to", "hf", "--load-dir", as_l2, "--save-dir", tmp_path / "o",
                   "--size", "llama3.1-8b-mini")
    assert_one_line_error(r, "params.json", "llama2: rope_theta 10000 model", "size llama3.1-8b-mini is llama3")
    l2 = meta_checkpoint("70b-mini")
    as_l3 = tmp_path / "as-l3"  # a Llama 3.1 params.json on 70b-mini's shapes
    shutil.copytree(l2, as_l3)
    params = json.loads((as_l3 / "params.json").read_text())
    (as_l3 / "params.json").write_text(json.dumps({**params, "rope_theta": 500000.0, "use_scaled_rope": True}))
    r = run_parity("convert", "--from", "meta", "--to", "hf", "--load-dir", as_l3, "--save-dir", tmp_path / "o",
                   "--size", "70b-mini")
    assert_one_line_error(r, "params.json", "llama3: rope_theta 500000, scaled rotary (3.1) model",
                          "size 70b-mini is llama2")
    hf = converted(meta_checkpoint("llama3-8b-mini"), "hf")  # 3.0 (no scaling) named as 3.1
    r = run_parity("convert", "--from", "hf", "--to", "meta", "--load-dir", hf, "--save-dir", tmp_path / "o",
                   "--size", "llama3.1-8b-mini")
    assert_one_line_error(r, "config.json", "has rope_theta 500000,", "llama3.1-8b-mini is llama3")
    assert not (tmp_path / "o").exists()


def test_tokenizer_mismatch_is_one_line(tmp_path):
    from parity.tokenizer import default_tokenizer

    r = run_parity("make-checkpoint", "--size", "llama3.1-8b-mini", "--out", tmp_path / "m",
                   "--tokenizer", default_tokenizer())
    assert_one_line_error(r, "sentencepiece", "llama3.1-8b-mini is llama3")
    r = run_parity("convert", "--from", "meta", "--to", "hf", "--load-dir", meta_checkpoint("llama3-8b-mini"),
                   "--save-dir", tmp_path / "o", "--tokenizer", default_tokenizer())
    assert_one_line_error(r, "tokenizer has 1024 pieces but the checkpoint's vocab is 128256")


def test_unrepresentable_rope_scaling_is_one_line(tmp_path):
    hf = converted(meta_checkpoint("llama3.1-8b-mini"), "hf")
    bad = tmp_path / "hf"
    shutil.copytree(hf, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0,
                              "original_max_position_embeddings": 8192}
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run_parity("convert", "--from", "hf", "--to", "megatron", "--load-dir", bad, "--save-dir", tmp_path / "o")
    assert_one_line_error(r, "config.json", "yarn", "cannot be represented")
    from parity.checkpoints.megatron import read_args, rope_of

    mg = converted(meta_checkpoint("llama3.1-8b-mini"), "megatron", tp=1)
    args = read_args(mg)
    args.rope_scaling_factor = 16.0  # megatron-core would take it; Meta's reference cannot
    with pytest.raises(Exception, match="rope_scaling_factor 16 cannot be represented"):
        rope_of(args, mg)
