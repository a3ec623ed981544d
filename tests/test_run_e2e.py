"""The real pipeline end to end: `parity run` as a user runs it, interruptions, determinism.

These launch real workers (torchrun for TP > 1), so they are the slowest tests of the suite; the
selection is kept small except in the one slow test that runs the embedded default.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import counts, run_parity

SMALL = ["run", "--sizes", "7b-mini", "--tests", "boolq,bigbench_undo_permutation,mmlu_anatomy"]


def per_sample_digests(run_dir: Path) -> dict[str, str]:
    out = {}
    for p in sorted(run_dir.glob("*/*/*.jsonl")):
        if p.parts[-3] in ("scores", "requests"):
            continue
        out[str(p.relative_to(run_dir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The reference run every test compares with. Its three workers run side by side (--parallel 3: the
    only CPU run of that path; a worker's imports use one core), the other tests' runs one at a time, so
    their byte-identical results also show that running side by side changes nothing."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    r = run_parity(*SMALL, "--out", str(out), "--parallel", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_small_run_layout_and_determinism(baseline):
    manifest = json.loads((baseline / "manifest.json").read_text())
    assert {u["status"] for u in manifest["units"].values()} == {"done"}
    assert len(manifest["units"]) == 9
    line = json.loads((baseline / "7b-mini" / "megatron" / "boolq.jsonl").read_text().splitlines()[0])
    for field in ("doc_id", "request_hashes", "loglik", "is_greedy", "n_tokens", "gold", "pred"):
        assert field in line
    bb = json.loads((baseline / "7b-mini" / "meta" / "bigbench_undo_permutation.jsonl").read_text().splitlines()[0])
    assert "scores" in bb and "/" in bb["doc_id"]
    # Every backend scored the very same requests.
    hashes = {b: [json.loads(x)["request_hashes"] for x in (baseline / "7b-mini" / b / "boolq.jsonl").open()]
              for b in ("meta", "hf", "megatron")}
    assert hashes["meta"] == hashes["hf"] == hashes["megatron"]
    # A second, independent run gives byte-identical per-sample files: asserted by
    # test_killed_run_resumes_to_identical_results, whose first case scores every unit afresh in a new
    # directory and compares all nine files with these. Here: the report regenerates identically.
    before = (baseline / "report.md").read_bytes()
    assert run_parity("report", str(baseline)).returncode == 0
    assert (baseline / "report.md").read_bytes() == before


@pytest.mark.parametrize("fault, recomputed, backends", [
    # SIGKILL of the megatron worker while it writes its second unit's scores (units run in registry
    # order: undo_permutation, boolq, anatomy): the unit it finished is kept, the other two are rescored.
    # All three backends: every unit scored afresh, by the killed run or its resume (the baseline's
    # determinism: two independent runs write the very same files).
    ("write:scores/7b-mini/megatron/boolq.", 2, "meta,hf,megatron"),
    # SIGKILL of the run itself while it writes the last per-sample file: every score is on disk already.
    # hf left out: it would only be scored once more before the kill.
    ("write:7b-mini/megatron/mmlu_anatomy.jsonl", 0, "meta,megatron"),
])
def test_killed_run_resumes_to_identical_results(baseline, tmp_path, fault, recomputed, backends):
    out = tmp_path / "run"
    args = [*SMALL, "--backends", backends, "--out", str(out)]
    r = run_parity(*args, env={"PARITY_FAULT": fault})
    assert r.returncode != 0
    # Before the rerun (which cleans temp files up): the file being written when the kill came exists
    # only under its temp name, and every file under a real name is whole.
    written = fault.partition(":")[2]
    assert list(out.rglob("*.tmp")), "the kill did not come while a file was being written"
    finals = [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
    assert not [p for p in finals if written in str(p)]
    for p in finals:
        if p.suffix in (".json", ".jsonl"):
            text = p.read_text()
            assert text.endswith("\n"), p
            for line in text.splitlines() if p.suffix == ".jsonl" else [text]:
                json.loads(line)
    r = run_parity(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert counts(r.stderr)[1] == recomputed
    # each unit keeps its own scoring time, whether it was reused, assembled after the kill, or rescored
    units = json.loads((out / "manifest.json").read_text())["units"].values()
    assert all(u["seconds"] > 0 and "seconds" not in u["ran_on"] for u in units)
    mine = per_sample_digests(out)
    assert len(mine) == 3 * len(backends.split(","))
    assert mine == {k: v for k, v in per_sample_digests(baseline).items() if k in mine}
    assert not list(out.rglob("*.tmp"))  # the killed writer's temp file is gone


def test_killed_during_conversion_leaves_no_checkpoint(baseline, tmp_path):
    from parity.checkpoints.synthetic import cached_checkpoint
    from parity.io import cache_dir
    from parity.tokenizer import default_tokenizer

    # A cache without conversions; the tokenizer and the synthetic checkpoint are not under test here,
    # so they are seeded (copies keep their mtimes: the same fingerprint) rather than made again.
    cache = tmp_path / "cache"
    for made in (default_tokenizer(), cached_checkpoint("7b-mini")):
        dst = cache / made.relative_to(cache_dir())
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if made.is_dir() else shutil.copy2)(made, dst)
    env = {"PARITY_CACHE": str(cache)}
    out = tmp_path / "run"
    # only the backend whose conversion is killed (the others' scoring is not under test here)
    megatron = [*SMALL, "--backends", "megatron", "--reference", "megatron", "--no-report"]
    r = run_parity(*megatron, "--out", str(out), env=env | {"PARITY_FAULT": "dir:megatron-tp1"})
    assert r.returncode != 0
    converted = list((cache / "converted").glob("*/megatron-tp1"))
    assert converted == []  # the killed conversion left only a temp dir, never a usable-looking one
    assert list((cache / "converted").glob("*/.megatron-tp1.tmp-*"))  # killed while converting, indeed
    r = run_parity(*megatron, "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # the seeded checkpoint and tokenizer were used, nothing was made again
    assert [p.name for p in (cache / "checkpoints").iterdir()] == [cached_checkpoint("7b-mini").parent.name]
    assert [p.name for p in (cache / "tokenizers").iterdir()] == [default_tokenizer().name]
    mine = per_sample_digests(out)
    assert len(mine) == 3 and mine == {k: v for k, v in per_sample_digests(baseline).items() if k in mine}


def test_changed_inputs_are_not_reused(baseline, tmp_path):
    """Results are keyed by what produced them: another dtype recomputes instead of reusing (on a copy of
    the baseline run, which holds these very units in fp32)."""
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    # a manifest written by a parity that kept no unit times: reusing a unit takes its time from the worker's
    # record beside its scores, not from the manifest's copy
    manifest = json.loads((out / "manifest.json").read_text())
    timed = {k: u["seconds"] for k, u in manifest["units"].items()}
    for u in manifest["units"].values():
        u["seconds"] = None
    (out / "manifest.json").write_text(json.dumps(manifest))
    r = run_parity(*SMALL, "--out", str(out))
    assert r.returncode == 0 and counts(r.stderr) == (9, 0), r.stderr[-3000:]
    units = json.loads((out / "manifest.json").read_text())["units"]
    assert {k: u["seconds"] for k, u in units.items()} == timed and all(timed.values())
    r = run_parity(*SMALL, "--backends", "meta,hf", "--out", str(out), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr[-3000:]
    assert counts(r.stderr) == (0, 6)


@pytest.mark.slow
def test_default_run_first_screen_and_tables(tmp_path):
    """`parity run` with no arguments: three mini sizes, synthetic checkpoints, bundled samples."""
    r = run_parity("run", cwd=tmp_path, timeout=1800)
    assert r.returncode == 0, r.stderr[-5000:]
    # the first screen: one line per size and backend, the causes of missing percent errors grouped, no
    # library chatter (it is in the run's logs); the tables are in report.md
    lines = [ln for ln in r.stdout.splitlines() if ln.split()[:2] in ([s, b] for s in ("7b-mini", "13b-mini",
             "70b-mini") for b in ("hf", "megatron"))]
    assert len(lines) == 6, r.stdout
    assert len(r.stdout.splitlines()) < 20, r.stdout
    for chatter in ("initializing model parallel", "deprecated", "FutureWarning", "async grad allreduce"):
        assert chatter not in r.stderr, chatter
    run_dir = tmp_path / "results" / "default"
    md = (run_dir / "report.md").read_text()
    for title in ("### BigBench", "### Multilingual (XCOPA)", "### LM Evaluation Harness", "### MMLU"):
        assert md.count(title) == 2  # one table per non-reference backend
    assert "| Test | 7b-mini | 13b-mini | 70b-mini |" in md
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert len(manifest["units"]) == 3 * 3 * 80
    assert {u["status"] for u in manifest["units"].values()} == {"done"}
    # Fully cached repeat: nothing is scored again, the printed report is the same.
    again = run_parity("run", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert counts(again.stderr) == (720, 0)
    assert again.stdout == r.stdout


def test_check_catches_a_broken_conversion(baseline, tmp_path):
    """One layer of the Megatron checkpoint perturbed: `parity check` against the good run exits 1 and
    names the tests that moved; the unchanged conversion passes."""
    import torch

    from parity.config import resolve_checkpoints
    from parity.io import load_torch

    good = resolve_checkpoints(["7b-mini"], ["megatron"], {}, {})["7b-mini"]["megatron"].path
    broken = tmp_path / "megatron-broken"
    shutil.copytree(good, broken)
    rank_file = next(broken.rglob("model_optim_rng.pt"))
    ckpt = load_torch(rank_file)
    key = next(k for k in ckpt["model"] if k.endswith("layers.1.mlp.linear_fc2.weight"))
    ckpt["model"][key] = ckpt["model"][key] * 3.0
    torch.save(ckpt, rank_file)

    baseline_report = str(baseline / "report.json")
    r = run_parity("check", str(baseline), "--baseline", baseline_report)
    assert r.returncode == 0, r.stdout + r.stderr

    # on a copy of the good run: its meta and hf units are reused, megatron's (another checkpoint) rescored
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    r = run_parity(*SMALL, "--out", str(out), "--checkpoint", f"7b-mini:megatron={broken}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert counts(r.stderr) == (6, 3)
    r = run_parity("check", str(out), "--baseline", baseline_report)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL" in r.stdout
    regressions = [line for line in r.stdout.splitlines() if "vs baseline |" in line]
    for test in ("boolq", "mmlu_anatomy", "bigbench_undo_permutation"):
        # every test's log-likelihoods moved, whether or not a prediction flipped
        assert any(f"| megatron | {test} |" in line for line in regressions), r.stdout
    assert not any("| hf |" in line for line in regressions)  # the untouched backend is not blamed
    assert "7b-mini/megatron/boolq" in r.stderr  # the one-line summary for CI logs
