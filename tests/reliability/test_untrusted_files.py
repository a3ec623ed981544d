"""Untrusted checkpoint files: code-running pickles and absurd size claims are refused with one line.

Covered elsewhere: a code-running Meta consolidated.NN.pth through the converter (tests/test_convert.py
::test_bad_pickle_that_would_run_code), truncated or corrupt .pth / safetensors files
(::test_bad_truncated_or_corrupt_files). Here: code-running Megatron and Meta files through the workers,
Megatron's model_optim_rng.pt (whose legitimate `args` Namespace must still load), the exact allow-list,
safetensors headers and .pth storages that claim absurd sizes, through the converter CLI and through the
workers that `parity run` launches. Commands reading hostile files run under a 4 GiB
address-space limit, so an attempt to allocate what the header claims would die with MemoryError.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path, PosixPath

import pytest
import torch
from backend_helpers import write_job
from cli_helpers import RunsCode, assert_one_line_error, limit_address_space, run_parity

import parity.io
from parity.checkpoints.convert import convert
from parity.errors import UserError
from parity.io import load_torch
from parity.requests import Request

MG_FILE = Path("release") / "mp_rank_00" / "model_optim_rng.pt"


class SneakyDict(collections.OrderedDict):
    """A harmless-looking OrderedDict subclass: any class beyond the allow-list must be refused."""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """7b-mini as Megatron (TP 1) and HF, converted once for the module."""
    from parity.checkpoints.synthetic import cached_checkpoint

    root = tmp_path_factory.mktemp("converted")
    meta = cached_checkpoint("7b-mini")
    return {"meta": meta, "megatron": convert("meta", "megatron", meta, root / "mg"),
            "hf": convert("meta", "hf", meta, root / "hf")}


def score_job(tmp_path: Path, backend: str, checkpoint: Path, name: str = "job") -> Path:
    """A one-request job file (the typed Job `parity run` writes) for `parity score`."""
    path = tmp_path / f"{name}.json"
    write_job(path, backend, checkpoint, 1, {"t": [Request((1, 5, 6), (7,))]})
    return path


def scores_of(job: Path) -> Path:
    return job.parent / f"{job.stem}.t.scores.jsonl"  # where write_job puts unit t's output


# ---------------------------------------------------------------------------------------------- pickles
def test_allow_list_is_exactly_megatron_lm_args(converted):
    """Namespace, the signal enum and megatron-core's enums by name (inert stand-ins), nothing wider."""
    assert parity.io.SAFE_GLOBALS[:2] == [argparse.Namespace, signal.Signals]
    assert [name for _, name in parity.io.SAFE_GLOBALS[2:]] == list(parity.io.MEGATRON_ENUMS)
    assert all(isinstance(f, parity.io.MegatronEnum) for f, _ in parity.io.SAFE_GLOBALS[2:])
    ck = load_torch(converted["megatron"] / MG_FILE)
    assert isinstance(ck["args"], argparse.Namespace)
    assert ck["args"].num_layers == 2 and ck["args"].params_dtype == torch.bfloat16
    assert ck["model"]["embedding.word_embeddings.weight"].ndim == 2


