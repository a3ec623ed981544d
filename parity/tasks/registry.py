"""The 80 default tests: ids, suites, report labels, MMLU groups, and the kinds of task data (KINDS:
where a test's file lives under the data root, which reader reads it, which lm-eval task prompts it).

Test ids (file names, command line): bigbench_<task>, xcopa_<lang>, boolq, hellaswag, piqa, winogrande,
mmlu_<subject>. Suite ids: bigbench, xcopa, lm-eval, mmlu. Extra ids that are not in the default 80 are
accepted too: any BigBench json task in the data dir, the other XCOPA language (ta), any MMLU subject.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from parity.errors import UserError
from parity.tasks import formats

SAMPLES_DIR = Path(__file__).parent / "samples"  # the bundled samples: a data root like any --data-dir


def data_root(data_dir=None) -> Path:
    """The directory data files are looked up in: --data-dir, or the bundled samples without one."""
    return SAMPLES_DIR if data_dir is None else Path(data_dir)


@dataclass(frozen=True)
class DataFile:
    path: str  # relative to the data root; {name} is the test's name (task, language, subject)
    read: formats.Reader  # (file, test name, skip_bad) -> validated records


@dataclass(frozen=True)
class DataKind:
    files: tuple[DataFile, ...]  # alternatives, preferred first: the first one that exists is read
    lm_task: str | None  # lm-eval task that builds the prompts ({name} filled in); None: BIG-bench's own
    lm_yaml: str | None  # that task's yaml inside lm_eval/tasks ({name} filled in)


def _one(path: str, read: formats.Reader) -> tuple[DataFile]:
    return (DataFile(path, read),)


# The kinds of task data, in the layout of the published datasets (`parity tasks` shows what was
# found). A test's kind picks its row; docs.py and lmeval.py read files, pick readers and find yamls
# only through it. A new family of tests (another language set, say) is a row here (with a reader in
# formats.py if its format is new) plus a builder of its TestSpecs below.
KINDS: dict[str, DataKind] = {
    # BIG-bench json task; subtasks, when there are any, in bigbench/<task>/<sub>/task.json
    "bigbench": DataKind(_one("bigbench/{name}/task.json", formats.read_bigbench), None, None),
    # English COPA, SuperGLUE release (xcopa_en)
    "copa": DataKind(_one("copa/val.jsonl", formats.read_copa), "copa", "super_glue/copa/default.yaml"),
    # XCOPA test split
    "xcopa": DataKind(_one("xcopa/{name}/test.{name}.jsonl", formats.read_copa), "xcopa_{name}",
                      "xcopa/default_{name}.yaml"),
    # BoolQ, SuperGLUE release
    "boolq": DataKind(_one("boolq/val.jsonl", formats.read_boolq), "boolq", "super_glue/boolq/default.yaml"),
    # HellaSwag's original jsonl (what lm-eval reads), else llama.cpp's text format (6 lines per item)
    "hellaswag": DataKind((DataFile("hellaswag/hellaswag_val.jsonl", formats.read_hellaswag_jsonl),
                           DataFile("hellaswag/hellaswag_val_full.txt", formats.read_hellaswag_txt)),
                          "hellaswag", "hellaswag/hellaswag.yaml"),
    # PIQA validation; its labels are read from piqa/valid-labels.lst beside it
    "piqa": DataKind(_one("piqa/valid.jsonl", formats.read_piqa), "piqa", "piqa/piqa.yaml"),
    # WinoGrande 1.1 dev
    "winogrande": DataKind(_one("winogrande/dev.jsonl", formats.read_winogrande), "winogrande",
                           "winogrande/default.yaml"),
    # MMLU (Hendrycks' release), headerless CSV
    "mmlu": DataKind(_one("mmlu/test/{name}_test.csv", formats.read_mmlu_csv), "mmlu_{name}",
                     "mmlu/default/mmlu_{name}.yaml"),
}

# suite id -> title used in the report, in report order
SUITES: dict[str, str] = {
    "bigbench": "BigBench",
    "xcopa": "Multilingual (XCOPA)",
    "lm-eval": "LM Evaluation Harness",
    "mmlu": "MMLU",
}

BIGBENCH_TASKS = (
    "date_understanding", "general_knowledge", "human_organs_senses", "intent_recognition",
    "riddle_sense", "similarities_abstraction", "simple_arithmetic_json_multiple_choice",
    "undo_permutation",
)
# en is English COPA (SuperGLUE); the others are XCOPA's test split
XCOPA_LANGS = ("en", "et", "ht", "id", "it", "qu", "sw", "th", "tr", "vi", "zh")
# XCOPA languages lm-eval knows that are not in the default 80
XCOPA_EXTRA_LANGS = ("ta",)
LM_EVAL_TASKS = ("boolq", "hellaswag", "piqa", "winogrande")
# report order of the MMLU supercategories (Hendrycks' grouping, not lm-eval's)
MMLU_GROUP_ORDER = ("STEM", "humanities", "other (business, health, misc.)", "social sciences")


@dataclass(frozen=True)
class TestSpec:
    id: str  # bigbench_date_understanding, xcopa_en, boolq, mmlu_anatomy ...
    suite: str  # key of SUITES
    name: str  # row label in the report: date_understanding, en, boolq, anatomy
    group: str | None  # MMLU supercategory; None elsewhere
    kind: str  # key of KINDS: where the data lives, how it is read and prompted

    __test__ = False  # not a pytest class

    @property
    def lm_task(self) -> str | None:
        """lm-eval task whose definition builds the prompts (None for BigBench)."""
        task = KINDS[self.kind].lm_task
        return None if task is None else task.format(name=self.name)


@lru_cache(maxsize=1)
def mmlu_categories() -> dict:
    """Hendrycks' subject -> subcategory -> supercategory map (copied from the MMLU release)."""
    return json.loads((Path(__file__).parent / "mmlu_categories.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def mmlu_subject_groups() -> dict[str, str]:
    cats = mmlu_categories()
    sub_to_group = {sub: group for group, subs in cats["categories"].items() for sub in subs}
    return {subject: sub_to_group[sub] for subject, sub in cats["subcategories"].items()}


def _mmlu_groups() -> dict[str, int]:
    counts = {g: 0 for g in MMLU_GROUP_ORDER}
    for g in mmlu_subject_groups().values():
        counts[g] += 1
    return counts


MMLU_GROUPS: dict[str, int] = _mmlu_groups()  # group -> number of subjects (18/13/14/12)


def _bigbench(task: str) -> TestSpec:
    return TestSpec(f"bigbench_{task}", "bigbench", task, None, "bigbench")


def _xcopa(lang: str) -> TestSpec:
    # English COPA is lm-eval's super_glue "copa" task; the rest are lm-eval's xcopa_<lang>
    return TestSpec(f"xcopa_{lang}", "xcopa", lang, None, "copa" if lang == "en" else "xcopa")


def _mmlu(subject: str) -> TestSpec:
    return TestSpec(f"mmlu_{subject}", "mmlu", subject, mmlu_subject_groups()[subject], "mmlu")


def _build_tests() -> dict[str, TestSpec]:
    specs = [_bigbench(t) for t in BIGBENCH_TASKS]
    specs += [_xcopa(lang) for lang in XCOPA_LANGS]
    specs += [TestSpec(t, "lm-eval", t, None, t) for t in LM_EVAL_TASKS]
    groups = mmlu_subject_groups()
    for g in MMLU_GROUP_ORDER:
        specs += [_mmlu(s) for s in sorted(s for s, sg in groups.items() if sg == g)]
    return {s.id: s for s in specs}


TESTS: dict[str, TestSpec] = _build_tests()  # the 80 default tests, in report order


def _extra_bigbench(data_dir) -> list[str]:
    """Every BigBench json task in the data dir: its row's file with any task name."""
    (task_json,) = KINDS["bigbench"].files
    found = data_root(data_dir).glob(task_json.path.format(name="*"))
    return sorted(f"bigbench_{p.parent.name}" for p in found)  # {name} is the task's directory


def known_ids(data_dir=None) -> list[str]:
    extra = [f"xcopa_{lang}" for lang in XCOPA_EXTRA_LANGS] + _extra_bigbench(data_dir)
    return list(TESTS) + [t for t in extra if t not in TESTS]


def get_spec(test_id: str) -> TestSpec:
    """Spec of a default or extra test id (extra BigBench ids are not checked against a data dir here)."""
    if test_id in TESTS:
        return TESTS[test_id]
    if test_id.startswith("xcopa_") and test_id[6:] in XCOPA_EXTRA_LANGS:
        return _xcopa(test_id[6:])
    if test_id.startswith("bigbench_") and len(test_id) > 9:
        return _bigbench(test_id[9:])
    if test_id.startswith("mmlu_") and test_id[5:] in mmlu_subject_groups():
        return _mmlu(test_id[5:])
    raise UserError(f"unknown test {test_id!r}{_close(test_id, list(TESTS) + list(SUITES))}; "
                    "`parity tasks` lists the tests")


def _close(name: str, candidates: list[str]) -> str:
    m = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    return f" (did you mean: {', '.join(m)}?)" if m else ""


def resolve_tests(tests: list[str] | None = None, suites: list[str] | None = None,
                  data_dir=None) -> list[str]:
    """Test ids selected by test ids and/or suite ids (suite ids are accepted in `tests` too).

    Nothing given -> the 80 default tests. Order: report order, extras after the defaults.
    """
    if not tests and not suites:
        return list(TESTS)
    known = known_ids(data_dir)
    wanted: set[str] = set()
    for s in suites or []:
        if s not in SUITES:
            raise UserError(f"unknown suite {s!r}{_close(s, list(SUITES))}; suites: {', '.join(SUITES)}")
        wanted.update(t for t, spec in TESTS.items() if spec.suite == s)
    for t in tests or []:
        t = t.strip()
        if t in SUITES:
            wanted.update(i for i, spec in TESTS.items() if spec.suite == t)
        elif t in known:
            wanted.add(t)
        else:
            raise UserError(f"unknown test {t!r}{_close(t, known + list(SUITES))}; "
                            "`parity tasks` lists the tests")
    return [t for t in known if t in wanted]
