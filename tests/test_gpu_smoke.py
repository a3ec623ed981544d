"""ci/gpu-smoke.sh without a GPU: its checks are listed, arguments are checked, and on a machine without
CUDA every check fails fast with one line each (exit 1) instead of running anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ["cuda", "minis-tp1", "gloo-tp2", "gloo-tp8", "1b-bf16", "nccl-tp2", "hf-multi-gpu"]


def smoke(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "ci" / "gpu-smoke.sh"), *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHON=sys.executable), cwd="/")


def test_lists_its_checks():
    r = smoke("--list")
    assert r.returncode == 0, r.stderr
    assert [ln.split()[0] for ln in r.stdout.splitlines()] == NAMES
    assert r.stdout.count("[needs 2 GPUs]") == 2


def test_without_cuda_every_check_fails_with_one_line(tmp_path):
    r = smoke("--out", str(tmp_path))
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines[:-1]] == [["FAIL", f"{n}:"] for n in NAMES]
    assert "cuda, " in lines[0] and "bf16 missing" in lines[0] and "not run, CUDA is not usable here" in lines[1]
    assert lines[-1].startswith("gpu-smoke: FAIL (7 failed")
    assert not any(tmp_path.iterdir())  # nothing was run


def test_unknown_check_is_refused():
    r = smoke("--only", "cuda,warp-drive")
    assert r.returncode == 2 and "unknown check 'warp-drive'" in r.stderr
