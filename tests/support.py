"""Helpers the test modules share: the repository root, tiny models, running a program like a user would.

A plain module (not a test module and not conftest): tests import what they need from here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from gpt2.hellaswag import Example
from gpt2.model import GPT, GPTConfig
from gpt2.tokenizer import get_encoding

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
GOLDEN = ROOT / "tests" / "fixtures" / "golden_v0_1"  # the v0.1 release's behaviour, frozen (see make.py there)


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


def write_shards(directory: Path, val: np.ndarray, train_parts: list[np.ndarray]) -> Path:
    """A data directory in the loader's format (val_000000.npy, train_000001.npy, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "val_000000.npy", val.astype(np.uint16))
    for i, part in enumerate(train_parts, start=1):
        np.save(directory / f"train_{i:06d}.npy", part.astype(np.uint16))
    return directory


@torch.no_grad()
def reference_losses(model: torch.nn.Module, example: Example) -> tuple[list[float], list[float]]:
    """HellaSwag the obvious way, through the model's ``forward``: each ending alone after the (left-truncated)
    context, full logits, no padding, no packing."""
    enc = get_encoding()
    ctx = enc.encode_ordinary(example.ctx)
    endings = [enc.encode_ordinary(" " + e) for e in example.endings]
    ctx = ctx[max(0, len(ctx) + max(map(len, endings)) - model.config.block_size) :]
    sums = []
    for ending in endings:
        logits, _ = model(torch.tensor([ctx + ending]))
        logprobs = F.log_softmax(logits[0].double(), dim=-1)
        sums.append(-sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(ending)))
    return sums, [s / len(e) for s, e in zip(sums, endings)]
