"""Bad data through the commands a user runs: `parity tasks` and `parity run` stop with one line naming
the file and the line (or example); with --skip-bad-docs the run completes and the manifest and
report.json count the skipped documents. Never a score computed from a broken document.

Each loader's rule is unit-tested in tests/test_tasks.py (load_docs level); here every case goes through
the CLI on a copy of the bundled samples' layout with one file damaged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import run_parity

from parity.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "parity" / "tasks" / "samples"


def _lines(f: Path, edit) -> None:
    lines = f.read_bytes().splitlines(keepends=True)
    edit(lines)
    f.write_bytes(b"".join(lines))


def truncated_json_line(d: Path) -> Path:
    f = d / "boolq" / "val.jsonl"
    _lines(f, lambda ls: ls.__setitem__(1, ls[1].rstrip()[:-7] + b"\n"))
    return f


def mmlu_wrong_column_count(d: Path) -> Path:
    f = d / "mmlu" / "test" / "anatomy_test.csv"
    _lines(f, lambda ls: ls.__setitem__(1, b"Which bone?,femur,tibia,C\n"))  # 4 columns, not 6
    return f


def empty_file(d: Path) -> Path:
    f = d / "piqa" / "valid.jsonl"
    f.write_bytes(b"")
    return f


def gold_out_of_range(d: Path) -> Path:
    f = d / "xcopa" / "et" / "test.et.jsonl"

    def edit(ls):
        row = json.loads(ls[2])
        row["label"] = 2
        ls[2] = json.dumps(row).encode() + b"\n"
    _lines(f, edit)
    return f


def non_utf8(d: Path) -> Path:
    f = d / "winogrande" / "dev.jsonl"
    _lines(f, lambda ls: ls.__setitem__(1, ls[1].replace(b"e", b"\xe9", 1)))
    return f


def bigbench_no_correct_choice(d: Path) -> Path:
    f = d / "bigbench" / "general_knowledge" / "task.json"
    task = json.loads(f.read_text())
    task["examples"][1]["target_scores"] = {k: 0 for k in task["examples"][1]["target_scores"]}
    f.write_text(json.dumps(task, indent=1))
    return f


# (corruption, test id, where the message must point, skippable with --skip-bad-docs)
CASES = [
    (truncated_json_line, "boolq", ":2:", True),
    (mmlu_wrong_column_count, "mmlu_anatomy", ":2:", True),
    (empty_file, "piqa", "file is empty", False),
    (gold_out_of_range, "xcopa_et", ":3:", True),
    (non_utf8, "winogrande", ":2:", True),
    (bigbench_no_correct_choice, "bigbench_general_knowledge", "example 1", True),
]
SKIPPABLE = [c for c in CASES if c[3]]


def data_dir(root: Path, corruptions) -> tuple[Path, list[Path]]:
    d = root / "data"
    shutil.copytree(SAMPLES, d)
    return d, [corrupt(d) for corrupt in corruptions]


def one_line(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    # progress lines may precede it ("parity: synthetic 7b-mini checkpoint ..."); the error is one line
    errors = [ln for ln in err.splitlines() if ln.startswith(f"parity {argv[0]}:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("corrupt, test, where, skippable", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_file_stops_tasks_and_run_with_file_and_line(corrupt, test, where, skippable, tmp_path, capsys):
    d, (f,) = data_dir(tmp_path, [corrupt])
    for argv in (["tasks", "--data-dir", str(d)],  # every test is checked: the damaged one stops it
                 ["run", "--sizes", "7b-mini", "--backends", "meta", "--data-dir", str(d), "--tests", test,
                  "--out", str(tmp_path / "run"), "--no-report"]):
        err = one_line(capsys, argv)
        assert f"{f}{where}" in err if where.startswith(":") else (str(f) in err and where in err), err
    assert not list((tmp_path / "run").glob("7b-mini/*/*.jsonl"))  # nothing scored
    if not skippable:  # nothing to skip to: still an error
        one_line(capsys, ["tasks", "--data-dir", str(d), "--tests", test, "--skip-bad-docs"])


def test_skip_bad_docs_runs_and_counts_them(tmp_path, capsys):
    d, _ = data_dir(tmp_path, [c[0] for c in SKIPPABLE])
    tests = [c[1] for c in SKIPPABLE]
    assert main(["tasks", "--data-dir", str(d), "--tests", ",".join(tests), "--skip-bad-docs", "--json"]) == 0
    rows = {r["test"]: r for r in json.loads(capsys.readouterr().out)}
    assert {t: (rows[t]["n_docs"], rows[t]["n_bad"]) for t in tests} == {t: (2, 1) for t in tests}

    out = tmp_path / "run"
    r = run_parity("run", "--sizes", "7b-mini", "--backends", "meta,hf", "--data-dir", d, "--tests", ",".join(tests),
                   "--skip-bad-docs", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {t: (manifest["tests"][t]["n_docs"], manifest["tests"][t]["n_bad"]) for t in tests} == \
        {t: (2, 1) for t in tests}
    assert {u["status"] for u in manifest["units"].values()} == {"done"}
    report = json.loads((out / "report.json").read_text())
    assert {t: report["tests"][t]["n_bad"] for t in tests} == {t: 1 for t in tests}
    md = (out / "report.md").read_text()
    for t in tests:  # the markdown says so too, not only the json
        assert f"- {t}: 1 malformed document(s) skipped" in md
    for t in tests:  # the skipped document is absent from the per-sample files, the others are scored
        rows = [json.loads(x) for x in (out / "7b-mini" / "meta" / f"{t}.jsonl").read_text().splitlines()]
        assert len(rows) == 2
