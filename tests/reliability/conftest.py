"""Fixtures of the reliability tests: a private copy of the cached 7b-mini synthetic checkpoint to damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from parity.checkpoints.synthetic import cached_checkpoint


@pytest.fixture(scope="session")
def mini_meta() -> Path:
    """The shared (read-only!) synthetic 7b-mini Meta checkpoint; copy it before changing anything."""
    return cached_checkpoint("7b-mini")


@pytest.fixture
def meta_copy(mini_meta, tmp_path):
    def make(name: str = "meta") -> Path:
        d = tmp_path / name
        shutil.copytree(mini_meta, d)
        return d
    return make
