"""Learning-rate schedules as plain functions of the iteration.

Because the multiplier depends on nothing but the iteration number, resuming a
run at iteration ``k`` gives exactly the learning rate it would have had: no
scheduler state needs to be replayed.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Literal, Sequence

__all__ = ["LRSchedule", "lr_factor"]


def lr_factor(
    iteration: int,
    max_iters: int,
    schedule: Literal["multistep", "cosine", "constant"] = "multistep",
    steps: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    final_factor: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at ``iteration`` (0-based: the step about to run).

    * ``multistep``: ``gamma ** (number of steps <= iteration)``;
    * ``cosine``: ``final + (1 - final) * 0.5 * (1 + cos(pi * iteration / max_iters))``;
    * ``constant``: 1.

    During the first ``warmup_iters`` iterations the result is additionally
    multiplied by a linear ramp from ``warmup_factor`` (iteration 0) to 1
    (iteration ``warmup_iters``), as in Detectron2's ``WarmupParamScheduler``.
    """
    if schedule == "multistep":
        main = gamma ** bisect_right(sorted(steps), iteration)
    elif schedule == "cosine":
        progress = min(max(iteration / max(max_iters, 1), 0.0), 1.0)
        main = final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "constant":
        main = 1.0
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}; use 'multistep', 'cosine' or 'constant'")
    if warmup_iters > 0 and iteration < warmup_iters:
        alpha = iteration / warmup_iters
        main *= warmup_factor * (1.0 - alpha) + alpha
    return main


@dataclass
class LRSchedule:
    """A bound :func:`lr_factor`: ``schedule(iteration) -> multiplier``."""

    max_iters: int
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    steps: Sequence[int] = field(default_factory=tuple)
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    final_factor: float = 0.0

    def __call__(self, iteration: int) -> float:
        return lr_factor(
            iteration,
            self.max_iters,
            self.schedule,
            self.steps,
            self.gamma,
            self.warmup_iters,
            self.warmup_factor,
            self.final_factor,
        )

    def state_dict(self) -> dict:
        """Plain description saved in checkpoints (informative; resume only needs the iteration)."""
        return {
            "max_iters": self.max_iters,
            "schedule": self.schedule,
            "steps": list(self.steps),
            "gamma": self.gamma,
            "warmup_iters": self.warmup_iters,
            "warmup_factor": self.warmup_factor,
            "final_factor": self.final_factor,
        }
