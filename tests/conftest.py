"""Shared test fixtures: the repository root, the shared data folder (skipped where absent), tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip on clones that do not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def tiny_config(**overrides: int) -> GPTConfig:
    """A GPT small enough to train in seconds on a CPU, with GPT-2's real vocabulary."""
    return GPTConfig(**{**dict(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32), **overrides})


def tiny_model(seed: int = 0, **overrides: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def run_python(*args: str | Path, cwd: Path = ROOT, timeout: float = 300, env: dict | None = None):
    """Run ``python ARGS`` (a script or ``-m module``) like a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
