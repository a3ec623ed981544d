"""Shared fixtures. Real data lives in ../shared beside the repo; tests that need it skip without it."""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
LLAMA2_TOKENIZER = SHARED_DATA / "tokenizers" / "llama2-tokenizer.model"


def pytest_configure(config):
    # One cache for the whole session (synthetic checkpoints, conversions), outside the user's home.
    if "PARITY_CACHE" not in os.environ:
        cache = REPO / ".cache" / "parity-tests"
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["PARITY_CACHE"] = str(cache)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def llama2_tokenizer() -> Path:
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip("../shared/data/tokenizers/llama2-tokenizer.model not present")
    return LLAMA2_TOKENIZER


@pytest.fixture
def meta_copy(tmp_path):
    """meta_copy(size="7b-mini") -> a private copy of the cached synthetic Meta checkpoint, to damage."""
    from parity.checkpoints.synthetic import cached_checkpoint

    n = itertools.count()

    def copy(size: str = "7b-mini") -> Path:
        d = tmp_path / f"meta-{size}-{next(n)}"
        shutil.copytree(cached_checkpoint(size), d)
        return d
    return copy
