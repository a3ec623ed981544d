"""The 80 default tests: ids, suites, report labels, MMLU groups, and where each one's data lives.

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
    kind: str  # loader: bigbench, copa, xcopa, boolq, hellaswag, piqa, winogrande, mmlu
    lm_task: str | None  # lm-eval task whose definition builds the prompts (None for BigBench)

    __test__ = False  # not a pytest class


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
    return TestSpec(f"bigbench_{task}", "bigbench", task, None, "bigbench", None)


def _xcopa(lang: str) -> TestSpec:
    # English COPA is lm-eval's super_glue "copa" task; the rest are lm-eval's xcopa_<lang>
    if lang == "en":
        return TestSpec("xcopa_en", "xcopa", "en", None, "copa", "copa")
    return TestSpec(f"xcopa_{lang}", "xcopa", lang, None, "xcopa", f"xcopa_{lang}")


def _mmlu(subject: str) -> TestSpec:
    return TestSpec(f"mmlu_{subject}", "mmlu", subject, mmlu_subject_groups()[subject], "mmlu",
                    f"mmlu_{subject}")


def _build_tests() -> dict[str, TestSpec]:
    specs = [_bigbench(t) for t in BIGBENCH_TASKS]
    specs += [_xcopa(lang) for lang in XCOPA_LANGS]
    specs += [TestSpec(t, "lm-eval", t, None, t, t) for t in LM_EVAL_TASKS]
    groups = mmlu_subject_groups()
    for g in MMLU_GROUP_ORDER:
        specs += [_mmlu(s) for s in sorted(s for s, sg in groups.items() if sg == g)]
    return {s.id: s for s in specs}


TESTS: dict[str, TestSpec] = _build_tests()  # the 80 default tests, in report order


def _extra_bigbench(data_dir) -> list[str]:
    from parity.tasks.docs import data_root  # local import: docs imports this module

    root = data_root(data_dir) / "bigbench"
    if not root.is_dir():
        return []
    return sorted(f"bigbench_{p.parent.name}" for p in root.glob("*/task.json"))


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
