"""Reporter: numbers recomputed independently from the per-sample files, missing pieces, determinism."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from report_fakes import TESTS, make_rows, make_run, read_rows

from parity.cli import main
from parity.errors import UserError
from parity.report import build_report, render_csv, render_markdown, write_report
from parity.report import metrics


# ------------------------------------------------------------------ independent re-computation helpers
def _doc_score(r):
    if "scores" in r:
        return r["scores"][r["pred"]]
    return float(r["pred"] in r["gold"]) if isinstance(r["gold"], list) else float(r["pred"] == r["gold"])


def _score(rows):
    subs = {}
    for r in rows:
        subs.setdefault(r["doc_id"].split("/")[0] if "/" in r["doc_id"] else "", []).append(_doc_score(r))
    if list(subs) == [""]:
        return sum(subs[""]) / len(subs[""])
    return sum(sum(v) / len(v) for v in subs.values()) / len(subs)


@pytest.fixture()
def run(tmp_path):
    return make_run(tmp_path / "run")


def test_numbers_recomputed_from_per_sample_files(run):
    rep = build_report(run)
    assert rep["reference"] == "meta" and rep["others"] == ["hf", "megatron"]
    total_flips = 0
    for size in rep["sizes"]:
        for other in rep["others"]:
            errs = []
            for t in TESTS:
                ref_rows, oth_rows = read_rows(run, size, "meta", t), read_rows(run, size, other, t)
                ref, oth = _score(ref_rows), _score(oth_rows)
                c = rep["comparisons"][size][other][t]
                assert c["ref_score"] == pytest.approx(ref) and c["score"] == pytest.approx(oth)
                assert rep["units"][size][other][t]["score"] == pytest.approx(oth)
                err = abs(ref - oth) / ref * 100
                assert c["pct_error"] == pytest.approx(err)
                errs.append(err)
                flips = sum(a["pred"] != b["pred"] for a, b in zip(ref_rows, oth_rows))
                assert c["flips"] == flips
                total_flips += flips
                deltas = [abs(x - y) for a, b in zip(ref_rows, oth_rows) for x, y in zip(a["loglik"], b["loglik"])]
                assert c["max_abs_delta"] == pytest.approx(max(deltas))
                assert c["mean_abs_delta"] == pytest.approx(sum(deltas) / len(deltas))
            assert rep["mean_error"][size][other]["mean"] == pytest.approx(sum(errs) / len(errs))
            # MMLU supercategory row = mean of its subjects' percent errors
            stem = [r for r in rep["tables"][other]["mmlu"] if r["test"] == "STEM [18]"][0]
            subj = [rep["comparisons"][size][other][t]["pct_error"] for t in ("mmlu_astronomy", "mmlu_college_physics")]
            assert stem["values"][size] == pytest.approx(sum(subj) / 2)
            assert stem["cells"][size].endswith("(2 of 18)")
    assert total_flips > 0  # the fake megatron noise does flip predictions: the checks above had teeth
    assert all(rep["comparisons"][s]["hf"][t]["flips"] == 0 for s in rep["sizes"] for t in TESTS)


def test_subtask_mean_differs_from_doc_mean():
    # subtask a: 2 docs, both right (mean 1); subtask b: 1 doc wrong (mean 0) -> 0.5, not 2/3
    rows = [{"doc_id": "a/0", "pred": 0, "gold": 0, "scores": [1.0, 0.0]},
            {"doc_id": "a/1", "pred": 1, "gold": 1, "scores": [0.0, 1.0]},
            {"doc_id": "b/0", "pred": 0, "gold": 1, "scores": [0.0, 1.0]}]
    assert metrics.test_score(rows) == 0.5
    assert metrics.test_score([dict(r, doc_id=str(i)) for i, r in enumerate(rows)]) == pytest.approx(2 / 3)
    # BigBench grade is the target score of the prediction, fractional ones included
    assert metrics.doc_score({"pred": 1, "gold": 0, "scores": [1.0, 0.25]}) == 0.25
    assert metrics.doc_score({"pred": 2, "gold": [0, 2]}) == 1.0


def test_mcnemar_known_cases():
    assert metrics.mcnemar_p(0, 0) == 1.0
    assert metrics.mcnemar_p(0, 5) == pytest.approx(2 / 32)  # 2 * 0.5**5
    assert metrics.mcnemar_p(1, 5) == pytest.approx(14 / 64)  # 2 * (1 + 6) / 64
    # built from rows: ref right / other wrong on 1 doc, the reverse on 5, 4 concordant
    ref = [{"doc_id": str(i), "request_hashes": [f"h{i}a", f"h{i}b"], "loglik": [0.0, -1.0], "pred": 0,
            "gold": 0 if i < 5 else 1} for i in range(10)]
    # other predicts 1 on docs 1-4 (gold 0: ref right, other wrong -> b = 4) and on doc 6
    # (gold 1: ref wrong, other right -> c = 1)
    other = [dict(r, pred=1 if i in (1, 2, 3, 4, 6) else 0) for i, r in enumerate(ref)]
    c = metrics.compare(ref, other)
    assert c["discordant"] == [4, 1] and c["flips"] == 5
    assert c["p_mcnemar"] == pytest.approx(2 * (1 + 5) / 32)


def test_ref_zero_failed_no_data_and_missing_backend_are_shown(tmp_path):
    zero = [dict(r, pred=(r["gold"] + 1) % 2) for r in make_rows("7b-mini", "meta", "boolq")]
    run = make_run(tmp_path / "r", special={
        "7b-mini/meta/boolq": zero,
        "7b-mini/megatron/xcopa_en": "failed: worker exited with code 1: RuntimeError | shapes",
        "13b-mini/meta/xcopa_et": "no data", "13b-mini/hf/xcopa_et": "no data", "13b-mini/megatron/xcopa_et": "no data",
        **{f"13b-mini/hf/{t}": "missing" for t in TESTS if t != "xcopa_et"},
    })
    rep = build_report(run)
    c = rep["comparisons"]["7b-mini"]["hf"]["boolq"]
    assert c["ref_score"] == 0 and c["pct_error"] is None and c["note"] == "n/a (ref 0)"
    me = rep["mean_error"]["7b-mini"]["hf"]
    assert me["n_with_error"] == len(TESTS) - 1 and "boolq" in me["excluded"]
    others = [rep["comparisons"]["7b-mini"]["hf"][t]["pct_error"] for t in TESTS if t != "boolq"]
    assert me["mean"] == pytest.approx(sum(others) / len(others))
    assert rep["comparisons"]["7b-mini"]["megatron"]["xcopa_en"]["note"] == "failed (megatron)"
    assert rep["comparisons"]["13b-mini"]["megatron"]["xcopa_et"]["note"] == "no data"
    md = render_markdown(rep)
    assert "n/a (ref 0)" in md and ("- no percent error, n/a (ref 0): 1 test (7b-mini: boolq); left out of the "
                                    "mean of every backend pair") in md
    assert "7b-mini / megatron: failed (xcopa_en): worker exited with code 1: RuntimeError \\| shapes" not in md
    assert "7b-mini / megatron: failed (xcopa_en): worker exited with code 1: RuntimeError | shapes" in md
    assert "13b-mini / meta: no data (xcopa_et)" in md
    assert f"13b-mini / hf: missing ({', '.join(t for t in TESTS if t != 'xcopa_et')})" in md
    table_line = [ln for ln in md.splitlines() if ln.startswith("| boolq |")][0]
    assert "n/a (ref 0)" in table_line
    assert "| en | failed (megatron) |" in md


def test_markdown_has_suite_tables_and_sentence(run):
    rep = build_report(run)
    md = render_markdown(rep)
    for title in ("### BigBench", "### Multilingual (XCOPA)", "### LM Evaluation Harness", "### MMLU"):
        assert md.count(title) == 2  # once per non-reference backend
    me = rep["mean_error"]
    assert (f"Across {len(TESTS)} tests per size, the mean error between meta and megatron is "
            f"{me['7b-mini']['megatron']['mean']:.2f}% (7b-mini), {me['13b-mini']['megatron']['mean']:.2f}% (13b-mini).") in md
    assert "| STEM [18] |" in md and "| social sciences [12] | n/a (0 of 12) |" in md
    assert "| Test | 7b-mini | 13b-mini |" in md
    assert "McNemar p" in md and "McNemar p" not in render_markdown(rep, details=False)
    csv_lines = render_csv(rep).splitlines()
    assert len(csv_lines) == 1 + 2 * 2 * len(TESTS)


def test_regenerated_report_is_byte_identical(run, tmp_path):
    write_report(run, build_report(run), formats=("md", "json", "csv"))
    names = ["report.md", "report.json", "report.csv", "plots/heatmap-megatron.png", "plots/deltas-hf.png"]
    first = {n: (run / n).read_bytes() for n in names}
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["report", str(copy), "--format", "md,json,csv"]) == 0
    assert {n: (copy / n).read_bytes() for n in names} == first
    assert b"Software" not in first["plots/heatmap-megatron.png"]
    rep = json.loads(first["report.json"])
    assert rep["plots"]["megatron"]["heatmap"] == "plots/heatmap-megatron.png"
    assert "](plots/heatmap-megatron.png)" in first["report.md"].decode()


def test_no_plots_links_nothing(run):
    assert main(["report", str(run), "--no-plots"]) == 0
    assert not (run / "plots").exists() and "plots/" not in (run / "report.md").read_text()
    assert not (run / "report.csv").exists()


def test_reference_switch(run):
    rep = build_report(run, reference="hf")
    assert rep["others"] == ["meta", "megatron"]
    with pytest.raises(UserError, match="reference backend 'nemo'"):
        build_report(run, reference="nemo")


def test_unusable_run_dirs(tmp_path, capsys):
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert f"{tmp_path / 'absent'}: results directory not found" in capsys.readouterr().err
    run = make_run(tmp_path / "old", fmt=0)
    assert main(["report", str(run)]) == 2
    assert "results from an incompatible version of parity (format 0" in capsys.readouterr().err
    run = make_run(tmp_path / "bad")
    (run / "7b-mini" / "hf" / "boolq.jsonl").write_text('{"doc_id": "0"}\nnot json\n')
    with pytest.raises(UserError, match=r"boolq.jsonl: line 1 lacks request_hashes"):
        build_report(run)
    assert main(["report", str(run), "--format", "md,pdf"]) == 2
    assert "--format 'md,pdf': unknown format pdf; choose from md,json,csv" in capsys.readouterr().err
    assert not (run / "report.md").exists()  # nothing half-written


def test_histogram_counts_every_delta():
    h = metrics.histogram([0.0, 1e-12, 1e-6, 0.3, 5e5])
    assert h["zeros"] == 1 and sum(h["counts"]) == 4
    assert h["counts"][0] == 1 and h["counts"][-1] == 1  # clipped into the end bins, not dropped
    assert h["counts"][int((math.log10(1e-6) + 10) // 0.5)] == 1


def test_reporter_never_imports_a_model_stack(run):
    import subprocess
    import sys

    code = ("import sys; from parity.report import build_report, write_report; "
            f"write_report({str(run)!r}, build_report({str(run)!r})); "
            "print(sorted(m for m in ('torch', 'transformers', 'megatron', 'lm_eval', 'llama_models') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
