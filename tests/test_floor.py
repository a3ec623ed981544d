"""The noise floor: the floor logic on constructed per-sample files, the perturbation table, the batch order,
the check gate and its one-line refusals. (The end-to-end floor run is in test_run_e2e.py's style, small.)"""

from __future__ import annotations

import copy
import json

import pytest
from cli_helpers import assert_one_line_error, run_parity
from report_fakes import make_rows, make_run, read_rows

from parity.cli import main
from parity.errors import UserError
from parity.report import build_report, render_markdown
from parity.report.floor import floor_of, judge_against_floor
from parity.report.metrics import compare
from parity.report.summary import pair_summary, render_summary

TESTS = ["boolq", "xcopa_en", "mmlu_anatomy"]


def _moved(rows, doc: int, by: float):
    out = copy.deepcopy(rows)
    out[doc]["loglik"][0] += by
    return out


def _flipped(rows, doc: int):
    """Document `doc` predicts another choice: its best choice drops below the second best."""
    out = copy.deepcopy(rows)
    r = out[doc]
    ll = r["loglik"]
    best = r["pred"]
    second = max((i for i in range(len(ll)) if i != best), key=lambda i: ll[i])
    ll[best] = ll[second] - 0.01
    r["pred"] = max(range(len(ll)), key=lambda i: (ll[i], -i))
    return out


def test_floor_of_and_flips_within_or_beyond_it():
    base = make_rows("7b-mini", "meta", "boolq")
    floor = floor_of(base, {"batch1": _moved(base, 3, 2e-3), "repeat": base, "reversed": _flipped(base, 5)})
    assert floor["max_abs_delta"] == pytest.approx(abs(base[5]["loglik"][base[5]["pred"]] -
                                                       _flipped(base, 5)[5]["loglik"][base[5]["pred"]]))
    assert floor["flipped_docs"] == ["5"]
    assert floor["by_perturbation"]["repeat"] == {"max_abs_delta": 0.0, "mean_abs_delta": 0.0, "flips": 0}
    assert floor["by_perturbation"]["batch1"]["max_abs_delta"] == pytest.approx(2e-3)
    n = sum(len(r["loglik"]) for r in base)
    assert floor["mean_abs_delta"] == pytest.approx((2e-3 + floor["max_abs_delta"]) / (3 * n))
    assert floor_of(base, {}) is None
    # cross-stack: doc 5 flips (also under a perturbation: within floor), doc 7 flips (beyond)
    other = _flipped(_flipped(base, 5), 7)
    cross = compare(base, other)
    j = judge_against_floor(cross, floor, None)
    assert j["flips_within_floor"] == ["5"] and j["flips_beyond_floor"] == ["7"] and j["above_floor"]
    assert j["floor_ratio"] == pytest.approx(cross["max_abs_delta"] / floor["max_abs_delta"])
    # the other stack's floor counts too: doc 7 flips under one of its perturbations
    j2 = judge_against_floor(cross, floor, floor_of(other, {"batch1": _flipped(other, 7)}))
    assert j2["flips_beyond_floor"] == [] and sorted(j2["flips_within_floor"]) == ["5", "7"]


def test_zero_floor():
    base = make_rows("7b-mini", "meta", "boolq")
    floor = floor_of(base, {"repeat": base})
    assert floor["max_abs_delta"] == 0 and floor["flipped_docs"] == []
    same = judge_against_floor(compare(base, base), floor, None)
    assert same["floor_ratio"] == 0.0 and not same["above_floor"]
    moved = judge_against_floor(compare(base, _moved(base, 0, 1e-6)), floor, None)
    assert moved["floor_ratio"] is None and moved["above_floor"]


def _floor_run(tmp_path, perturb=None, noise=None):
    """A fake run with floor units: each stack's perturbations move one choice per test by 1e-3 nats."""
    run = make_run(tmp_path / "run", sizes=["7b-mini"], tests=TESTS, noise=noise)
    m = json.loads((run / "manifest.json").read_text())
    units = {}
    for b in ("meta", "hf", "megatron"):
        for t in TESTS:
            for p in ("batch1", "repeat"):
                rows = read_rows(run, "7b-mini", b, t)
                rows = (perturb or (lambda rows, p, b: _moved(rows, 2, 1e-3) if p == "batch1" else rows))(rows, p, b)
                path = run / "floor" / p / "7b-mini" / b / f"{t}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
                units[f"7b-mini/{b}/{t}/{p}"] = {"status": "done", "error": None, "seconds": 1.0, "inputs": "x"}
    m["floor"] = {"perturbations": ["batch1", "repeat"], "units": units}
    (run / "manifest.json").write_text(json.dumps(m))
    return run


