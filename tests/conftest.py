"""Shared fixtures. Real data lives in ../shared beside the repo; tests that need it skip without it."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
LLAMA2_TOKENIZER = SHARED_DATA / "tokenizers" / "llama2-tokenizer.model"


# What torchrun hands a rank. A test process (and so every process it starts) must never hold them.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


TEST_CACHE = REPO / ".cache" / "parity-tests"


def pytest_configure(config):
    # One cache for the whole session (synthetic checkpoints, conversions), outside the user's home.
    # Conversions in it are keyed by the converter's source (parity.config.cached_conversion).
    if "PARITY_CACHE" not in os.environ:
        TEST_CACHE.mkdir(parents=True, exist_ok=True)
        os.environ["PARITY_CACHE"] = str(TEST_CACHE)
    # Tests never reach the hub. huggingface_hub reads these once, when transformers is first imported,
    # so they are set here, before any test imports it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # Parallel workers (pytest-xdist) split the cores between them, and so do the stacks they start
    # (parity's own workers read OMP_NUM_THREADS): oversubscribed thread pools spin and wait on each
    # other. Scores do not depend on it (the noise floor's thread perturbation finds them bit-identical).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))
        if "torch" in sys.modules:  # already imported by a plugin: its pool has read the old value
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# Files whose tests take minutes, started first so that no worker is left alone with one at the end
# (pyproject's --no-loadscope-reorder keeps this order; xdist would otherwise put files with many tests first).
SLOWEST_FIRST = ["test_backends_tp.py", "test_explain_corpus.py", "test_torch_dist.py", "test_run_e2e.py",
                 "test_attribution.py", "test_stale_results.py", "test_concurrency.py", "test_numerical_faults.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4. Many tests start multi-rank workers of their own (up to
    8 ranks), and each worker process holds torch, transformers and megatron-core in memory."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def pytest_sessionfinish(session, exitstatus):
    """Conversions made by another version of the converter are never read again (their key names its
    source): drop them from the tests' own cache, so that editing the converter does not grow it."""
    if os.environ.get("PARITY_CACHE") != str(TEST_CACHE):
        return
    from parity.config import code_digest

    current = code_digest("checkpoints/*.py")
    for d in (TEST_CACHE / "converted").glob("*-*"):
        if d.is_dir() and d.name.rsplit("-", 1)[1] != current:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_rank_left_behind():
    """A test that loads a backend in-process must not leave a rank / port in the environment: the
    subprocesses of later tests would inherit them (parity.backends.dist keeps them out)."""
    before = {v: os.environ.get(v) for v in DIST_VARS}
    yield
    after = {v: os.environ.get(v) for v in DIST_VARS}
    assert after == before, f"the test left torch.distributed variables in os.environ: {after}"


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
