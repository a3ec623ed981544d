"""Documents of a test: read from the data dir (or the bundled samples) and turned into prompts.

The data-dir layout (the one of the published datasets), the reader of each file and the lm-eval task
of each kind of test are one table, registry.KINDS, which this module follows. With no data dir the
bundled samples (parity/tasks/samples/, same layout, written for this project, a few documents per
test) are read by the same code and every output says source "samples".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from parity.errors import UserError
from parity.tasks.registry import KINDS, TestSpec, data_root, get_spec

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


def data_files(spec: TestSpec, data_dir=None) -> list[Path]:
    """The file alternatives a test reads, preferred first (for the 'no data' message: all)."""
    root = data_root(data_dir)
    return [root / f.path.format(name=spec.name) for f in KINDS[spec.kind].files]


def _source(path: Path, data_dir) -> str:
    return SAMPLES if data_dir is None else str(path)


def read_raw(test_id: str, data_dir=None, *, skip_bad: bool = False):
    """(Raw records, source, path) without building prompts (cheap: no lm-eval); (None, 'no data: ...',
    None) when no alternative exists."""
    spec = get_spec(test_id)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"{data_dir}: data directory not found")
    candidates = data_files(spec, data_dir)
    found = next(((p, f) for p, f in zip(candidates, KINDS[spec.kind].files) if p.is_file()), None)
    if found is None:
        return None, "no data: " + " or ".join(str(p) for p in candidates), None
    path, file = found
    return file.read(path, spec.name, skip_bad), _source(path, data_dir), path


def count_docs(test_id: str, data_dir=None, *, skip_bad: bool = False) -> tuple[str, int, int]:
    """(source, n_docs, n_bad) as `parity tasks` shows them."""
    raw, source, _ = read_raw(test_id, data_dir, skip_bad=skip_bad)
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
    raw, source, path = read_raw(test_id, data_dir, skip_bad=skip_bad)
    if raw is None:
        return Loaded([], source, 0)
    if not raw.records:
        raise UserError(f"{path}: no valid documents (all {raw.n_bad} were malformed)")
    records, ids = raw.records[:limit], raw.ids[:limit]
    if spec.lm_task is None:  # BigBench: BIG-bench's own prompts
        from parity.tasks import bigbench

        docs = []
        for doc_id, rec in zip(ids, records):
            reqs, gold, scores = bigbench.requests(rec, raw.formats[rec["subtask"]])
            docs.append(Doc(doc_id, reqs, gold, scores))
        return Loaded(docs, source, raw.n_bad)
    return Loaded(_lm_eval_docs(spec, records, ids, path, skip_bad), source, raw.n_bad)


def _lm_eval_docs(spec: TestSpec, records: list[dict], ids: list[str], path: Path, skip_bad: bool) -> list[Doc]:
    from parity.tasks import lmeval

    process = lmeval.hellaswag_txt_process_docs if "query_text" in records[0] else None
    task = lmeval.build_task(spec, records, process)
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
        task = lmeval.build_task(spec, None)
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
