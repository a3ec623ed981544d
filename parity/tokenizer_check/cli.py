"""`parity tokenizers --reference TOKENIZER --other X`: the run's tokenizer check without scoring.

X is an HF directory (or a hub model id already in the local HF cache), a Megatron checkpoint, or a
single tokenizer file (sentencepiece / tiktoken). The reference ids are built as `parity run` builds
them. Exit 0 when no test has more differing requests than --max-tokenizer-mismatches, 1 otherwise,
2 for a tokenizer that does not load.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from parity.errors import CheckFailed, UserError
from parity.io import write_json
from parity.tokenizer_check.carried import Carried, carried, load_carried
from parity.tokenizer_check.encoders import encode_pairs, kind_of_file, load


def other_tokenizer(spec: str) -> Carried:
    """What --other names: a checkpoint directory of a known format, a tokenizer-only HF directory, a
    tokenizer file, or a hub model id (AutoTokenizer, local files only)."""
    from parity.checkpoints import MARKERS, detect_format
    from parity.tokenizer_check.carried import HF_FILES

    p = Path(spec).expanduser()
    if p.is_file():
        return Carried(kind_of_file(p), p, p, [p])
    if p.is_dir():
        if any((p / m).is_file() for m in MARKERS.values()):
            c = carried(detect_format(p), p)
            if c is None:
                raise UserError(f"{p}: the checkpoint carries no tokenizer (no tokenizer files, no tokenizer "
                                f"in its args)")
            return c
        files = [p / f for f in HF_FILES if (p / f).is_file()]
        if not files:
            raise UserError(f"{p}: no tokenizer files ({', '.join(HF_FILES)}) in the directory")
        return Carried("hf", p, files[0], files)
    if "/" in spec and not spec.startswith((".", "/", "~")):
        return Carried("hf", Path(spec), Path(spec), [])
    raise UserError(f"{spec}: --other is neither a file, a directory nor a hub model id")


def reference_requests(docs, ref: Path):
    """The reference ids exactly as `parity run` scores them (sentencepiece: parity.tasks.tokenize);
    other kinds through their row in encoders.KINDS until the run tokenizes them itself."""
    if kind_of_file(ref) == "sentencepiece":
        from parity.tasks.tokenize import build_requests

        return build_requests(docs, ref)
    enc = load(kind_of_file(ref), ref)
    return [encode_pairs(enc, d.requests) for d in docs]


class _TestData:
    def __init__(self, docs, requests):
        self.docs, self.requests = docs, requests


def cli_tokenizers(args) -> int:
    from parity.tasks.docs import load_docs
    from parity.tasks.registry import resolve_tests
    from parity.tokenizer_check.compare import compare_tests
    from parity.tokenizer_check.in_run import CHECKED, failures
    from parity.tokenizer_check.render import section

    ref = Path(args.reference).expanduser()
    if not ref.is_file():
        raise UserError(f"{ref}: reference tokenizer file not found; pass Meta's tokenizer.model")
    ref_enc = load(kind_of_file(ref), ref)
    other = other_tokenizer(args.other)
    enc = load_carried(other)
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None  # noqa: E731
    tests = resolve_tests(split(args.tests), split(args.suites), data_dir=args.data_dir)
    t0 = time.perf_counter()
    data = {}
    for t in tests:
        docs = load_docs(t, args.data_dir, limit=args.limit, skip_bad=args.skip_bad_docs).docs
        data[t] = _TestData(docs, reference_requests(docs, ref))
    t_ref = time.perf_counter() - t0
    per_test = compare_tests(enc, data, ref_enc)
    seconds = time.perf_counter() - t0
    name = "other"
    details = {"status": CHECKED, "kind": other.kind, "source": str(other.named), "description": enc.description,
               "n_requests": sum(v["n_requests"] for v in per_test.values()),
               "n_mismatches": sum(v["n_mismatches"] for v in per_test.values()),
               "tests_with_mismatches": [t for t, v in per_test.items() if v["n_mismatches"]],
               "examples": [{"test": t, **e} for t, v in per_test.items() for e in v["examples"]]}
    counts = {"-": {name: {t: v["n_mismatches"] for t, v in per_test.items()}}}
    result = {"reference": str(ref), "other": details, "tokenizer_mismatches": counts["-"][name],
              "seconds": {"documents_and_reference": round(t_ref, 3), "total": round(seconds, 3)}}
    if args.json:
        write_json(args.json, result)
    print(section({"-": {name: details}}, counts, details=True,
                  heading=f"## Tokenizers: {ref} vs {other.named}"), end="")
    print(f"\n{len(per_test)} tests, {details['n_requests']} requests, {details['n_mismatches']} differ "
          f"({seconds:.1f}s, of which {t_ref:.1f}s documents and reference ids)", file=sys.stderr)
    bad = failures({"tokenizer_mismatches": counts}, args.max_tokenizer_mismatches)
    if bad:
        names = ", ".join(f"{b['test']} ({b['value']})" for b in bad[:8])
        raise CheckFailed(f"{len(bad)} test(s) with more than {args.max_tokenizer_mismatches} differing "
                          f"requests: {names}{' and more' if len(bad) > 8 else ''}")
    return 0
