"""Documents of a test: read from the data dir (or the bundled samples) and turned into prompts.

Data-dir layout (the one of the published datasets; `parity tasks` shows what was found):

    bigbench/<task>/task.json                 BigBench json task (subtasks: <task>/<sub>/task.json)
    copa/val.jsonl                            English COPA, SuperGLUE release (xcopa_en)
    xcopa/<lang>/test.<lang>.jsonl            XCOPA test split
    boolq/val.jsonl                           BoolQ, SuperGLUE release
    hellaswag/hellaswag_val.jsonl             HellaSwag original (what lm-eval reads), else
    hellaswag/hellaswag_val_full.txt            llama.cpp's text format (6 lines per item)
    piqa/valid.jsonl + piqa/valid-labels.lst  PIQA validation
    winogrande/dev.jsonl                      WinoGrande 1.1 dev
    mmlu/test/<subject>_test.csv              MMLU (Hendrycks), headerless CSV

With no data dir the bundled samples (parity/tasks/samples/, same layout, written for this project,
a few documents per test) are read by the same code and every output says source "samples".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from parity.errors import UserError
from parity.tasks import formats
from parity.tasks.registry import TestSpec, get_spec

SAMPLES_DIR = Path(__file__).parent / "samples"
SAMPLES = "samples"


@dataclass
class Doc:
    doc_id: str  # 0-based position in its source file; BigBench subtasks "<subtask>/<position>"
    requests: list[tuple[str, str]]  # (context, continuation), one per choice
    gold: int | list[int]  # index of the correct choice (a list when several are correct)
    scores: list[float] | None = None  # BigBench target_scores per choice (the grade of a choice)


@dataclass
class Loaded:
    docs: list[Doc]
    source: str  # "samples", the file read, or "no data: <expected path>"
    n_bad: int = 0  # malformed documents skipped (--skip-bad-docs)


def data_root(data_dir=None) -> Path:
    return SAMPLES_DIR if data_dir is None else Path(data_dir)


def data_files(spec: TestSpec, data_dir=None) -> list[Path]:
    """The file(s) a test reads, first existing alternative first (for the 'no data' message: all)."""
    root = data_root(data_dir)
    kind, name = spec.kind, spec.name
    table = {
        "bigbench": [root / "bigbench" / name / "task.json"],
        "copa": [root / "copa" / "val.jsonl"],
        "xcopa": [root / "xcopa" / name / f"test.{name}.jsonl"],
        "boolq": [root / "boolq" / "val.jsonl"],
        "hellaswag": [root / "hellaswag" / "hellaswag_val.jsonl", root / "hellaswag" / "hellaswag_val_full.txt"],
        "piqa": [root / "piqa" / "valid.jsonl"],
        "winogrande": [root / "winogrande" / "dev.jsonl"],
        "mmlu": [root / "mmlu" / "test" / f"{name}_test.csv"],
    }
    return table[kind]


def _source(path: Path, data_dir) -> str:
    return SAMPLES if data_dir is None else str(path)


def read_raw(test_id: str, data_dir=None, *, skip_bad: bool = False):
    """(Raw records, source, formats-or-None, path) without building prompts (cheap: no lm-eval)."""
    spec = get_spec(test_id)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"{data_dir}: data directory not found")
    candidates = data_files(spec, data_dir)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None, "no data: " + " or ".join(str(p) for p in candidates), None, None
    fmts = None
    if spec.kind == "bigbench":
        raw, fmts = formats.read_bigbench(path.parent, skip_bad)
    elif spec.kind == "piqa":
        raw = formats.read_piqa(path, path.parent / "valid-labels.lst", skip_bad)
    elif spec.kind == "mmlu":
        raw = formats.read_mmlu_csv(path, spec.name, skip_bad)
    elif spec.kind == "hellaswag" and path.suffix == ".txt":
        raw = formats.read_hellaswag_txt(path, skip_bad)
    else:
        make = {"copa": formats.copa_record, "xcopa": formats.copa_record, "boolq": formats.boolq_record,
                "hellaswag": formats.hellaswag_record, "winogrande": formats.winogrande_record}[spec.kind]
        raw = formats.read_jsonl(path, make, skip_bad)
    return raw, _source(path, data_dir), fmts, path


def count_docs(test_id: str, data_dir=None, *, skip_bad: bool = False) -> tuple[str, int, int]:
    """(source, n_docs, n_bad) as `parity tasks` shows them."""
    raw, source, _, _ = read_raw(test_id, data_dir, skip_bad=skip_bad)
    return (source, 0, 0) if raw is None else (source, len(raw.records), raw.n_bad)


def load_docs(test_id: str, data_dir=None, *, limit: int | None = None, skip_bad: bool = False,
              online: bool = False) -> Loaded:
    """Documents of one test with their prompts. data_dir None -> the bundled samples.

    online=True: lm-eval tasks read their hub datasets through lm-eval/datasets (needs internet;
    BigBench has no such path and still reads data_dir).
    """
    spec = get_spec(test_id)
    if online and spec.lm_task is not None:
        return _load_online(spec, limit)
    raw, source, fmts, path = read_raw(test_id, data_dir, skip_bad=skip_bad)
    if raw is None:
        return Loaded([], source, 0)
    if not raw.records:
        raise UserError(f"{path}: no valid documents (all {raw.n_bad} were malformed)")
    records, ids = raw.records[:limit], raw.ids[:limit]
    if spec.kind == "bigbench":
        from parity.tasks import bigbench

        docs = []
        for doc_id, rec in zip(ids, records):
            reqs, gold, scores = bigbench.requests(rec, fmts[rec["subtask"]])
            docs.append(Doc(doc_id, reqs, gold, scores))
        return Loaded(docs, source, raw.n_bad)
    return Loaded(_lm_eval_docs(spec, records, ids, path, skip_bad), source, raw.n_bad)


def _lm_eval_docs(spec: TestSpec, records: list[dict], ids: list[str], path: Path, skip_bad: bool) -> list[Doc]:
    from parity.tasks import lmeval

    process = lmeval.hellaswag_txt_process_docs if "query_text" in records[0] else None
    task = lmeval.build_task(spec.lm_task, records, process)
    docs = []
    eval_docs = list(task.task_docs)  # computed once in __init__ (eval_docs re-runs process_docs)
    assert len(eval_docs) == len(ids), "lm-eval's process_docs must keep one document per record"
    for doc_id, doc in zip(ids, eval_docs):
        try:
            reqs, gold = lmeval.doc_requests(task, doc)
        except (ValueError, KeyError, IndexError) as e:
            raise UserError(f"{path}: document {doc_id}: {e}") from None
        docs.append(Doc(doc_id, reqs, gold))
    return docs


def _load_online(spec: TestSpec, limit: int | None) -> Loaded:
    from parity.tasks import lmeval

    try:
        task = lmeval.build_task(spec.lm_task, None)
    except Exception as e:  # network / hub errors come in many types
        raise UserError(f"{spec.id}: could not fetch lm-eval's dataset for {spec.lm_task} "
                        f"({type(e).__name__}: {str(e)[:200]}); use --data-dir offline") from None
    docs = []
    for pos, doc in enumerate(task.task_docs):
        if limit is not None and pos >= limit:
            break
        reqs, gold = lmeval.doc_requests(task, doc)
        docs.append(Doc(str(pos), reqs, gold))
    return Loaded(docs, f"online: {task.config.dataset_path}", 0)
