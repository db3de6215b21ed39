"""Learning-rate schedules: a pure function of the step, so resuming needs only the step number.

All start with a linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` steps, then:
- ``cosine``: half a cosine from ``lr`` down to ``lr * min_lr_ratio`` at the last step;
- ``inverse_sqrt``: ``lr * sqrt(warmup / step)`` (the paper's Wikitext-103 runs; fairseq's rule);
- ``wsd`` (warmup-stable-decay): ``lr`` until the last ``decay_fraction`` of the steps, then linear
  down to ``lr * min_lr_ratio``;
- ``constant``: ``lr``.
"""

from __future__ import annotations

import math

from pretrain.config import ScheduleSection


def lr_at(step: int, base_lr: float, total_steps: int, schedule: ScheduleSection) -> float:
    """The learning rate of optimizer step ``step`` (0-based) in a run of ``total_steps`` steps."""
    warmup = schedule.warmup_steps
    if step < warmup:
        return base_lr * (step + 1) / warmup
    min_lr = base_lr * schedule.min_lr_ratio
    if schedule.name == "constant":
        return base_lr
    if schedule.name == "inverse_sqrt":
        return base_lr * math.sqrt(max(warmup, 1) / (step + 1))
    if schedule.name == "cosine":
        span = max(total_steps - 1 - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule.name == "wsd":
        decay_steps = max(1, round(schedule.decay_fraction * total_steps))
        decay_start = max(total_steps - decay_steps, warmup)
        if step < decay_start:
            return base_lr
        progress = min((step - decay_start + 1) / max(total_steps - decay_start, 1), 1.0)
        return base_lr + (min_lr - base_lr) * progress
    raise ValueError(f"unknown schedule {schedule.name!r}")
