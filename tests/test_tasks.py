"""Registry, bundled samples, `parity tasks`, bad input."""

import json
import shutil
import subprocess
import sys

import pytest

from parity.cli import main
from parity.errors import UserError
from parity.tasks.docs import count_docs, load_docs
from parity.tasks.registry import SAMPLES_DIR
from parity.tasks.registry import MMLU_GROUPS, SUITES, TESTS, get_spec, resolve_tests


def test_registry_has_the_80_tests_in_report_order():
    assert len(TESTS) == 80
    per_suite = {s: sum(t.suite == s for t in TESTS.values()) for s in SUITES}
    assert per_suite == {"bigbench": 8, "xcopa": 11, "lm-eval": 4, "mmlu": 57}
    assert list(SUITES.values()) == ["BigBench", "Multilingual (XCOPA)", "LM Evaluation Harness", "MMLU"]
    assert MMLU_GROUPS == {"STEM": 18, "humanities": 13, "other (business, health, misc.)": 14,
                           "social sciences": 12}
    assert get_spec("mmlu_abstract_algebra").group == "STEM" and get_spec("mmlu_abstract_algebra").name == "abstract_algebra"
    assert get_spec("mmlu_professional_law").group == "humanities"
    assert get_spec("xcopa_en").lm_task == "copa" and get_spec("xcopa_en").name == "en"
    suites_in_order = [t.suite for t in TESTS.values()]
    assert suites_in_order == sorted(suites_in_order, key=list(SUITES).index)


def test_resolve_tests():
    assert resolve_tests() == list(TESTS)
    assert resolve_tests(suites=["lm-eval"]) == ["boolq", "hellaswag", "piqa", "winogrande"]
    assert resolve_tests(["xcopa_ta", "boolq"]) == ["boolq", "xcopa_ta"]
    assert len(resolve_tests(["mmlu"])) == 57
    with pytest.raises(UserError, match="did you mean: mmlu_anatomy"):
        resolve_tests(["mmlu_anatomi"])
    with pytest.raises(UserError, match="unknown suite"):
        resolve_tests(suites=["big-bench"])


def test_extra_bigbench_task_in_data_dir(tmp_path):
    shutil.copytree(SAMPLES_DIR / "bigbench" / "general_knowledge", tmp_path / "bigbench" / "my_task")
    assert resolve_tests(["bigbench_my_task"], data_dir=tmp_path) == ["bigbench_my_task"]
    assert len(load_docs("bigbench_my_task", tmp_path).docs) == 3
    with pytest.raises(UserError):
        resolve_tests(["bigbench_my_task"])  # not in the samples


@pytest.mark.parametrize("test_id", list(TESTS))
def test_every_test_has_samples(test_id):
    loaded = load_docs(test_id)
    assert loaded.source == "samples" and 3 <= len(loaded.docs) <= 9 and loaded.n_bad == 0
    for d in loaded.docs:
        assert len(d.requests) >= 2 and all(c and k for c, k in d.requests)
        golds = d.gold if isinstance(d.gold, list) else [d.gold]
        assert all(0 <= g < len(d.requests) for g in golds)
    assert [d.doc_id for d in loaded.docs][:3] in (["0", "1", "2"], ["reorder_byswap/0", "reorder_byswap/1", "reorder_byswap/2"])


def test_parity_tasks_json_lists_the_80():
    out = subprocess.run([sys.executable, "-m", "parity", "tasks", "--json"], capture_output=True, text=True,
                         check=True).stdout
    rows = json.loads(out)
    assert len(rows) == 80 and all(r["n_docs"] > 0 and r["source"] == "samples" for r in rows)
    assert set(rows[0]) == {"test", "suite", "source", "n_docs"}


def test_parity_tasks_does_not_import_lm_eval():
    code = ("import sys; from parity.cli import main; main(['tasks', '--json']); "
            "assert 'lm_eval' not in sys.modules and 'datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_parity_tasks_no_data_rows(tmp_path, capsys):
    (tmp_path / "boolq").mkdir()
    assert main(["tasks", "--data-dir", str(tmp_path), "--tests", "boolq,piqa"]) == 0
    out = capsys.readouterr().out
    assert "no data: " + str(tmp_path / "boolq" / "val.jsonl") in out
    loaded = load_docs("piqa", tmp_path)
    assert loaded.docs == [] and loaded.source.startswith("no data:")


# ---- bad input -------------------------------------------------------------------------------

def _copy(tmp_path, rel):
    dst = tmp_path / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(SAMPLES_DIR / rel, dst)
    return dst


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    f = _copy(tmp_path, "boolq/val.jsonl")
    lines = f.read_text().splitlines()
    lines[1] = lines[1][:-5]  # truncate the JSON object on line 2
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"{f}:2: malformed document"):
        load_docs("boolq", tmp_path)
    loaded = load_docs("boolq", tmp_path, skip_bad=True)
    assert loaded.n_bad == 1 and [d.doc_id for d in loaded.docs] == ["0", "2"]
    assert count_docs("boolq", tmp_path, skip_bad=True)[1:] == (2, 1)
    assert main(["tasks", "--data-dir", str(tmp_path), "--tests", "boolq"]) == 2


