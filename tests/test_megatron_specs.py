"""Megatron as users run it: Transformer Engine tensor names (what TE-trained legacy checkpoints store)
round-trip through the converters and load into the local spec; bf16 casts the whole model like
Megatron-LM's Float16Module (the local spec's torch.nn.RMSNorm weights are made in fp32); the te spec is
refused with one line where it cannot run (no transformer_engine, or cpu)."""

from __future__ import annotations

import pytest
import torch

from parity.backends import worker
from parity.checkpoints import megatron as mg
from parity.checkpoints.convert import convert
from parity.checkpoints.meta import MetaSource
from parity.errors import UserError
from backend_helpers import converted, meta_checkpoint

TE_NORMS = ("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
            "decoder.layers.1.mlp.linear_fc1.layer_norm_weight")
LOCAL_NORMS = ("decoder.layers.1.input_layernorm.weight", "decoder.layers.1.pre_mlp_layernorm.weight")


@pytest.fixture(scope="module")
def te_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("te") / "megatron-te"
    convert("meta", "megatron", meta_checkpoint("13b-mini"), out, megatron_spec="te")
    return out


def test_renaming_is_one_alias_per_norm_row():
    state = {k: i for i, k in enumerate(LOCAL_NORMS + ("decoder.layers.1.mlp.linear_fc1.weight",))}
    te = mg.named_for(state, "te")
    assert list(te) == [*TE_NORMS, "decoder.layers.1.mlp.linear_fc1.weight"]
    assert mg.canonical(te) == state and mg.canonical(state) == state
    assert mg.named_for(state, "local") == state
    with pytest.raises(UserError, match="unknown megatron layer spec"):
        mg.named_for(state, "apex")


def test_te_names_written_and_read_back(te_checkpoint, tmp_path):
    raw = torch.load(te_checkpoint / "release" / "mp_rank_01" / mg.CKPT_NAME, weights_only=False)
    assert set(TE_NORMS) <= set(raw["model"]) and not set(LOCAL_NORMS) & set(raw["model"])
    assert raw["args"].transformer_impl == "transformer_engine"
    back = convert("megatron", "meta", te_checkpoint, tmp_path / "meta")
    a, b = MetaSource(meta_checkpoint("13b-mini")), MetaSource(back)
    for key in a.spec.keys():
        assert torch.equal(a.get(key), b.get(key)), key


def test_a_te_named_checkpoint_scores_like_a_local_one(tmp_path):
    ids = [1, 5, 9, 200, 17, 33, 4, 8]
    te = convert("meta", "megatron", meta_checkpoint("7b-mini"), tmp_path / "te", megatron_spec="te")
    local = converted(meta_checkpoint("7b-mini"), "megatron", 1)
    assert torch.equal(worker.load_backend("megatron", te).logits(ids),
                       worker.load_backend("megatron", local).logits(ids))


def test_bf16_casts_the_whole_model_like_float16module():
    m = worker.load_backend("megatron", converted(meta_checkpoint("7b-mini"), "megatron", 1), dtype="bf16")
    dtypes = {name: p.dtype for name, p in m.model.named_parameters()}
    assert dtypes["decoder.layers.0.input_layernorm.weight"] == torch.bfloat16  # torch.nn.RMSNorm: made fp32
    assert set(dtypes.values()) == {torch.bfloat16}
    assert m.details() == {"spec": "local"}


def test_te_spec_is_refused_with_one_line_where_it_cannot_run():
    ckpt = converted(meta_checkpoint("7b-mini"), "megatron", 1)
    with pytest.raises(UserError, match="te layer spec .* runs on cuda only"):
        worker.load_backend("megatron", ckpt, options={"spec": "te"})
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        from parity.backends.megatron import _layer_spec

        with pytest.raises(UserError, match="needs transformer_engine, which does not import here"):
            _layer_spec("te", "cuda", ckpt)


def test_megatron_spec_flag_only_for_megatron_outputs(tmp_path):
    with pytest.raises(UserError, match="--megatron-spec applies only to --to megatron"):
        convert("meta", "hf", meta_checkpoint("7b-mini"), tmp_path / "hf", megatron_spec="te")


def test_fusions_compile_on_first_call_not_at_import():
    """megatron-core's import no longer pays for torch's compiler (about 3 s of CPU per rank), and a
    deferred torch.compile still compiles and runs: with options and as a bare decorator."""
    import subprocess
    import sys

    from parity.backends.megatron import _compile_on_first_call

    real = torch.compile
    with _compile_on_first_call():
        add = torch.compile(lambda x: x + 1, backend="eager")
        double = torch.compile(backend="eager")(lambda x: x * 2)
    assert torch.compile is real
    assert add(torch.ones(2)).tolist() == [2.0, 2.0] and double(torch.ones(2)).tolist() == [2.0, 2.0]

    probe = ("import sys, torch; from parity.backends.megatron import import_megatron_core; import_megatron_core(); "
             "from megatron.core.fusions.fused_bias_swiglu import swiglu; "
             "print('torch._inductor.compile_fx' in sys.modules, torch.compile.__module__, swiglu.__wrapped__.__name__)")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "torch", "swiglu"], out.stdout + out.stderr
