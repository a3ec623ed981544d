"""Prompts for the lm-eval tasks, built by lm-eval itself.

Each test is lm-eval's own task definition (its yaml, loaded with lm-eval's loader so `!function`
hooks like winogrande's partial evaluation, copa/xcopa connectors and hellaswag's process_docs stay
lm-eval's code), instantiated as a real lm-eval ConfigurableTask. Offline, the task's dataset is the
records our readers produced (custom_dataset); with online=True lm-eval downloads its hub dataset as
usual. Contexts and continuations are what task.fewshot_context(doc, 0) and task.construct_requests
give (zero-shot), gold as lm-eval's process_results derives it.

Importing lm_eval.api.task costs ~1-2 s (it imports `datasets`), so this module is only imported when
prompts are needed, never by `parity tasks`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from parity.errors import UserError
from parity.tasks.registry import KINDS, TestSpec


def task_yaml(spec: TestSpec) -> Path:
    """The installed lm-eval's yaml of the test's task (its kind's lm_yaml in registry.KINDS)."""
    import lm_eval

    rel = KINDS[spec.kind].lm_yaml
    if rel is None:
        raise KeyError(f"{spec.id} has no lm-eval task")
    return Path(lm_eval.__file__).parent / "tasks" / rel.format(name=spec.name)


def task_config(spec: TestSpec) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    path = task_yaml(spec)
    if not path.is_file():
        raise UserError(f"{path}: lm-eval has no task {spec.lm_task!r} in this version (lm-eval==0.4.13 expected)")
    cfg = load_yaml(path)
    cfg.pop("tag", None)  # tags/groups are registry concepts; a standalone task needs none
    return cfg


def build_task(spec: TestSpec, records: list[dict] | None, process_docs=None):
    """A real lm-eval ConfigurableTask of the test's task; records=None -> its hub dataset (online)."""
    from lm_eval.api.task import ConfigurableTask

    cfg = task_config(spec)
    import datasets

    datasets.disable_progress_bars()  # map() bars would flood the run's output
    if records is not None:

        split = cfg.get("test_split") or cfg.get("validation_split")
        # only the evaluated split exists offline; zero-shot never reads a few-shot split
        cfg.update(training_split=None, fewshot_split=None, fewshot_config=None, dataset_kwargs=None)
        if cfg.get("test_split"):
            cfg["validation_split"] = None
        cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({split: datasets.Dataset.from_list(records)})
        if process_docs is not None:
            cfg["process_docs"] = process_docs
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)  # lm-eval warns about custom_dataset kwargs on every task
    try:
        return ConfigurableTask(config=cfg)
    finally:
        log.setLevel(level)


def doc_requests(task, doc) -> tuple[list[tuple[str, str]], int | list[int]]:
    """lm-eval's zero-shot (context, continuation) pairs of one document and its gold index."""
    ctx = task.fewshot_context(doc, 0)
    args = [tuple(inst.arguments) for inst in task.construct_requests(doc, ctx)]
    choices = task.doc_to_choice(doc)
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):  # as in lm-eval's process_results
        gold = choices.index(gold) if gold in choices else -1
    if isinstance(gold, bool):
        gold = int(gold)
    golds = gold if isinstance(gold, list) else [gold]
    if any(not isinstance(g, int) or not 0 <= g < len(args) for g in golds):
        raise ValueError(f"gold {gold!r} is out of range for {len(args)} choices")
    return args, gold


def hellaswag_txt_process_docs(dataset):
    """llama.cpp's text format -> the fields lm-eval's hellaswag yaml reads (query, choices, gold).

    Uses lm-eval's own `preprocess`; the activity label is already in the text and ctx_b was not
    capitalised there, so prompts can differ from the jsonl route on some items (documented).
    """
    from lm_eval.tasks.hellaswag.utils import preprocess

    return dataset.map(lambda d: {"query": preprocess(d["query_text"]),
                                  "choices": [preprocess(e) for e in d["endings"]],
                                  "gold": int(d["label"])})
