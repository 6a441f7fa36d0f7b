"""Learning-rate schedules as multipliers of each parameter group's base learning rate.

The trainer sets ``group["lr"] = group["base_lr"] * lr_multiplier(step, ...)`` for every group of every
optimizer, so groups with different base rates (embeddings, hidden matrices, head) follow one shape.
A pure function of the step: a resumed run uses exactly the rates of an uninterrupted one.

- ``cosine`` (GPT-3, build-nanogpt): linear warmup, then a cosine from 1 down to ``min_lr_ratio``.
- ``wsd`` (warmup-stable-decay, the modded-nanogpt speedrun): linear warmup, constant, then a linear cooldown
  to ``min_lr_ratio`` over the last ``cooldown_frac`` of the run, so a run of any length ends fully decayed.
"""

from __future__ import annotations

import math


def lr_multiplier(
    step: int,
    *,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float,
    schedule: str = "cosine",
    cooldown_frac: float = 0.4,
) -> float:
    """The multiplier at optimizer step ``step`` (0-based). Warmup reaches 1 at step ``warmup_steps - 1`` (step 0
    already uses ``1 / warmup_steps``, never 0); both schedules reach ``min_lr_ratio`` at ``max_steps`` (the
    weights after the last step) and stay there."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr_ratio
    if schedule == "cosine":
        progress = (step - warmup_steps) / (max_steps - warmup_steps)
        return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)
    if schedule == "wsd":
        cooldown_start = max(warmup_steps, max_steps - round(cooldown_frac * max_steps))
        if step < cooldown_start:
            return 1.0
        progress = (step - cooldown_start) / (max_steps - cooldown_start)
        return 1.0 - progress * (1.0 - min_lr_ratio)
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine or wsd")
