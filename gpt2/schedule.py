"""Learning-rate schedules as multipliers of each parameter group's base learning rate.

The trainer sets ``group["lr"] = group["base_lr"] * lr_multiplier(step, ...)`` for every group of every
optimizer, so groups with different base rates (embeddings, hidden matrices, head) follow one shape.
A pure function of the step: a resumed run uses exactly the rates of an uninterrupted one.
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The GPT-3 (and build-nanogpt) schedule at optimizer step ``step`` (0-based): linear warmup to 1 at step
    ``warmup_steps - 1`` (step 0 already uses ``1 / warmup_steps``, never 0), then a cosine from 1 at
    ``warmup_steps`` down to ``min_lr_ratio`` at ``max_steps``, and ``min_lr_ratio`` after that."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)
