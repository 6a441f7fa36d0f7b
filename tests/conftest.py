"""Shared pytest fixtures and settings (helpers live in ``support.py``).

The suite runs offline: the Hugging Face hub and datasets are told so before anything imports them (a test that
exercises the online path sets its own environment for the program it runs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
from support import SHARED_DATA, write_shards


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: on a small shared box, OpenMP threads waiting on each other dominate tiny ops."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip on clones that do not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random tokens below 256 with a learnable pattern (every other token repeats the one before it)."""
    rng = np.random.default_rng(0)
    tokens = np.repeat(rng.integers(0, 256, 40_000), 2)
    return write_shards(tmp_path_factory.mktemp("synthetic"), tokens[:8_000], [tokens[8_000:40_000], tokens[40_000:]])