def test_report_floor_section_summary_and_check(tmp_path, capsys):
    run = _floor_run(tmp_path)
    report = build_report(run)
    c = report["comparisons"]["7b-mini"]["hf"]["boolq"]
    assert c["floor_max_abs_delta"] == pytest.approx(1e-3)
    assert c["floor_ratio"] == pytest.approx(c["max_abs_delta"] / 1e-3)
    # hf of the fakes is ~1e-6 from meta: well within the 1e-3 floor; megatron (0.4 nats) far above it
    assert pair_summary(report, "7b-mini", "hf")["verdict"] == "noise"
    mg = pair_summary(report, "7b-mini", "megatron")
    assert mg["verdict"] == "differs" and mg["ratio"] > 100
    md = render_markdown(report)
    assert "## Noise floor" in md and "### 7b-mini: meta vs megatron" in md
    screen = render_summary(report)
    assert "noise" in screen and "differs" in screen and "floor = max |delta loglik|" in screen
    assert "tokenizer:" not in screen
    report["tokenizer_mismatches"] = {"7b-mini": {"hf": {"boolq": 2, "xcopa_en": 0}}}
    assert "tokenizer: 2 requests of 7b-mini/hf" in render_summary(report)
    # the gate: megatron's ratio fails 50, hf's passes
    assert main(["check", str(run), "--max-floor-ratio", "50", "--max-mean-error", "100"]) == 1
    err = capsys.readouterr().err
    assert "megatron" in err and "floor ratio" in err and "/hf/" not in err
    assert main(["check", str(run), "--max-floor-ratio", "1e9", "--max-mean-error", "100"]) == 0


def test_each_stacks_own_floor_is_reported(tmp_path):
    """The comparisons show the larger of two floors; the per-stack table keeps them apart: here meta's
    perturbations move nothing, hf's batch1 flips document 3 of boolq, megatron's moves a choice by 1e-3."""
    def perturb(rows, p, b):
        if p != "batch1" or b == "meta":
            return rows
        return _flipped(rows, 3) if b == "hf" else _moved(rows, 2, 1e-3)

    report = build_report(_floor_run(tmp_path, perturb=perturb))
    per = report["floor"]["per"]["7b-mini"]
    assert per["meta"]["boolq"]["max_abs_delta"] == 0 and per["hf"]["boolq"]["flipped_docs"] == ["3"]
    md = render_markdown(report)
    table = md[md.index("### 7b-mini: each stack's floor"):].splitlines()
    assert table[4] == "| test | meta | hf | megatron |"
    boolq = next(ln for ln in table if ln.startswith("| boolq |")).split(" | ")
    assert boolq[1] == "0 / 0" and "(1 flip: 3)" in boolq[2] and boolq[3].startswith("1.00e-03 / ")


def test_a_floor_measured_against_another_plain_unit_is_left_out(tmp_path):
    run = _floor_run(tmp_path)
    m = json.loads((run / "manifest.json").read_text())
    m["floor"]["base_inputs"] = {k: "x" for k in m["floor"]["units"]}  # the plain units' inputs ("x" in the fakes)
    m["floor"]["base_inputs"]["7b-mini/hf/boolq/batch1"] = "an-older-checkpoint"
    (run / "manifest.json").write_text(json.dumps(m))
    per = build_report(run)["floor"]["per"]["7b-mini"]
    assert set(per["hf"]["boolq"]["by_perturbation"]) == {"repeat"}
    assert set(per["hf"]["xcopa_en"]["by_perturbation"]) == {"batch1", "repeat"}


def test_zero_floor_fails_the_gate_and_a_run_without_floor_is_refused(tmp_path, capsys):
    run = _floor_run(tmp_path / "z", perturb=lambda rows, p, b: rows)  # perturbations change nothing
    report = build_report(run)
    assert pair_summary(report, "7b-mini", "hf")["verdict"] == "above"  # any difference is above a 0 floor
    assert main(["check", str(run), "--max-floor-ratio", "1e9", "--max-mean-error", "100"]) == 1
    assert "inf (floor 0" in capsys.readouterr().out
    plain = make_run(tmp_path / "plain", sizes=["7b-mini"], tests=TESTS)
    assert_one_line_error(run_parity("check", plain, "--max-floor-ratio", "2"), "no noise floor", "--noise-floor")
    assert pair_summary(build_report(plain), "7b-mini", "megatron")["verdict"] == "flips"


def test_perturbation_table_and_job_validation(tmp_path):
    from parity.floor import PERTURBATIONS, applicable
    from parity.jobs import Job, JobUnit

    assert applicable("cpu", "fp32") == ["batch1", "reversed", "repeat", "threads"]
    assert applicable("cuda", "bf16") == ["batch1", "reversed", "repeat"]
    assert applicable("cuda", "fp32") == ["batch1", "reversed", "repeat", "tf32"]
    assert PERTURBATIONS["batch1"].batch_size == "1"
    job = Job("meta", "ckpt", 1, adapter="a:B", units=[JobUnit("t", "r", "o", perturbation="sideways")])
    job.write(tmp_path / "j.json")
    with pytest.raises(UserError, match="perturbation 'sideways' is not one of"):
        Job.read(tmp_path / "j.json")


