"""Megatron checkpoints as Megatron writes them today (issue 15): torch_dist read and write, proofs
against megatron-core's own writer and reader, pipeline-parallel legacy checkpoints, bad input.

Cost: megatron-core's own writer runs once per module (one torchrun launch saves TP 2 and TP 1, about a
minute on 2 cores) and serves every assertion about it; megatron-core's own reader is the megatron
backend's torch_dist path, loaded in this process at TP 1 and through `parity run` at TP 1 and 2.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from parity.arch import MINI_SIZES
from parity.checkpoints.convert import convert, open_source
from parity.checkpoints.megatron import megatron_format, stage_layers
from parity.checkpoints.synthetic import cached_checkpoint
from parity.cli import main
from cli_helpers import RunsCode, assert_one_line_error, run_parity

TP_PP = [(1, 1), (2, 1), (1, 2), (2, 2)]  # all valid on the mini sizes (2 layers; 2 divides heads, groups, ffn)
HERE = Path(__file__).resolve().parent


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def same_tensors(a, b) -> None:
    assert a.spec == b.spec
    for k in a.spec.keys():
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and torch.equal(x, y), k


def user_error(capsys, out: Path, *argv: str, match: str) -> str:
    """`parity ...` in this process: exit 2, one line containing `match`, `out` never created."""
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    return err


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", MINI_SIZES)
def test_meta_torch_dist_hf_meta_is_bit_exact(name, tmp_path):
    src = cached_checkpoint(name)
    td = convert("meta", "megatron", src, tmp_path / "td", megatron_format="torch_dist")
    assert megatron_format(td) == "torch_dist" and not list(td.glob("release/mp_rank_*"))
    hf = convert("auto", "hf", td, tmp_path / "hf")  # detected as megatron, then as torch_dist inside
    back = convert("hf", "meta", hf, tmp_path / "meta")
    assert files(back) == files(src)


@pytest.mark.parametrize("name", MINI_SIZES)
def test_legacy_tp_pp_to_torch_dist_and_back_is_bit_exact(name, tmp_path):
    src = cached_checkpoint(name)
    legacy = {(t, p): convert("meta", "megatron", src, tmp_path / f"legacy-tp{t}-pp{p}", target_tp=t, target_pp=p)
              for t, p in TP_PP}
    assert sorted(q.name for q in (legacy[(2, 2)] / "release").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    dist = {tp_pp: convert("megatron", "megatron", d, tmp_path / f"td-{tp_pp[0]}-{tp_pp[1]}",
                           megatron_format="torch_dist") for tp_pp, d in legacy.items()}
    # parallelism-independent: the very same files from every TP x PP (so one of them stands for all)
    for d in dist.values():
        assert files(d) == files(dist[(1, 1)])
    for t, p in TP_PP:
        back = convert("megatron", "megatron", dist[(2, 2)], tmp_path / f"back-tp{t}-pp{p}", target_tp=t, target_pp=p)
        assert files(back) == files(legacy[(t, p)]), (t, p)
    same_tensors(open_source("meta", src), open_source("megatron", legacy[(2, 2)]))


def test_stage_layers_split_as_megatron_core_splits():
    from types import SimpleNamespace

    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    n = 0
    for layers in (4, 12, 30, 80):
        for pp in (2, 3, 4, 8):
            for first, last, emb, loss in [(None, None, False, False), (1, None, False, False), (None, 2, False, False),
                                           (3, 3, False, False), (None, None, True, False), (None, None, True, True)]:
                try:
                    ours = stage_layers(layers, pp, first, last, emb, loss)
                except ValueError:
                    continue
                cfg = SimpleNamespace(num_layers=layers, pipeline_model_parallel_size=pp,
                                      pipeline_model_parallel_layout=None, virtual_pipeline_model_parallel_size=None,
                                      num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
                                      account_for_embedding_in_pipeline_split=emb,
                                      account_for_loss_in_pipeline_split=loss)
                theirs = [(get_transformer_layer_offset(cfg, None, p), get_num_layers_to_build(cfg, None, p))
                          for p in range(pp)]
                assert ours == theirs, (layers, pp, first, last, emb, loss)
                n += 1
    assert n >= 40


def test_bad_parallel_options(capsys, tmp_path):
    src, out = str(cached_checkpoint("7b-mini")), tmp_path / "out"
    base = ["convert", "--from", "meta", "--to", "megatron", "--load-dir", src, "--save-dir", str(out)]
    user_error(capsys, out, *base, "--target-pp", "3", match="--target-pp 3: 2 layers do not split evenly into 3")
    user_error(capsys, out, *base, "--megatron-format", "torch_dist", "--target-tp", "2", match="parallelism-independent")
    user_error(capsys, out, "convert", "--from", "meta", "--to", "hf", "--load-dir", src, "--save-dir", str(out),
               "--megatron-format", "torch_dist", match="applies only to --to megatron")


# ---------------------------------------------------------------------------------------------- megatron-core
IDS = torch.arange(1, 70)  # token ids the logits are compared on


@pytest.fixture(scope="module")
def megatron_written(tmp_path_factory):
    """70b-mini (GQA) saved by megatron-core's dist_checkpointing.save at TP 2 and TP 1 from the legacy
    checkpoints of the same weights (fp32, as the model holds them), and parity's torch_dist of the same
    weights loaded by megatron-core's dist_checkpointing.load at TP 2: one torchrun launch."""
    pytest.importorskip("megatron.core")
    from parity.backends.worker import _torchrun

    root = tmp_path_factory.mktemp("megatron-written")
    src = cached_checkpoint("70b-mini")
    legacy = {tp: convert("meta", "megatron", src, root / f"legacy-tp{tp}", target_tp=tp, dtype="fp32") for tp in (1, 2)}
    ours = convert("meta", "megatron", src, root / "parity-td", megatron_format="torch_dist")
    torch.save(IDS, root / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    r = subprocess.run([*_torchrun(), "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
                        str(HERE / "megatron_save.py"), str(legacy[1]), str(legacy[2]), str(ours),
                        str(root / "ids.pt"), str(root / "saved")], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return {"legacy": legacy, "saved": {tp: root / "saved" / f"tp{tp}" for tp in (1, 2)},
            "logits_tp2": torch.load(root / "saved" / "logits_tp2.pt")}


@pytest.mark.parametrize("tp", [1, 2])
def test_parity_reads_what_megatron_core_writes(tp, megatron_written, tmp_path):
    saved, legacy = megatron_written["saved"][tp], megatron_written["legacy"][tp]
    assert megatron_format(saved) == "torch_dist"
    td = open_source("megatron", saved)
    # Megatron-LM 0.16's args: no vocab_size (the tokenizer's is used), layernorm_epsilon, megatron enums
    assert td.args.vocab_size is None and td.spec.vocab == 1024
    assert td.args.attention_backend == "AttnBackend(5)" and int(td.args.exit_signal) == 15
    same_tensors(td, open_source("megatron", legacy))
    # converted back to legacy at the TP it was saved from: the very files parity wrote
    back = convert("megatron", "megatron", saved, tmp_path / "back", target_tp=tp)
    assert files(back) == files(legacy)


_loaded: dict = {}


def backend(kind: str, ckpt: Path):
    if (kind, ckpt) not in _loaded:
        from parity.backends.worker import load_backend

        _loaded[(kind, ckpt)] = load_backend(kind, ckpt, tp=1, device="cpu", dtype="fp32")
    return _loaded[(kind, ckpt)]


def test_megatron_core_loads_what_parity_writes_at_tp2(megatron_written):
    got = megatron_written["logits_tp2"]
    ours, legacy = got["parity_torch_dist"][:, :1024], got["legacy"][:, :1024]
    assert torch.equal(ours, legacy)
    diff = (ours - backend("meta", cached_checkpoint("70b-mini")).logits(IDS.tolist())).abs().max().item()
    print(f"70b-mini: megatron-core at TP 2 loading parity's torch_dist vs Meta: max |logit diff| {diff:.2e}")
    assert diff < 1e-4


def test_megatron_core_reshards_its_own_tp2_save_to_tp1(megatron_written):
    resharded = backend("megatron", megatron_written["saved"][2]).logits(IDS.tolist())
    assert torch.equal(resharded, backend("megatron", megatron_written["legacy"][1]).logits(IDS.tolist()))


@pytest.mark.parametrize("name", MINI_SIZES)
def test_megatron_core_loads_what_parity_writes(name, tmp_path_factory):
    """The megatron backend reads torch_dist with megatron-core's dist_checkpointing.load(
    model.sharded_state_dict(), dir): its logits are the Meta reference's."""
    td = convert("meta", "megatron", cached_checkpoint(name), tmp_path_factory.mktemp(name) / "td",
                 megatron_format="torch_dist")
    ids = IDS.tolist()
    ours, ref = backend("megatron", td).logits(ids), backend("meta", cached_checkpoint(name)).logits(ids)
    diff = (ours - ref).abs().max().item()
    print(f"{name}: megatron-core loading parity's torch_dist vs Meta: max |logit diff| {diff:.2e}")
    assert diff < 1e-4 and ours.shape == ref.shape and not torch.equal(ours[0], ours[-1])


def run_scores(capsys, out: Path, *flags) -> dict[str, float]:
    """`parity run` (megatron only) in this process: request hash -> log-likelihood, and the manifest."""
    rc = main(["run", "--sizes", "7b-mini", "--backends", "megatron", "--reference", "megatron", "--tests",
               "boolq,mmlu_anatomy,xcopa_it", "--out", str(out), "--no-report", *map(str, flags)])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    scores = {}
    for p in sorted((out / "7b-mini" / "megatron").glob("*.jsonl")):
        for line in p.read_text().splitlines():
            row = json.loads(line)
            scores |= dict(zip(row["request_hashes"], row["loglik"]))
    return scores, json.loads((out / "manifest.json").read_text())


def test_parity_run_scores_torch_dist_at_tp_1_and_2_as_legacy(capsys, tmp_path):
    """One torch_dist checkpoint run at TP 1 and at TP 2 scores exactly what the legacy checkpoint of
    that TP scores (TP 1: in this process, on the run's own requests)."""
    from parity.requests import read_requests

    src = cached_checkpoint("7b-mini")
    td = convert("meta", "megatron", src, tmp_path / "td", megatron_format="torch_dist")
    legacy = {tp: convert("meta", "megatron", src, tmp_path / f"legacy{tp}", target_tp=tp) for tp in (1, 2)}
    meta = f"7b-mini:meta={src}"
    runs = {(fmt, tp): run_scores(capsys, tmp_path / f"run-{fmt}-{tp}", "--checkpoint", meta, "--checkpoint",
                                  f"7b-mini:megatron={ckpt}", "--tp", tp)
            for fmt, tp, ckpt in [("torch_dist", 1, td), ("torch_dist", 2, td), ("legacy", 2, legacy[2])]}
    for (fmt, tp), (scores, manifest) in runs.items():
        assert manifest["checkpoints"]["7b-mini"]["megatron"]["tp"] == tp and len(scores) > 20
    assert runs[("torch_dist", 2)][0] == runs[("legacy", 2)][0]
    requests = [r for p in (tmp_path / "run-torch_dist-1" / "requests").rglob("*.jsonl") for r in read_requests(p)]
    scored = backend("megatron", legacy[1]).loglikelihood(requests, "auto")
    legacy1 = {r.hash: s.loglik for r, s in zip(requests, scored)}
    assert runs[("torch_dist", 1)][0] == legacy1
    # a legacy checkpoint runs at its own TP only
    capsys.readouterr()
    rc = main(["run", "--sizes", "7b-mini", "--backends", "megatron", "--reference", "megatron", "--tests", "boolq",
               "--checkpoint", meta, "--checkpoint", f"7b-mini:megatron={legacy[1]}", "--tp", "2",
               "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines() == [err] and "1 TP shards cannot run at --tp 2" in err


def test_pipeline_parallel_checkpoint_runs_merged(tmp_path):
    src = cached_checkpoint("13b-mini")
    pp1 = convert("meta", "megatron", src, tmp_path / "pp1", target_tp=1)
    pp2 = convert("meta", "megatron", src, tmp_path / "pp2", target_tp=1, target_pp=2)
    ids = list(range(1, 40))
    assert torch.equal(backend("megatron", pp2).logits(ids), backend("megatron", pp1).logits(ids))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def td_7b(tmp_path_factory):
    root = tmp_path_factory.mktemp("td")
    return {name: convert("meta", "megatron", cached_checkpoint(name), root / name, megatron_format="torch_dist")
            for name in ("7b-mini", "70b-mini")}


def damaged(td_7b, tmp_path, name: str = "7b-mini") -> tuple[Path, Path]:
    d = tmp_path / "damaged"
    shutil.copytree(td_7b[name], d)
    return d, d / "release"


def to_hf(d: Path, out: Path) -> list[str]:
    return ["convert", "--from", "megatron", "--to", "hf", "--load-dir", str(d), "--save-dir", str(out)]


def test_bad_missing_or_truncated_shard(capsys, td_7b, tmp_path):
    out = tmp_path / "out"
    d, rel = damaged(td_7b, tmp_path)
    shard = rel / "__1_0.distcp"
    data = shard.read_bytes()
    shard.unlink()
    user_error(capsys, out, *to_hf(d, out), match=f"{shard}: missing")
    shard.write_bytes(data[: len(data) // 2])
    user_error(capsys, out, *to_hf(d, out), match="the .metadata does not match the shards")
    # same size, damaged bytes: found when the chunk is read, naming the shard
    shard.write_bytes(data[:64] + bytes(len(data) - 128) + data[-64:])
    user_error(capsys, out, *to_hf(d, out), match=f"{shard}: cannot read")


def test_bad_metadata_of_another_checkpoint(capsys, td_7b, tmp_path):
    out = tmp_path / "out"
    d, rel = damaged(td_7b, tmp_path)
    shutil.copyfile(td_7b["70b-mini"] / "release" / ".metadata", rel / ".metadata")
    user_error(capsys, out, *to_hf(d, out), match="does not match")


@pytest.mark.parametrize("edit, match", [
    ({"sharded_backend": "zarr"}, "unknown sharded backend 'zarr'"),
    ({"sharded_backend_version": 2}, "version 2 is newer than the version 1"),
    ({"common_backend_version": 7}, "version 7 is newer"),
    ({"extra": 1}, "expected exactly the keys"),
])
def test_bad_metadata_json(edit, match, capsys, td_7b, tmp_path):
    out = tmp_path / "out"
    d, rel = damaged(td_7b, tmp_path)
    cfg = json.loads((rel / "metadata.json").read_text())
    (rel / "metadata.json").write_text(json.dumps(cfg | edit))
    err = user_error(capsys, out, *to_hf(d, out), match=match)
    assert str(rel / "metadata.json") in err


def test_bad_plain_dcp_and_missing_stage(capsys, td_7b, tmp_path):
    out = tmp_path / "out"
    d, rel = damaged(td_7b, tmp_path)
    (rel / "metadata.json").unlink()
    user_error(capsys, out, *to_hf(d, out), match="torch_dcp) is not supported")
    pp = convert("meta", "megatron", cached_checkpoint("7b-mini"), tmp_path / "pp", target_pp=2)
    shutil.rmtree(pp / "release" / "mp_rank_00_001")
    user_error(capsys, out, *to_hf(pp, out), match=f"{pp / 'release' / 'mp_rank_00_001'}: missing")


def test_bad_common_pt_that_would_run_code(capsys, td_7b, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "pwned"
    d, rel = damaged(td_7b, tmp_path)
    ck = torch.load(rel / "common.pt", weights_only=False)
    ck["args"].tokenizer_model = RunsCode(marker)  # inside the allowed Namespace
    torch.save(ck, rel / "common.pt")
    user_error(capsys, out, *to_hf(d, out), match=f"{rel / 'common.pt'}: refused to load")
    assert not marker.exists()
    torch.load(rel / "common.pt", weights_only=False)  # the payload is live
    assert marker.exists()


def test_bad_dcp_metadata_that_would_run_code(capsys, td_7b, tmp_path):
    """Refused by the converter and by the megatron worker, whose megatron-core loader would otherwise
    unpickle it with a bare pickle.load."""
    from parity.checkpoints import dcp

    out, marker = tmp_path / "out", tmp_path / "pwned"
    d, rel = damaged(td_7b, tmp_path)
    md = dcp.read_metadata(rel / ".metadata")
    md.planner_data = RunsCode(marker)
    with open(rel / ".metadata", "wb") as f:
        pickle.dump(md, f)
    user_error(capsys, out, *to_hf(d, out), match=f"{rel / '.metadata'}: refused to load (refused global io.open)")
    from backend_helpers import write_job
    from parity.requests import Request

    outs = write_job(tmp_path / "job.json", "megatron", d, 1, {"t": [Request((1, 5, 6), (7,))]})
    r = run_parity("score", tmp_path / "job.json")
    assert_one_line_error(r, str(rel / ".metadata"), "refused global io.open")
    assert not marker.exists() and not outs["t"].exists()
    with open(rel / ".metadata", "rb") as f:  # the payload is live
        pickle.load(f)
    assert marker.exists()
