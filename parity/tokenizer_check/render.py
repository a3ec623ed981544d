"""The "Tokenizers" section of report.md (and of `parity tokenizers`' output) as markdown."""

from __future__ import annotations

import json

from parity.tokenizer_check.in_run import NONE, NOT_CHECKED, SAME_FILE

N_SHOWN = 3  # examples per (size, backend) in report.md; report.json keeps up to 5 per test
INTRO = ("Each backend's own tokenizer, loaded and used as its stack's users do (HF: `AutoTokenizer` and "
         "lm-eval's context/continuation split, BOS as the tokenizer adds it; Megatron: the tokenizer its "
         "args name), against the token ids every backend is scored on. A request differs when those users "
         "would feed the model other ids than the ones parity scores.")


def _cell(v) -> str:
    return " ".join(str(v).split()).replace("|", "\\|")


def _code(text: str) -> str:
    """Inline code that survives any text: escapes shown (json), backticks doubled around it."""
    s = json.dumps(text, ensure_ascii=False)
    return f"`` {s} ``" if "`" in s else f"`{s}`"


def _tests(names: list[str], counts: dict) -> str:
    if not names:
        return "-"
    shown = ", ".join(f"{t} ({counts[t]})" for t in names[:6])
    return shown + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def row(size: str, backend: str, d: dict, counts: dict) -> str:
    status = d.get("status")
    if status == NONE:
        what, n, bad = "carries no tokenizer", "-", "-"
    elif status == NOT_CHECKED:
        what, n, bad = f"not checked: {d.get('note')}", "-", "-"
    else:
        what = f"`{d.get('source')}` ({d.get('description')})"
        n, bad = d["n_requests"], f"{d['n_mismatches']}" + (" (same file)" if status == SAME_FILE else "")
    return (f"| {size} | {backend} | {_cell(what)} | {n} | {bad} | "
            f"{_cell(_tests(d.get('tests_with_mismatches') or [], counts))} |")


def example_lines(e: dict, other: str) -> list[str]:
    head = (f"- `{e['test']}` doc {e['doc_id']}, choice {e['choice']}: ids part in the {e['where']} at token "
            f"{e['position']}; continuation {_code(e['continuation'])}")
    if e.get("text") is not None:
        head += f"; text there {_code(e['text'])}"
    out = [head]
    for who, side in (("reference", e["reference"]), (other, e["other"])):
        pieces = " ".join(side["pieces"]) if side.get("pieces") else ""
        out.append(f"  - {who} (from token {e['start']}): `{side['ids']}` {_code(pieces) if pieces else ''}".rstrip())
    return out


def _pick(examples: list[dict], n: int) -> list[dict]:
    """The first example of each test first (one test's pattern should not hide another's)."""
    firsts: dict = {}
    for e in examples:
        firsts.setdefault(e["test"], e)
    chosen = list(firsts.values())[:n]
    return chosen + [e for e in examples if e not in chosen][:n - len(chosen)]


def section(tokenizers: dict, mismatches: dict, details: bool = True, heading: str = "## Tokenizers") -> str:
    """Markdown for report["tokenizers"] / report["tokenizer_mismatches"]; empty when nothing was checked."""
    if not tokenizers:
        return ""
    lines = [heading, "", INTRO, "", "| size | backend | tokenizer | requests | differ | tests with differences |",
             "| --- | --- | --- | ---: | ---: | --- |"]
    for size, per_backend in tokenizers.items():
        for backend, d in per_backend.items():
            lines.append(row(size, backend, d, (mismatches.get(size) or {}).get(backend) or {}))
    if details:
        for size, per_backend in tokenizers.items():
            for backend, d in per_backend.items():
                if d.get("examples"):
                    lines += ["", f"First requests that differ, {size} / {backend}:", ""]
                    for e in _pick(d["examples"], N_SHOWN):
                        lines += example_lines(e, backend)
    return "\n".join(lines) + "\n"
