"""`parity check`: exit 0 on an unchanged run, 1 naming the tests that moved, 2 on unusable input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from report_fakes import make_run, read_rows, write_rows

from parity.cli import main
from parity.report import build_report, write_report
from parity.report.check import DEFAULT_THRESHOLDS, evaluate, load_thresholds

QUIET = {"megatron": 1e-6}  # a healthy megatron: deltas at fp32 noise, no flips


@pytest.fixture()
def good(tmp_path):
    run = make_run(tmp_path / "good", noise=QUIET)
    write_report(run, build_report(run), formats=("json",))
    return run


def perturb(run, size, test, docs=(0, 1, 2, 3, 4, 5)):
    """A broken conversion in miniature: megatron's top choice moves on a few documents of one test."""
    rows = read_rows(run, size, "megatron", test)
    for i in docs:
        r = rows[i]
        wrong = (r["gold"] + 1) % len(r["loglik"])
        r["loglik"][wrong] = max(r["loglik"]) + 1.0
        r["pred"] = wrong
    write_rows(run, size, "megatron", test, rows)


def test_unchanged_run_passes(good, capsys):
    assert main(["check", str(good), "--baseline", str(good / "report.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## parity check: PASS") and "No test's percent error moved" in out


def test_perturbed_run_fails_naming_the_test(good, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    perturb(bad, "13b-mini", "mmlu_philosophy")
    rc = main(["check", str(bad), "--baseline", str(good / "report.json"), "--max-mean-error", "100"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "## parity check: FAIL" in cap.out
    assert "13b-mini/megatron/mmlu_philosophy (test error vs baseline)" in cap.err
    assert "13b-mini/megatron/mmlu_philosophy (new flips vs baseline)" in cap.err
    assert "13b-mini / megatron / mmlu_philosophy:" in cap.out  # listed among the moved tests
    moved = [ln for ln in cap.out.splitlines() if ln.startswith("- ")]
    assert len(moved) == 1  # nothing else moved
    assert "7b-mini" not in cap.err and "hf" not in cap.err


def test_absolute_thresholds_from_flags_and_yaml(good, tmp_path, capsys, monkeypatch):
    rep = build_report(good)
    worst = max(c["pct_error"] for c in rep["comparisons"]["7b-mini"]["megatron"].values())
    assert worst == 0  # the healthy run has no error at all
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    perturb(bad, "7b-mini", "boolq", docs=(0, 1))
    assert main(["check", str(bad), "--max-flips", "2", "--max-mean-error", "100"]) == 0
    assert main(["check", str(bad), "--max-flips", "1", "--max-mean-error", "100"]) == 1
    assert "7b-mini/megatron/boolq (flips)" in capsys.readouterr().err
    assert main(["check", str(bad), "--max-test-error", "0.5", "--max-mean-error", "100"]) == 1
    assert "7b-mini/megatron/boolq (test error)" in capsys.readouterr().err
    # yaml in ./configs is picked up; a flag overrides it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "thresholds.yaml").write_text("max_mean_error: 0.01\n")
    assert main(["check", str(bad)]) == 1
    assert "(mean error)" in capsys.readouterr().err
    assert main(["check", str(bad), "--max-mean-error", "100"]) == 0


def test_threshold_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: built-in defaults
    th, src = load_thresholds(None)
    assert th == DEFAULT_THRESHOLDS and src == "built-in defaults"
    y = tmp_path / "t.yaml"
    y.write_text("max_flips: 3\nmargin: 0.5\n")
    th, src = load_thresholds(str(y), {"margin": 0.2})
    assert th["max_flips"] == 3 and th["margin"] == 0.2 and th["max_mean_error"] == DEFAULT_THRESHOLDS["max_mean_error"]


def test_repo_thresholds_match_builtin_defaults(monkeypatch):
    repo = Path(__file__).resolve().parents[1]

    monkeypatch.chdir(repo)
    th, src = load_thresholds(None)
    assert src == "configs/thresholds.yaml" and th == DEFAULT_THRESHOLDS


def test_failed_unit_fails_no_data_does_not(tmp_path, capsys):
    run = make_run(tmp_path / "r", noise=QUIET, special={
        "7b-mini/megatron/boolq": "failed: worker exited with code 1",
        "7b-mini/meta/xcopa_et": "no data", "7b-mini/hf/xcopa_et": "no data", "7b-mini/megatron/xcopa_et": "no data"})
    assert main(["check", str(run)]) == 1
    err = capsys.readouterr().err
    assert "7b-mini/megatron/boolq (unit failed)" in err and "xcopa_et" not in err
    rep = build_report(run)
    assert evaluate(rep, DEFAULT_THRESHOLDS)["failures"][0]["check"] == "unit failed"


def test_unusable_input_exits_2(good, tmp_path, capsys):
    def refused(*argv: str, says: str) -> None:
        assert main(["check", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err

    refused(str(tmp_path / "absent"), says=f"{tmp_path / 'absent'}: results directory not found")
    old = make_run(tmp_path / "old", fmt=99)
    refused(str(old), says=f"{old / 'manifest.json'}: results from an incompatible version of parity (format 99")
    refused(str(good), "--baseline", str(tmp_path / "none.json"), says=f"{tmp_path / 'none.json'}: baseline report not found")
    (tmp_path / "b.json").write_text(json.dumps({"report_format": 0}))
    refused(str(good), "--baseline", str(tmp_path / "b.json"),
            says=f"{tmp_path / 'b.json'}: not a parity report.json of this version (report_format 0")
    (tmp_path / "t.yaml").write_text("max_mean_eror: 1\n")
    refused(str(good), "--thresholds", str(tmp_path / "t.yaml"), says="unknown threshold max_mean_eror")
    (tmp_path / "t.yaml").write_text("max_mean_error: [1\n")
    refused(str(good), "--thresholds", str(tmp_path / "t.yaml"), says=f"{tmp_path / 't.yaml'}: not valid YAML")
    other_ref = make_run(tmp_path / "o", noise=QUIET)
    write_report(other_ref, build_report(other_ref, reference="hf"), formats=("json",))
    refused(str(good), "--baseline", str(other_ref / "report.json"),
            says="baseline reference is 'hf', this check's is 'meta'; pass --reference hf")


def test_baseline_missing_backend_fails(good, tmp_path, capsys):
    smaller = make_run(tmp_path / "s", backends=["meta", "hf"], noise=QUIET)
    assert main(["check", str(smaller), "--baseline", str(good / "report.json")]) == 1
    assert "megatron (missing vs baseline)" in capsys.readouterr().err


def test_loglik_drift_without_flips_fails_against_baseline(good, tmp_path, capsys):
    bad = tmp_path / "drift"
    shutil.copytree(good, bad)
    rows = read_rows(bad, "7b-mini", "megatron", "xcopa_en")
    for r in rows:  # every choice 0.05 nats lower: no prediction changes, the numerics do
        r["loglik"] = [x - 0.05 for x in r["loglik"]]
    write_rows(bad, "7b-mini", "megatron", "xcopa_en", rows)
    rep = build_report(bad)
    assert rep["comparisons"]["7b-mini"]["megatron"]["xcopa_en"]["flips"] == 0
    assert main(["check", str(bad), "--baseline", str(good / "report.json")]) == 1
    err = capsys.readouterr().err
    assert "7b-mini/megatron/xcopa_en (max abs delta vs baseline)" in err
    assert err.count("7b-mini/megatron/") == 1
    y = tmp_path / "t.yaml"
    y.write_text("max_abs_delta: 0.01\n")
    assert main(["check", str(bad), "--thresholds", str(y)]) == 1
    assert "7b-mini/megatron/xcopa_en (max abs delta)" in capsys.readouterr().err


def test_baseline_of_another_device_or_dtype_is_refused(good, tmp_path, capsys):
    """A cuda/bf16 run scores differently by design: comparing it with a cpu/fp32 baseline would report
    false regressions, so it is refused with one line (exit 2)."""
    gpu = tmp_path / "gpu"
    shutil.copytree(good, gpu)
    manifest = json.loads((gpu / "manifest.json").read_text())
    manifest.update(device="cuda", dtype="bf16")
    (gpu / "manifest.json").write_text(json.dumps(manifest))
    assert main(["check", str(gpu), "--baseline", str(good / "report.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "baseline was made on cpu/fp32 but this run is cuda/bf16" in err and "--device cpu --dtype fp32" in err
    assert main(["check", str(gpu)]) == 0  # without a baseline: thresholds only
    committed = json.loads((Path(__file__).parents[1] / "ci" / "baseline" / "report.json").read_text())["run"]
    assert (committed["device"], committed["dtype"]) == ("cpu", "fp32")  # what ci/after-conversion.sh pins