def test_gold_out_of_range(tmp_path):
    f = _copy(tmp_path, "xcopa/et/test.et.jsonl")
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    rows[2]["label"] = 2
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=rf"{f}:3: .*label 2 is not one of 0..1"):
        load_docs("xcopa_et", tmp_path)


def test_winogrande_answer_and_hellaswag_label_checked(tmp_path):
    f = _copy(tmp_path, "winogrande/dev.jsonl")
    f.write_text(f.read_text().replace('"answer": "2"', '"answer": "3"', 1))
    with pytest.raises(UserError, match=rf"{f}:2: .*answer"):
        load_docs("winogrande", tmp_path)
    h = _copy(tmp_path, "hellaswag/hellaswag_val.jsonl")
    h.write_text(h.read_text().replace('"label": 0', '"label": 7', 1))
    with pytest.raises(UserError, match=rf"{h}:1: .*label 7"):
        load_docs("hellaswag", tmp_path)


def test_bigbench_example_without_correct_choice(tmp_path):
    f = _copy(tmp_path, "bigbench/general_knowledge/task.json")
    task = json.loads(f.read_text())
    task["examples"][1]["target_scores"] = {k: 0 for k in task["examples"][1]["target_scores"]}
    f.write_text(json.dumps(task))
    with pytest.raises(UserError, match=r"example 1: no choice has a positive target score"):
        load_docs("bigbench_general_knowledge", tmp_path)
    loaded = load_docs("bigbench_general_knowledge", tmp_path, skip_bad=True)
    assert loaded.n_bad == 1 and [d.doc_id for d in loaded.docs] == ["0", "2"]


def test_non_utf8_and_empty_files(tmp_path):
    f = _copy(tmp_path, "winogrande/dev.jsonl")
    data = f.read_bytes().splitlines(keepends=True)
    data[2] = b'{"sentence": "caf\xe9 _ x", "option1": "a", "option2": "b", "answer": "1"}\n'
    f.write_bytes(b"".join(data))
    with pytest.raises(UserError, match=rf"{f}:3: not UTF-8"):
        load_docs("winogrande", tmp_path)
    c = _copy(tmp_path, "mmlu/test/anatomy_test.csv")
    c.write_bytes(c.read_bytes() + b"Caf\xe9?,a,b,c,d,A\n")
    with pytest.raises(UserError, match=rf"{c}:4: not UTF-8"):
        load_docs("mmlu_anatomy", tmp_path)
    e = tmp_path / "boolq" / "val.jsonl"
    e.parent.mkdir()
    e.write_text("\n")
    with pytest.raises(UserError, match=rf"{e}: file is empty"):
        load_docs("boolq", tmp_path)


def test_mmlu_bad_row_and_piqa_label_count(tmp_path):
    c = _copy(tmp_path, "mmlu/test/virology_test.csv")
    c.write_text(c.read_text() + "What?,a,b,c,d,E\n")
    with pytest.raises(UserError, match=rf"{c}:4: malformed row \(answer 'E'"):
        load_docs("mmlu_virology", tmp_path)
    assert len(load_docs("mmlu_virology", tmp_path, skip_bad=True).docs) == 3
    _copy(tmp_path, "piqa/valid.jsonl")
    lab = _copy(tmp_path, "piqa/valid-labels.lst")
    lab.write_text("0\n1\n")
    with pytest.raises(UserError, match="2 labels for 3 documents"):
        load_docs("piqa", tmp_path)


def test_limit_and_hellaswag_text_format(tmp_path):
    assert len(load_docs("xcopa_zh", limit=2).docs) == 2
    t = tmp_path / "hellaswag" / "hellaswag_val_full.txt"
    t.parent.mkdir()
    t.write_text("Cooking: A man cracks an egg. he\n1\nsings.\nfries it in a pan.\nflies.\nsleeps.\n")
    doc = load_docs("hellaswag", tmp_path).docs[0]
    assert doc.requests[1] == ("Cooking: A man cracks an egg. he", " fries it in a pan.") and doc.gold == 1
    t.write_text(t.read_text() + "dangling\n")
    with pytest.raises(UserError, match="not a multiple of 6"):
        load_docs("hellaswag", tmp_path)


def test_split_pair_moves_trailing_spaces():
    from parity.tasks.tokenize import split_pair

    assert split_pair("Q\nA: ", "four") == ("Q\nA:", " four")
    assert split_pair("Answer:", " A") == ("Answer:", " A")
    assert split_pair("x  ", "y") == ("x", "  y")
