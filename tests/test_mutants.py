"""A converter regression fails the suite wherever it runs (issue 17).

Each mutant of tests/mutants.py is a consistent mistake in a converter's source: its round trip stays
bit-exact (so no round-trip test can see it), and the fresh-conversion check of tests/test_convert.py
(`test_fresh_conversion_computes_meta_logits`, through tests/conversion_checks.py) must fail on it, with
a conversion cache that already holds the unmutated converter's output (a developer's machine) and with
an empty one (CI). The control, the converter as it is, passes both checks and reuses the warm copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from backend_helpers import converted
import torch
from conversion_checks import FRESH_ATOL, meta_logits, probe_ids
from mutants import MUTANTS, mutated_copy

SIZE = "7b-mini"  # the cheapest size: every mutant moves its logits by more than 1


def test_converter_mutants_fail_with_warm_and_cold_caches(tmp_path, monkeypatch):
    import parity
    from parity.checkpoints.synthetic import cached_checkpoint

    meta = cached_checkpoint(SIZE)
    caches, metas = {}, {}
    for state in ("warm", "cold"):
        caches[state] = tmp_path / f"cache-{state}"
        metas[state] = caches[state] / "meta"
        shutil.copytree(meta, metas[state])  # copy2 keeps names, sizes and mtimes: the same fingerprint
    monkeypatch.setenv("PARITY_CACHE", str(caches["warm"]))
    good = {fmt: converted(metas["warm"], fmt, tp=1) for fmt in ("hf", "megatron")}  # the warm copies
    # The reference, once, by the unmutated package (a mutant's copy could change its Meta loader too)
    reference = tmp_path / "meta-logits.pt"
    torch.save(meta_logits(meta, probe_ids(meta)), reference)

    jobs = []
    for i, m in enumerate(MUTANTS):
        tree = mutated_copy(Path(parity.__file__).parent, tmp_path / f"tree-{i}", m)
        jobs.append({"tree": str(tree), "fmt": m.fmt, "work": str(tmp_path / f"work-{i}"),
                     "reference": str(reference), "caches": {k: str(v) for k, v in caches.items()},
                     "meta": {k: str(v) for k, v in metas.items()}})
    out = tmp_path / "results"
    out.mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs, "out": str(out)}))
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("mutants.py")), str(spec)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    for i, m in enumerate(MUTANTS):
        res = json.loads((out / f"{i}.json").read_text())
        assert "error" not in res, f"{m.name}: {res['error']}"
        print(f"{m.name}: round trip changes {res['round_trip_changes']}, max |logit diff| vs meta "
              f"warm {res['warm']['gap']:.2e}, cold {res['cold']['gap']:.2e}")
        assert res["round_trip_changes"] == [], m.name  # the kind of mistake no round trip can see
        if not m.edits:
            assert res["warm"]["gap"] < FRESH_ATOL and res["cold"]["gap"] < FRESH_ATOL
            assert res["warm"]["checkpoint"] == str(good[m.fmt])  # unchanged converter: the copy is reused
            continue
        for state in ("warm", "cold"):
            assert res[state]["gap"] >= FRESH_ATOL, (m.name, state)  # the suite's check fails
        assert res["warm"]["checkpoint"] != str(good[m.fmt]), m.name  # never the old converter's output