def test_megatron_lm_args_load_without_megatron(tmp_path):
    """Megatron-LM 0.16's args pickle megatron-core enums and a signal: they load in a process that never
    imports megatron-core, and no megatron code runs (the enums become strings)."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    p = tmp_path / "common.pt"
    torch.save({"args": argparse.Namespace(attention_backend=AttnBackend.auto, exit_signal=signal.SIGTERM,
                                           model_type=ModelType.encoder_or_decoder, num_layers=2)}, p)
    code = ("import sys; from parity.io import load_torch; a = load_torch(sys.argv[1])['args']; "
            "print(a.attention_backend, a.model_type, int(a.exit_signal), 'megatron' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["AttnBackend(5)", "ModelType(1)", "15", "False"]


def test_allow_list_is_exact_beside_megatron_core_own(tmp_path):
    """megatron-core widens torch's process-wide allow-list at import (PosixPath among others) for its own
    loader: parity's loads still allow exactly SAFE_GLOBALS, and leave megatron-core's list as it was
    (torch's safe_globals() context alone would remove Namespace, which megatron's loader needs)."""
    from megatron.core.safe_globals import register_safe_globals

    register_safe_globals()  # what importing megatron.core does
    before = torch.serialization.get_safe_globals()
    assert argparse.Namespace in before and PosixPath in before
    p = tmp_path / "x.pt"
    torch.save({"args": argparse.Namespace(a=1)}, p)
    assert load_torch(p)["args"].a == 1
    torch.save({"where": Path("/etc/passwd")}, p)
    with pytest.raises(UserError, match="refused to load: .*PosixPath"):
        load_torch(p)
    assert set(torch.serialization.get_safe_globals()) == set(before)


@pytest.mark.parametrize("obj, refused", [
    (SneakyDict(a=torch.zeros(2)), "SneakyDict"),
    ({"hook": os.system}, "system"),
    (argparse.Namespace(hook=os.system), "system"),  # the allowed class cannot smuggle a callable
    ({"ok": torch.zeros(2), "where": Path("/etc/passwd")}, "PosixPath"),
])
def test_anything_beyond_the_allow_list_is_refused(obj, refused, tmp_path):
    p = tmp_path / "x.pt"
    torch.save(obj, p)
    with pytest.raises(UserError, match=rf"{p}: refused to load: .*{refused}") as e:
        load_torch(p)
    assert "\x1b" not in str(e.value) and "weights_only` set to `False`" not in str(e.value)
    # plain tensors and containers of them still load
    torch.save({"ok": collections.OrderedDict(w=torch.ones(2))}, p)
    assert torch.equal(load_torch(p)["ok"]["w"], torch.ones(2))


@pytest.mark.parametrize("where", ["args", "model"])
def test_megatron_checkpoint_that_runs_code_is_refused(where, converted, tmp_path):
    mg = tmp_path / "mg"
    shutil.copytree(converted["megatron"], mg)
    marker = tmp_path / "pwned"
    f = mg / MG_FILE
    ck = load_torch(f)
    if where == "args":
        ck["args"].tokenizer_model = RunsCode(marker)  # inside the allowed Namespace
    else:
        ck["model"]["decoder.layers.0.self_attention.linear_qkv._extra_state"] = RunsCode(marker)
    torch.save(ck, f)

    r = run_parity("convert", "--from", "megatron", "--to", "hf", "--load-dir", mg, "--save-dir", tmp_path / "out")
    assert_one_line_error(r, str(f), "refused", "open")
    assert not (tmp_path / "out").exists() and not marker.exists()
    # the worker `parity run` launches for the megatron backend refuses it the same way
    job = score_job(tmp_path, "megatron", mg)
    r = run_parity("score", job)
    assert_one_line_error(r, str(f), "refused", "open")
    assert not marker.exists() and not scores_of(job).exists()
    # the payload is live: an unsafe load does run it, so the checks above could have failed
    torch.load(f, weights_only=False)
    assert marker.exists()


def test_megatron_args_replaced_by_another_class_is_refused(converted, tmp_path):
    mg = tmp_path / "mg"
    shutil.copytree(converted["megatron"], mg)
    f = mg / MG_FILE
    ck = load_torch(f)
    ck["args"] = SneakyDict(vars(ck["args"]))
    torch.save(ck, f)
    r = run_parity("convert", "--from", "megatron", "--to", "meta", "--load-dir", mg, "--save-dir", tmp_path / "out")
    assert_one_line_error(r, str(f), "refused", "SneakyDict")


# ---------------------------------------------------------------------------------------------- sizes
def _rewrite_safetensors(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    out = edit(header, data)
    if isinstance(out, dict):
        h = json.dumps(out).encode()
        h += b" " * (-len(h) % 8)
        out = struct.pack("<Q", len(h)) + h + data
    path.write_bytes(out)


def _first_tensor(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__")


def _header_len(header, data):  # the 8-byte length claims an exabyte of header
    return struct.pack("<Q", 2 ** 60) + b"{}" + data


def _offsets(header, data):  # a tensor whose bytes lie a terabyte past the end of the file
    _first_tensor(header)["data_offsets"] = [0, 2 ** 40]
    return header


def _shape(header, data):  # 2**80 elements: the byte count overflows
    _first_tensor(header)["shape"] = [2 ** 40, 2 ** 40]
    return header


def _shape_and_offsets(header, data):  # consistent shape and offsets, 2 TiB, in a file of a few KiB
    t = _first_tensor(header)
    t["shape"], t["data_offsets"] = [2 ** 20, 2 ** 20], [0, 2 ** 41]
    return header


ABSURD_HEADERS = [_header_len, _offsets, _shape, _shape_and_offsets]


@pytest.mark.parametrize("edit", ABSURD_HEADERS, ids=lambda f: f.__name__.strip("_"))
def test_safetensors_claiming_absurd_sizes_converter(edit, converted, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(converted["hf"], hf)
    shard = sorted(hf.glob("*.safetensors"))[0]
    _rewrite_safetensors(shard, edit)
    r = run_parity("convert", "--from", "hf", "--to", "meta", "--load-dir", hf, "--save-dir", tmp_path / "out",
                   limit_memory=True)
    assert_one_line_error(r, str(shard), "cannot read safetensors")
    assert not (tmp_path / "out").exists()


# `parity score` on several jobs in one interpreter under the address-space limit (transformers is
# imported once, not once per case): each job's exit code and stderr, as the CLI gives them.
SCORE_EACH = """
import contextlib, io, json, sys
from parity.cli import main
results = []
for job in sys.argv[1:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(["score", job])
        except BaseException as e:  # reported, so the test fails naming it
            rc, err = -1, io.StringIO(f"Traceback (in the test driver): {type(e).__name__}: {e}")
    results.append({"rc": rc, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def test_safetensors_claiming_absurd_sizes_hf_worker(converted, tmp_path):
    """Every absurd header through the hf worker, and the unmodified files as a control under the same
    limit: the limit leaves room for a real load, so a refusal is the file's doing, not the limit's."""
    jobs = [score_job(tmp_path, "hf", converted["hf"], "control")]
    shards = []
    for edit in ABSURD_HEADERS:
        hf = tmp_path / edit.__name__.strip("_")
        shutil.copytree(converted["hf"], hf)
        shards.append(sorted(hf.glob("*.safetensors"))[0])
        _rewrite_safetensors(shards[-1], edit)
        jobs.append(score_job(tmp_path, "hf", hf, hf.name))
    r = subprocess.run([sys.executable, "-c", SCORE_EACH, *map(str, jobs)], capture_output=True, text=True,
                       timeout=600, preexec_fn=limit_address_space)
    assert r.returncode == 0, r.stderr[-3000:]
    control, *damaged = json.loads(r.stdout.strip().splitlines()[-1])
    assert control["rc"] == 0, control["stderr"][-3000:]
    assert scores_of(jobs[0]).is_file()
    for job, shard, res in zip(jobs[1:], shards, damaged):
        print(f"{shard.parent.name}: {res['stderr'].strip()}")
        one = subprocess.CompletedProcess([], res["rc"], "", res["stderr"])
        assert_one_line_error(one, str(shard.parent), "cannot load HF checkpoint", "header")
        assert not scores_of(job).exists()


def _claim_huge_storage(path: Path) -> None:
    """Rewrite a torch.save zip so the first tensor's storage claims 2**40 elements (4 TiB of fp32)
    while the record holds a few hundred KiB: a loader that trusted the claim would allocate it."""
    n = 123457  # a numel no other integer in the pickle has
    torch.save({"tok_embeddings.weight": torch.zeros(n)}, path)
    with zipfile.ZipFile(path) as z:
        entries = {name: z.read(name) for name in z.namelist()}
    pkl = next(name for name in entries if name.endswith("data.pkl"))
    old = b"J" + struct.pack("<i", n)  # BININT n -> LONG1 2**40 (storage numel and the shape)
    assert entries[pkl].count(old) == 2
    entries[pkl] = entries[pkl].replace(old, b"\x8a\x06" + (2 ** 40).to_bytes(6, "little"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("mmap", [False, True])
def test_pth_claiming_huge_storage_load_torch(mmap, tmp_path):
    p = tmp_path / "huge.pth"
    _claim_huge_storage(p)
    with pytest.raises(UserError, match=rf"{p}: cannot read checkpoint"):
        load_torch(p, mmap=mmap)


def test_pth_claiming_huge_storage_converter_and_meta_worker(meta_copy, tmp_path):
    meta = meta_copy()
    f = meta / "consolidated.00.pth"
    _claim_huge_storage(f)
    r = run_parity("convert", "--from", "meta", "--to", "hf", "--load-dir", meta, "--save-dir", tmp_path / "out",
                   limit_memory=True)
    assert_one_line_error(r, str(f), "cannot read checkpoint")
    r = run_parity("score", score_job(tmp_path, "meta", meta), limit_memory=True)
    assert_one_line_error(r, str(f), "cannot read checkpoint")


def test_meta_checkpoint_that_runs_code_is_refused_by_the_meta_worker(meta_copy, tmp_path):
    meta = meta_copy()
    marker = tmp_path / "pwned"
    f = meta / "consolidated.00.pth"
    sd = load_torch(f)
    sd["rope.freqs"] = RunsCode(marker)
    torch.save(sd, f)
    job = score_job(tmp_path, "meta", meta)
    r = run_parity("score", job)
    assert_one_line_error(r, str(f), "refused", "open")
    assert not marker.exists() and not scores_of(job).exists()
    torch.load(f, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()