def test_batch_order_changes_neighbours_not_results():
    """shortest first: other batches, other padding widths, the same requests scored (a toy forward whose
    logits depend only on each row's own tokens)."""
    import torch

    from parity.backends.base import Backend
    from parity.requests import Request

    class Toy(Backend):
        name = "toy"

        def load(self):
            self.vocab_size, self.max_length, self.shapes = 16, 64, []

        def forward(self, tokens):
            self.shapes.append(tuple(tokens.shape))
            return torch.nn.functional.one_hot(tokens % 16, 16).float().cumsum(1)

    reqs = [Request(tuple(range(1, 2 + n)), (3, 4)) for n in range(12)]
    toy = Toy("x")
    plain = toy.loglikelihood(reqs, batch_size=5)
    longest = list(toy.shapes)
    toy.shapes.clear()
    toy.batch_order = "shortest"
    assert toy.loglikelihood(reqs, batch_size=5) == plain
    assert longest == [(5, 13), (5, 8), (2, 3)] and toy.shapes == [(5, 6), (5, 11), (2, 13)]
    assert toy.largest_batch(reqs, 5) == max(r * w for r, w in toy.shapes)


def test_noise_floor_refuses_a_backend_that_cannot_rebatch(monkeypatch, tmp_path):
    from parity.backends import BACKENDS, BackendInfo, register

    register(BackendInfo("fixed", "x:Y", "hf", default=False, batches=False))
    try:
        from parity.cli import build_parser
        from parity.run import make_plan

        args = build_parser().parse_args(["run", "--sizes", "7b-mini", "--backends", "meta,fixed", "--tests",
                                          "boolq", "--noise-floor", "--out", str(tmp_path / "r")])
        with pytest.raises(UserError, match="cannot change its batch composition"):
            make_plan(args)
    finally:
        BACKENDS.pop("fixed")


def test_output_filter_keeps_progress_and_parity_lines():
    from parity.backends.worker import _Filter

    f = _Filter(("7b-mini/meta", "parity"))
    out = f.feed(b"> initializing model parallel with size 1\n7b-mini/meta:  10%|#  | 1/9\r7b-mini/me")
    out += f.feed(b"ta:  20%|## | 2/9\rDeprecationWarning: full scope is deprecated\nparity score: bad input\n")
    assert out == b"7b-mini/meta:  10%|#  | 1/9\r7b-mini/meta:  20%|## | 2/9\rparity score: bad input\n"
    # a warning printed right after a redraw, on the bar's line (transformers' FutureWarning did)
    bar = b"7b-mini/meta:   0%|          | 0/903 [00:00<?, ?req/s]"
    assert f.feed(bar + b"[transformers] `past_key_values` is deprecated.\n" + bar + b"  \r") == \
        bar + b"\n" + bar + b"  \r"


def test_noise_floor_run_end_to_end_reused_and_quiet(tmp_path):
    """A real run with --noise-floor: floor units stored and reported, a second run reuses every unit, the
    stacks' chatter is in the run's logs and not on the terminal."""
    from cli_helpers import counts

    out = tmp_path / "run"
    args = ["run", "--sizes", "7b-mini", "--backends", "meta,megatron", "--tests", "xcopa_en,mmlu_anatomy",
            "--limit", "2", "--noise-floor", "--out", out]
    r = run_parity(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["floor"]["perturbations"] == ["batch1", "reversed", "repeat", "threads"]
    assert len(m["floor"]["units"]) == 2 * 2 * 4 and {u["status"] for u in m["floor"]["units"].values()} == {"done"}
    assert (out / "floor" / "batch1" / "7b-mini" / "megatron" / "xcopa_en.jsonl").is_file()
    report = json.loads((out / "report.json").read_text())
    c = report["comparisons"]["7b-mini"]["megatron"]["xcopa_en"]
    assert c["floor_max_abs_delta"] is not None and "flips_beyond_floor" in c
    assert "verdict" in r.stdout and "7b-mini  megatron" in r.stdout and "## BigBench" not in r.stdout
    for chatter in ("initializing model parallel", "deprecated", "Warning"):
        assert chatter not in r.stderr, chatter
    assert "> initializing model parallel" in (out / "logs" / "7b-mini-meta.log").read_text()
    again = run_parity(*args)
    assert again.returncode == 0 and counts(again.stderr) == (4 + 16, 0)
