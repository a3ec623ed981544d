"""Converters: exact round trips, transformers loading, the real tokenizer, and every bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from parity.arch import MINI_SIZES, get_size
from parity.checkpoints.convert import convert, open_source
from parity.checkpoints.synthetic import cached_checkpoint, make_checkpoint
from parity.cli import main
from cli_helpers import RunsCode
from conversion_checks import FRESH_ATOL, PROBE_TEXT, fresh_conversion_gap, probe_ids, round_trip_changes

TPS = [1, 2, 4, 8]


def same_tensors(a: Path, b: Path, fmt: str = "meta") -> None:
    sa, sb = open_source(fmt, a), open_source(fmt, b)
    assert sa.spec == sb.spec
    for k in sa.spec.keys():
        x, y = sa.get(k), sb.get(k)
        assert x.dtype == y.dtype and torch.equal(x, y), k


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {s: convert("meta", "hf", cached_checkpoint(s), root / s) for s in MINI_SIZES}


@pytest.mark.parametrize("name", MINI_SIZES)
@pytest.mark.parametrize("tp", TPS)
def test_round_trip_is_bit_exact(name, tp, hf_dirs, tmp_path):
    src = cached_checkpoint(name)
    if not get_size(name).valid_tp(tp):
        with pytest.raises(Exception, match="does not divide"):
            convert("hf", "megatron", hf_dirs[name], tmp_path / "mg", target_tp=tp)
        assert not (tmp_path / "mg").exists()
        return
    # not just equal tensors: the very same files
    assert round_trip_changes(src, tmp_path, ("hf", "megatron", "hf"), tp, first=hf_dirs[name]) == []


def test_meta_to_megatron_in_one_call_and_meta_resplit(tmp_path):
    src = cached_checkpoint("13b-mini")
    mg = convert("meta", "megatron", src, tmp_path / "mg", target_tp=4)
    a, b = open_source("meta", src), open_source("megatron", mg)
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.spec.keys())
    one = convert("meta", "meta", src, tmp_path / "one", target_files=1)
    assert len(list(one.glob("consolidated.*.pth"))) == 1
    same_tensors(src, one)
    f32 = convert("meta", "hf", src, tmp_path / "f32", dtype="fp32")
    s32 = open_source("hf", f32)
    assert s32.dtype == torch.float32
    assert torch.equal(s32.get("layers.1.attention.wk.weight"), a.get("layers.1.attention.wk.weight").float())


@pytest.mark.parametrize("fmt", ["hf", "megatron"])
@pytest.mark.parametrize("name", MINI_SIZES)
def test_fresh_conversion_computes_meta_logits(name, fmt):
    """Converted now (cached by the converter's source, as `parity run` does) and loaded by its own stack
    (transformers offline; megatron-core at TP 1), every mini computes the Meta reference's logits."""
    meta_dir = cached_checkpoint(name)
    gap, ckpt = fresh_conversion_gap(meta_dir, fmt)
    print(f"{name} {fmt} (fresh conversion) vs meta: max |logit diff| {gap:.2e}")
    assert gap < FRESH_ATOL
    if fmt == "hf":
        from transformers import AutoConfig, AutoTokenizer

        cfg, size = AutoConfig.from_pretrained(ckpt, local_files_only=True), get_size(name)
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (
            size.n_heads, size.n_kv_heads, size.ffn_dim)
        tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
        assert tok(PROBE_TEXT)["input_ids"] == probe_ids(meta_dir)


def test_real_llama2_tokenizer(llama2_tokenizer, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    src = make_checkpoint("7b-mini", tmp_path / "meta", tokenizer=llama2_tokenizer)
    assert open_source("meta", src).spec.vocab == 32000
    hf = convert("meta", "hf", src, tmp_path / "hf")
    assert AutoTokenizer.from_pretrained(hf).vocab_size == 32000
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    text = "The quick brown fox jumps over the lazy dog, and 42 birds sang."
    assert AutoTokenizer.from_pretrained(hf)(text)["input_ids"] == [1] + sp.encode(text)
    mg = convert("hf", "megatron", hf, tmp_path / "mg", target_tp=8)
    from parity.checkpoints.megatron import read_args

    a = read_args(mg)
    assert a.vocab_size == 32000 and a.padded_vocab_size == 32768  # next multiple of 128 * 8


# ---- bad input: one line naming the file, exit 2, no output directory left ------------------------

def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def expect_user_error(capsys, out: Path, *argv, match: str) -> str:
    rc, err = run_cli(capsys, *argv)
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # no half-written temp dir either
    return err


def test_bad_missing_params_and_config(capsys, meta_copy, hf_dirs, tmp_path):
    src = meta_copy("7b-mini")
    (src / "params.json").unlink()
    out = tmp_path / "out"
    expect_user_error(capsys, out, "convert", "--from", "meta", "--to", "hf", "--load-dir", str(src),
                      "--save-dir", str(out), match=f"{src / 'params.json'}")
    hf = tmp_path / "hf"
    shutil.copytree(hf_dirs["7b-mini"], hf)
    (hf / "config.json").unlink()
    expect_user_error(capsys, out, "convert", "--from", "hf", "--to", "meta", "--load-dir", str(hf),
                      "--save-dir", str(out), match=f"{hf / 'config.json'}")


def test_bad_number_of_consolidated_files(capsys, meta_copy, tmp_path):
    src = meta_copy("13b-mini")
    (src / "consolidated.01.pth").unlink()
    out = tmp_path / "out"
    expect_user_error(capsys, out, "convert", "--from", "meta", "--to", "hf", "--load-dir", str(src),
                      "--save-dir", str(out), "--size", "13b-mini", match="found 1 consolidated file(s)")
    err = expect_user_error(capsys, out, "convert", "--from", "meta", "--to", "hf", "--load-dir", str(src),
                            "--save-dir", str(out), match="consolidated.00.pth")
    assert "shape" in err
    src2 = meta_copy("70b-mini")
    (src2 / "consolidated.03.pth").unlink()
    expect_user_error(capsys, out, "convert", "--from", "meta", "--to", "hf", "--load-dir", str(src2),
                      "--save-dir", str(out), match="missing")


def test_bad_tensor_shape_and_missing_key(capsys, meta_copy, tmp_path):
    out = tmp_path / "out"
    src = meta_copy("7b-mini")
    f = src / "consolidated.00.pth"
    sd = torch.load(f, weights_only=True)
    sd["layers.1.attention.wv.weight"] = sd["layers.1.attention.wv.weight"][:-8]
    torch.save(sd, f)
    err = expect_user_error(capsys, out, "convert", "--from", "meta", "--to", "megatron", "--load-dir", str(src),
                            "--save-dir", str(out), match=str(f))
    assert "layers.1.attention.wv.weight" in err and "shape" in err
    del sd["layers.1.attention.wv.weight"]
    torch.save(sd, f)
    err = expect_user_error(capsys, out, "convert", "--from", "meta", "--to", "megatron", "--load-dir", str(src),
                            "--save-dir", str(out), match=str(f))
    assert "missing key 'layers.1.attention.wv.weight'" in err


def test_bad_tp_and_unknown_size(capsys, tmp_path):
    src = cached_checkpoint("70b-mini")
    out = tmp_path / "out"
    expect_user_error(capsys, out, "convert", "--from", "meta", "--to", "megatron", "--load-dir", str(src),
                      "--save-dir", str(out), "--target-tp", "16", match="does not divide")
    expect_user_error(capsys, out, "convert", "--from", "meta", "--to", "megatron", "--load-dir", str(src),
                      "--save-dir", str(out), "--target-tp", "3", match="does not divide")
    expect_user_error(capsys, out, "make-checkpoint", "--size", "7b-tiny", "--out", str(out),
                      match="unknown size '7b-tiny'")
    expect_user_error(capsys, out, "convert", "--from", "meta", "--to", "hf", "--load-dir", str(src),
                      "--save-dir", str(out), "--size", "7b-tiny", match="unknown size")


def test_bad_truncated_or_corrupt_files(capsys, meta_copy, hf_dirs, tmp_path):
    """Cut short, or one byte changed in the middle: one line naming the file and saying what is wrong."""
    out = tmp_path / "out"

    def refused(fmt, d, f, what):
        err = expect_user_error(capsys, out, "convert", "--from", fmt, "--to", "hf" if fmt != "hf" else "meta",
                                "--load-dir", str(d), "--save-dir", str(out), match=str(f))
        assert what in err, err

    def cut(f):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    def flip(f):  # a byte in the middle of the file: tensor data, which torch.load never checks
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(bytes(raw))

    for damage, what in [(cut, "truncated or corrupt"), (flip, "fails its CRC-32 check")]:
        src = meta_copy("7b-mini")
        damage(src / "consolidated.00.pth")
        refused("meta", src, src / "consolidated.00.pth", what)
        mg = convert("meta", "megatron", cached_checkpoint("7b-mini"), tmp_path / f"mg-{damage.__name__}")
        f = mg / "release" / "mp_rank_00" / "model_optim_rng.pt"
        damage(f)
        refused("megatron", mg, f, what)
    hf = tmp_path / "hf"
    shutil.copytree(hf_dirs["7b-mini"], hf)
    shard = sorted(hf.glob("*.safetensors"))[1]
    cut(shard)  # (safetensors has no checksum: a changed byte in its tensor data cannot be told; README)
    refused("hf", hf, shard, "truncated or corrupt")


def test_bad_pickle_that_would_run_code(capsys, meta_copy, tmp_path):
    out = tmp_path / "out"
    marker = tmp_path / "pwned"
    src = meta_copy("7b-mini")
    f = src / "consolidated.00.pth"
    sd = torch.load(f, weights_only=True)
    sd["rope.freqs"] = RunsCode(marker)
    torch.save(sd, f)
    expect_user_error(capsys, out, "convert", "--from", "meta", "--to", "hf", "--load-dir", str(src),
                      "--save-dir", str(out), match="refused")
    assert not marker.exists()
    # the payload is live: unsafe loading does run it (so the check above could have failed)
    torch.load(f, weights_only=False)
    assert marker.exists()


def test_bad_megatron_inputs(capsys, tmp_path):
    out = tmp_path / "out"
    mg = convert("meta", "megatron", cached_checkpoint("13b-mini"), tmp_path / "mg")
    shutil.rmtree(mg / "release" / "mp_rank_01")
    expect_user_error(capsys, out, "convert", "--from", "megatron", "--to", "hf", "--load-dir", str(mg),
                      "--save-dir", str(out), match="mp_rank")
    (mg / "latest_checkpointed_iteration.txt").unlink()
    expect_user_error(capsys, out, "convert", "--from", "megatron", "--to", "hf", "--load-dir", str(mg),
                      "--save-dir", str(out), match="latest_checkpointed_iteration.txt")


def test_existing_output_is_not_clobbered(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    rc, err = run_cli(capsys, "convert", "--from", "meta", "--to", "hf", "--load-dir",
                      str(cached_checkpoint("7b-mini")), "--save-dir", str(out))
    assert rc == 2 and "not empty" in err and (out / "keep").read_text() == "x"


def test_bad_hf_missing_key(capsys, hf_dirs, tmp_path):
    import json

    out = tmp_path / "out"
    hf = tmp_path / "hf"
    shutil.copytree(hf_dirs["70b-mini"], hf)
    index = hf / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index.write_text(json.dumps(data))
    expect_user_error(capsys, out, "convert", "--from", "hf", "--to", "megatron", "--load-dir", str(hf),
                      "--save-dir", str(out), match="missing key 'model.layers.1.mlp.up_proj.weight'")


@pytest.mark.parametrize("tp", TPS)
def test_meta_to_megatron_reads_blocks_exactly(tp, hf_dirs, tmp_path):
    """Meta files (8 of them) -> megatron at every TP, compared with the slow hf route, file for file."""
    src = cached_checkpoint("70b-mini")
    direct = convert("meta", "megatron", src, tmp_path / "direct", target_tp=tp)
    via_hf = convert("hf", "megatron", hf_dirs["70b-mini"], tmp_path / "via", target_tp=tp)
    from parity.checkpoints.megatron import load_rank

    for r in range(tp):
        a, b = load_rank(direct, r), load_rank(via_hf, r)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # every tensor owns exactly its bytes (a view would drag a whole storage into the file)
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in a.values())
