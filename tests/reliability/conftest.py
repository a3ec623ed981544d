"""Fixtures of the reliability tests (meta_copy, to damage a checkpoint, is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from parity.checkpoints.synthetic import cached_checkpoint


@pytest.fixture(scope="session")
def mini_meta() -> Path:
    """The shared (read-only!) synthetic 7b-mini Meta checkpoint; copy it before changing anything."""
    return cached_checkpoint("7b-mini")
