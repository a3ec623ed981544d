"""Test helpers for running `parity` as a user runs it (a subprocess, optionally under an address-space
limit) and judging what it printed: the one-line error check, the reuse counts, a code-running pickle."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

AS_LIMIT = 4 << 30  # bytes of address space a command that reads a hostile file may use


def limit_address_space():
    """preexec_fn of a command that reads a hostile file."""
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def run_parity(*args, env: dict | None = None, limit_memory: bool = False, cwd=None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity", *map(str, args)], cwd=cwd,
                          env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit_address_space if limit_memory else None)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit `code` with exactly one stderr line, no traceback, containing every needle."""
    err = r.stderr.strip()
    assert r.returncode == code, (r.returncode, err[-3000:])
    assert "Traceback" not in err and "MemoryError" not in err, err[-3000:]
    assert len(err.splitlines()) == 1, err[-3000:]
    for n in needles:
        assert n in err, (n, err)
    return err


def counts(stderr: str) -> tuple[int, int]:
    """(units reused, units to score) from `parity run`'s first progress line."""
    m = re.search(r"(\d+) reused, (\d+) to score", stderr)
    assert m, stderr[-2000:]
    return int(m.group(1)), int(m.group(2))


class RunsCode:
    """Unpickling this calls open(marker, 'w'): the marker file appears if the payload ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))
