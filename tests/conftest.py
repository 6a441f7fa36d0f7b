"""Shared pytest fixtures and settings (helpers live in ``support.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import SHARED_DATA, synthetic_shards


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip on clones that do not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of ``synthetic_shards``, made once per test module."""
    return synthetic_shards(tmp_path_factory.mktemp("synthetic"))
