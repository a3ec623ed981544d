"""BigBench json-task prompts, zero-shot, as BIG-bench's JsonTask formats them (docs/architecture.md,
"Prompts and tokenization").

prompt = task_prefix + example_input_prefix + input [+ choice_prefix + choice_prefix.join(choices in a
permuted order)] + example_output_prefix; the permutation is RandomState(42).permutation(sorted(keys)),
a fresh RandomState per example. The scored continuations are the target_scores keys in their order
in the file, each as written; the grade of a document is the target score of the chosen key.
"""

from __future__ import annotations

import numpy as np

# BIG-bench's defaults for keys a task.json may leave out
DEFAULTS = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
}


def prompt(record: dict, fmt: dict) -> str:
    f = {k: fmt.get(k, v) for k, v in DEFAULTS.items()}
    text = record["input"]
    if f["append_choices_to_input"]:
        rng = np.random.RandomState(42)
        permuted = rng.permutation(sorted(record["target_scores"]))
        text = text + f["choice_prefix"] + f["choice_prefix"].join(str(c) for c in permuted)
    return str(f["task_prefix"]) + f["example_input_prefix"] + text + f["example_output_prefix"]


def requests(record: dict, fmt: dict) -> tuple[list[tuple[str, str]], list[int], list[float]]:
    """(context, continuation) per choice, gold indices (the best-scored choices), target scores."""
    ctx = prompt(record, fmt)
    choices = list(record["target_scores"])
    scores = [record["target_scores"][c] for c in choices]
    best = max(scores)
    return [(ctx, c) for c in choices], [i for i, s in enumerate(scores) if s == best], scores
