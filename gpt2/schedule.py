"""The learning-rate schedule of GPT-3 (and build-nanogpt): linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup reaches ``lr`` at step ``warmup_steps - 1`` (step 0 already uses ``lr / warmup_steps``, never 0);
    the cosine then falls from ``lr`` at ``warmup_steps`` to ``min_lr`` at ``max_steps``, and stays there.
    A pure function of the step, so a resumed run uses exactly the rates of an uninterrupted one.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
