"""Readers for the formats the datasets are published in; each returns validated raw records.

A record is the document as the reference tool reads it (for lm-eval tasks: the fields of the hub
dataset lm-eval's yaml names), tagged with its 0-based position in the source file, which becomes
the doc_id. A malformed line names file:line and stops (UserError), or with skip_bad is skipped and
counted; positions of the other documents do not move.

Every file reader has one signature, `Reader`: (file, test name, skip_bad) -> Raw, so that the table
of data kinds (registry.KINDS) can name a reader per file without knowing its format.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from parity.errors import UserError


@dataclass
class Raw:
    records: list[dict] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # doc_id per record
    n_bad: int = 0
    formats: dict[str, dict] | None = None  # BigBench: formatting keys per subtask ("" = the task itself)


Reader = Callable[[Path, str, bool], Raw]  # (file, test name: task / language / subject, skip_bad)


class _Collector:
    def __init__(self, skip_bad: bool):
        self.raw = Raw()
        self.skip_bad = skip_bad

    def add(self, doc_id: str, rec: dict) -> None:
        self.raw.records.append(rec)
        self.raw.ids.append(doc_id)

    def bad(self, where: str, why: str) -> None:
        if not self.skip_bad:
            raise UserError(f"{where}: {why}; fix the file or pass --skip-bad-docs to skip such documents")
        self.raw.n_bad += 1


def _lines(path: Path, col: _Collector) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for each non-blank line; undecodable lines are reported as bad."""
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path}: file is empty; expected documents (see the data-dir layout in README)")
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            col.bad(f"{path}:{n}", f"not UTF-8 ({e.reason} at byte {e.start})")
            continue
        if text.strip():
            yield n, text


def _need(rec: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")


def _label(value, n: int, what: str = "label") -> int:
    """An integer label in [0, n); bool and numeric strings are accepted (as the datasets store them)."""
    if isinstance(value, bool):
        value = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value < n:
        raise ValueError(f"{what} {value!r} is not one of 0..{n - 1}")
    return value


# ---- record validators: dict from the file -> record as lm-eval's hub dataset has it -------------

def copa_record(d: dict) -> dict:
    _need(d, ("premise", "choice1", "choice2", "question", "label"))
    if d["question"] not in ("cause", "effect"):
        raise ValueError(f"question {d['question']!r} is neither 'cause' nor 'effect'")
    return {k: d[k] for k in ("premise", "choice1", "choice2", "question")} | {
        "label": _label(d["label"], 2), "idx": d.get("idx", 0)}


def boolq_record(d: dict) -> dict:
    _need(d, ("question", "passage", "label"))
    lab = d["label"]
    if isinstance(lab, str) and lab.lower() in ("true", "false"):  # SuperGLUE stores true/false
        lab = lab.lower() == "true"
    # the hub's ClassLabel: 0 = False, 1 = True (lm-eval's choices are ["no", "yes"])
    return {"question": d["question"], "passage": d["passage"], "idx": d.get("idx", 0),
            "label": _label(lab, 2)}


def winogrande_record(d: dict) -> dict:
    _need(d, ("sentence", "option1", "option2", "answer"))
    if "_" not in d["sentence"]:
        raise ValueError("sentence has no '_' blank")
    if str(d["answer"]) not in ("1", "2"):
        raise ValueError(f"answer {d['answer']!r} is not '1' or '2'")
    return {"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"],
            "answer": str(d["answer"])}


def hellaswag_record(d: dict) -> dict:
    _need(d, ("activity_label", "ctx_a", "ctx_b", "endings", "label"))
    if not isinstance(d["endings"], list) or len(d["endings"]) < 2:
        raise ValueError("endings is not a list of choices")
    _label(d["label"], len(d["endings"]))
    # lm-eval's process_docs reads ctx_a, ctx_b, activity_label, endings, label (label as stored: str)
    return {"ind": d.get("ind", 0), "activity_label": d["activity_label"], "ctx_a": d["ctx_a"],
            "ctx_b": d["ctx_b"], "ctx": d.get("ctx", ""), "endings": list(d["endings"]),
            "label": str(d["label"])}


