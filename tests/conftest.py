"""Shared pytest fixtures and settings (helpers live in ``support.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip on clones that do not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
