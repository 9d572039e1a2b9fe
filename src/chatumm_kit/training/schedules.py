"""Learning-rate schedules: linear warm-up, then constant or cosine decay to a floor, as ``LambdaLR`` factories.

A schedule is a multiplier ``f(step)`` of each group's base learning rate, ``step`` counting optimizer steps from 0
(``LambdaLR`` evaluates ``f(0)`` at construction, so the first optimizer step uses ``lr · f(0)``). With ``W`` warm-up
steps and ``T`` total steps:

* warm-up, ``step < W``: ``f = (step + 1) / W`` — the first step already learns, step ``W − 1`` reaches the peak;
* constant: ``f = 1`` afterwards;
* cosine: ``p = clamp((step − W) / (T − W), 0, 1)``, ``f = r + (1 − r) · (1 + cos(π·p)) / 2`` with the floor ratio
  ``r = min_ratio``: ``f(W) = 1``, ``f(T) = r``, and ``f = r`` for every later step.

Schedules are stepped per optimizer step (Lightning ``interval="step"``); their position lives in the scheduler's
state dict, so a resumed run continues the same curve.

Example:
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> spec = CosineSchedule(warmup_steps=2, total_steps=6, min_ratio=0.1)
    >>> [round(spec.factor(s), 4) for s in range(8)]
    [0.5, 1.0, 1.0, 0.8682, 0.55, 0.2318, 0.1, 0.1]
    >>> sched = spec.build(opt)
    >>> opt.param_groups[0]["lr"]
    0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["ConstantSchedule", "CosineSchedule", "LEGACY_SCHEDULE_KINDS", "ScheduleSpec", "schedule_node"]


@dataclass(frozen=True)
class ScheduleSpec:
    """Base of the schedule specs: linear warm-up over ``warmup_steps``; subclasses define the rest of the curve.

    Args:
        warmup_steps: optimizer steps of linear warm-up (0: start at the peak).
    """

    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"{type(self).__name__}.warmup_steps: must be >= 0, got {self.warmup_steps}")

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self._after_warmup(step)

    def _after_warmup(self, step: int) -> float:
        raise NotImplementedError

    def build(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        """A ``LambdaLR`` applying :meth:`factor` to every param group of ``optimizer``."""
        return LambdaLR(optimizer, lr_lambda=self.factor)

    def lightning_config(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The ``lr_scheduler`` entry for ``configure_optimizers``: stepped after every optimizer step.

        Example:
            >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            >>> cfg = ConstantSchedule(warmup_steps=4).lightning_config(opt)
            >>> cfg["interval"], cfg["frequency"]
            ('step', 1)
        """
        return {"scheduler": self.build(optimizer), "interval": "step", "frequency": 1}


@dataclass(frozen=True)
class ConstantSchedule(ScheduleSpec):
    """Warm-up, then the peak learning rate forever.

    Example:
        >>> [ConstantSchedule(warmup_steps=4).factor(s) for s in (0, 3, 100)]
        [0.25, 1.0, 1.0]
    """

    def _after_warmup(self, step: int) -> float:
        return 1.0


@dataclass(frozen=True)
class CosineSchedule(ScheduleSpec):
    """Warm-up, then half a cosine from the peak at ``warmup_steps`` to ``min_ratio`` × peak at ``total_steps``.

    Args:
        total_steps: step at which the floor is reached (usually ``trainer.max_steps``); must exceed
            ``warmup_steps``.
        min_ratio: floor as a fraction of the peak, in ``[0, 1]``.

    Example:
        >>> CosineSchedule(warmup_steps=0, total_steps=10, min_ratio=0.0).factor(5)
        0.5
    """

    total_steps: int = 1
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"CosineSchedule.total_steps: must exceed warmup_steps={self.warmup_steps}, got {self.total_steps}"
            )
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"CosineSchedule.min_ratio: must be in [0, 1], got {self.min_ratio}")

    def _after_warmup(self, step: int) -> float:
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# The ``{kind: NAME}`` schedule nodes of checkpoints written before ``_component_`` named the schedule.
LEGACY_SCHEDULE_KINDS: dict[str, str] = {
    "constant": "chatumm_kit.training.schedules.ConstantSchedule",
    "cosine": "chatumm_kit.training.schedules.CosineSchedule",
}


def schedule_node(node: dict[str, Any] | None) -> dict[str, Any]:
    """A schedule's recipe node in the ``_component_`` form: ``None`` is a constant rate without warm-up, an old
    ``{kind: NAME, ...}`` node is mapped through :data:`LEGACY_SCHEDULE_KINDS`.

    Example:
        >>> schedule_node({"kind": "cosine", "total_steps": 10})["_component_"]
        'chatumm_kit.training.schedules.CosineSchedule'
    """
    node = dict(node or {"_component_": LEGACY_SCHEDULE_KINDS["constant"]})
    if "_component_" in node:
        return node
    kind = node.pop("kind", "constant")
    if kind not in LEGACY_SCHEDULE_KINDS:
        raise ValueError(f"schedule.kind: unknown {kind!r} (known: {', '.join(LEGACY_SCHEDULE_KINDS)})")
    return {"_component_": LEGACY_SCHEDULE_KINDS[kind], **node}