def piqa_record(d: dict) -> dict:
    _need(d, ("goal", "sol1", "sol2"))
    return {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"]}


# ---- file readers (each a Reader) ---------------------------------------------------------------

def read_copa(path: Path, name: str, skip_bad: bool) -> Raw:
    """COPA / XCOPA jsonl (SuperGLUE and cambridgeltl/xcopa releases share the fields)."""
    return read_jsonl(path, copa_record, skip_bad)


def read_boolq(path: Path, name: str, skip_bad: bool) -> Raw:
    return read_jsonl(path, boolq_record, skip_bad)


def read_winogrande(path: Path, name: str, skip_bad: bool) -> Raw:
    return read_jsonl(path, winogrande_record, skip_bad)


def read_hellaswag_jsonl(path: Path, name: str, skip_bad: bool) -> Raw:
    """HellaSwag's original jsonl (what lm-eval reads)."""
    return read_jsonl(path, hellaswag_record, skip_bad)


def read_jsonl(path: Path, make: Callable[[dict], dict], skip_bad: bool) -> Raw:
    """One JSON object per line, each validated and reshaped by make."""
    col = _Collector(skip_bad)
    pos = -1
    for n, text in _lines(path, col):
        pos += 1
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ValueError("line is not a JSON object")
            col.add(str(pos), make(d))
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            col.bad(f"{path}:{n}", f"malformed document ({e})")
    return col.raw


def read_piqa(path: Path, name: str, skip_bad: bool) -> Raw:
    """PIQA's release: goal/sol1/sol2 in <split>.jsonl, the label of line i on line i of the
    <split>-labels.lst beside it (valid.jsonl + valid-labels.lst)."""
    labels = path.with_name(f"{path.stem}-labels.lst")
    if not labels.is_file():
        raise UserError(f"{labels}: PIQA labels file not found (it belongs beside {path.name})")
    col = _Collector(skip_bad)
    label_lines = list(_lines(labels, col))
    docs = list(_lines(path, col))
    if len(label_lines) != len(docs):
        raise UserError(f"{labels}: {len(label_lines)} labels for {len(docs)} documents in {path}; "
                        "the two files must have one line per document")
    for pos, ((n, text), (ln, lab)) in enumerate(zip(docs, label_lines)):
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ValueError("line is not a JSON object")
            rec = piqa_record(d)
        except (json.JSONDecodeError, ValueError) as e:
            col.bad(f"{path}:{n}", f"malformed document ({e})")
            continue
        try:
            rec["label"] = _label(lab.strip(), 2)
        except ValueError as e:
            col.bad(f"{labels}:{ln}", str(e))
            continue
        col.add(str(pos), rec)
    return col.raw


def read_mmlu_csv(path: Path, subject: str, skip_bad: bool) -> Raw:
    """Hendrycks' headerless CSV (question, A, B, C, D, answer letter) -> cais/mmlu records."""
    col = _Collector(skip_bad)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 ({e.reason}); re-save the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: file is empty; expected MMLU rows question,A,B,C,D,answer")
    reader = csv.reader(io.StringIO(text, newline=""))
    pos = -1
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            col.bad(f"{path}:{line}", f"malformed CSV row ({e})")
            continue
        if not row:
            continue
        pos += 1
        if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
            why = (f"{len(row)} columns, expected 6 (question, A, B, C, D, answer)" if len(row) != 6
                   else f"answer {row[5]!r} is not one of A, B, C, D")
            col.bad(f"{path}:{line}", f"malformed row ({why})")
            continue
        col.add(str(pos), {"question": row[0], "subject": subject, "choices": row[1:5],
                           "answer": "ABCD".index(row[5].strip())})
    return col.raw


def read_hellaswag_txt(path: Path, name: str, skip_bad: bool) -> Raw:
    """llama.cpp's hellaswag_val_full.txt: 6 lines per item: context, gold index, 4 endings.

    The context there is already "<activity label>: <ctx>" and ctx_b was not capitalised, so the
    prompt cannot be lm-eval's byte for byte; records carry the text as given (see prompts).
    """
    col = _Collector(skip_bad)
    lines = list(_lines_all(path, col))
    if len(lines) % 6:
        raise UserError(f"{path}: {len(lines)} lines is not a multiple of 6 "
                        "(context, gold, 4 endings per item); the file is truncated or not llama.cpp's format")
    for pos in range(len(lines) // 6):
        block = lines[pos * 6: pos * 6 + 6]
        n = pos * 6 + 2
        if any(t is None for t in block):
            col.bad(f"{path}:{pos * 6 + 1}", "item has a line that is not UTF-8")
            continue
        try:
            gold = _label(block[1].strip(), 4, "gold index")
        except ValueError as e:
            col.bad(f"{path}:{n}", str(e))
            continue
        col.add(str(pos), {"query_text": block[0], "endings": block[2:6], "label": gold})
    return col.raw


def _lines_all(path: Path, col: _Collector) -> Iterator[str | None]:
    """Every line (blank ones too, the format is positional); None for an undecodable one."""
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path}: file is empty; expected documents (see the data-dir layout in README)")
    for raw in data.splitlines():
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            yield None


def read_bigbench(path: Path, name: str, skip_bad: bool) -> Raw:
    """A BigBench json task (path: its task.json): its examples (doc_id = position) or, when the task's
    directory has <sub>/task.json subtasks, every subtask's (doc_id = "<subtask>/<position>").
    Raw.formats holds the formatting keys (prefixes, ...) per subtask."""
    col = _Collector(skip_bad)
    subdirs = sorted(p.parent for p in path.parent.glob("*/task.json"))
    tasks = [(p.name, p / "task.json") for p in subdirs] or [("", path)]
    col.raw.formats = {}
    for sub, file in tasks:
        task = _read_task_json(file)
        col.raw.formats[sub] = {k: v for k, v in task.items() if k != "examples"}
        for pos, ex in enumerate(task["examples"]):
            doc_id = f"{sub}/{pos}" if sub else str(pos)
            try:
                col.add(doc_id, bigbench_record(ex) | {"subtask": sub})
            except ValueError as e:
                col.bad(f"{file}: example {pos}", str(e))
    return col.raw


def _read_task_json(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"{path}: file is empty; expected a BigBench task.json")
    try:
        task = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list) or not task["examples"]:
        raise UserError(f"{path}: no 'examples' list; not a BigBench json task")
    return task


def bigbench_record(ex) -> dict:
    if not isinstance(ex, dict) or "input" not in ex:
        raise ValueError("example has no 'input'")
    ts = ex.get("target_scores")
    if not isinstance(ts, dict) or len(ts) < 2:
        raise ValueError("example has no 'target_scores' with at least two choices (not multiple choice)")
    try:
        scores = {str(k): float(v) for k, v in ts.items()}
    except (TypeError, ValueError):
        raise ValueError("target_scores values are not numbers") from None
    if max(scores.values()) <= 0:
        raise ValueError("no choice has a positive target score (no correct choice)")
    return {"input": str(ex["input"]), "target_scores": scores}
