"""Our prompts for the lm-eval tests equal the Instance.args lm-eval builds from the same documents.

The reference side is lm-eval run the way a user runs it offline: a TaskManager over a tiny
include_path (yamls that `include` lm-eval's own task yaml and point dataset_path: json at local
files), then task.build_all_requests(). Our side is parity.tasks.load_docs on the same files.
"""

import csv
import json
from pathlib import Path

import pytest

from parity.tasks.docs import load_docs
from parity.tasks.registry import SAMPLES_DIR
from parity.tasks.lmeval import task_yaml
from parity.tasks.registry import TESTS

LM_TESTS = [t for t, s in TESTS.items() if s.lm_task is not None]


def _jsonl_for(test_id: str, root: Path, tmp: Path) -> Path:
    """The local file lm-eval's json loader reads, in the hub dataset's fields.

    jsonl datasets are read as they are; PIQA's labels file is joined and MMLU's CSV converted here,
    independently of parity's readers.
    """
    spec = TESTS[test_id]
    if spec.kind == "piqa":
        labels = (root / "piqa/valid-labels.lst").read_text().split()
        rows = [json.loads(x) | {"label": int(lab)}
                for x, lab in zip((root / "piqa/valid.jsonl").read_text().splitlines(), labels)]
    elif spec.kind == "mmlu":
        with open(root / f"mmlu/test/{spec.name}_test.csv", newline="", encoding="utf-8") as f:
            rows = [{"question": r[0], "subject": spec.name, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                    for r in csv.reader(f)]
    else:
        return {"copa": root / "copa/val.jsonl", "xcopa": root / f"xcopa/{spec.name}/test.{spec.name}.jsonl",
                "boolq": root / "boolq/val.jsonl", "hellaswag": root / "hellaswag/hellaswag_val.jsonl",
                "winogrande": root / "winogrande/dev.jsonl"}[spec.kind]
    out = tmp / f"{test_id}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def lm_eval_args(tmp_path_factory):
    """test id -> per doc, the (context, continuation) args of lm-eval's own Instances."""
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("lmeval")
    yamls = tmp / "yamls"
    yamls.mkdir()
    names = {}
    for test_id in LM_TESTS:
        data = _jsonl_for(test_id, SAMPLES_DIR, tmp)
        name = f"parity_check_{test_id}"
        names[test_id] = name
        cfg = {"include": str(task_yaml(TESTS[test_id])), "task": name, "tag": [],
               "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": {s: str(data) for s in ("train", "validation", "test", "dev")},
                                  "cache_dir": str(tmp / "hf_cache")}}
        (yamls / f"{name}.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    tm = TaskManager(include_path=str(yamls), include_defaults=False)
    tasks = tm.load(list(names.values()))["tasks"]
    out = {}
    for test_id, name in names.items():
        task = tasks[name]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        per_doc: dict[int, list] = {}
        for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
            per_doc.setdefault(inst.doc_id, []).append(tuple(inst.arguments))
        out[test_id] = [per_doc[k] for k in sorted(per_doc)]
    return out


@pytest.mark.parametrize("test_id", LM_TESTS)
def test_pairs_equal_lm_eval_instances(test_id, lm_eval_args):
    ours = load_docs(test_id)
    assert ours.source == "samples"
    theirs = lm_eval_args[test_id]
    assert len(ours.docs) == len(theirs) >= 3
    for doc, args in zip(ours.docs, theirs):
        assert doc.requests == args, f"{test_id} doc {doc.doc_id}"


def test_spot_checks_of_lm_eval_prompts():
    """A few literal prompts, so a change in lm-eval's definitions shows up as a readable diff."""
    mmlu = load_docs("mmlu_anatomy").docs[0]
    assert mmlu.requests[0][0] == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                                   "Which bone is in the upper arm?\nA. Femur\nB. Tibia\nC. Humerus\nD. Radius\nAnswer:")
    assert [c for _, c in mmlu.requests] == [" A", " B", " C", " D"] and mmlu.gold == 2
    wino = load_docs("winogrande").docs[1]  # partial evaluation: the context varies, the continuation not
    assert wino.requests == [("The trophy did not fit into the bag because the trophy", " was too small."),
                             ("The trophy did not fit into the bag because the bag", " was too small.")]
    assert wino.gold == 1
    et = load_docs("xcopa_et").docs[0]
    assert et.requests == [("Lamp kustus sest", " pirn läks läbi."), ("Lamp kustus sest", " aken oli lahti.")]
    boolq = load_docs("boolq").docs
    assert [d.gold for d in boolq] == [1, 0, 0]  # true / false / "false"
    hs = load_docs("hellaswag").docs[1]
    assert hs.requests[1] == ("Riding a bike: A boy puts on a helmet next to his bicycle. Then he",
                              " climbs on the bike and pedals down the street.")
