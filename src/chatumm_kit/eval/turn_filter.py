"""Which turns a benchmark scores (:class:`TurnFilter`): the cheap headline evaluation of issue 18.

A full ``chatumm eval shapes/eval`` generates a reply for every assistant turn of 1 500 dialogues, twice (teacher-forced
and free-running). The headline figures rest only on the teacher-forced turns two or more exchanges away from what
they refer to (``history_*_acc_d2plus``, 1 320 of 15 829 turns). With a filter the teacher-forced replay asks the
model only about the turns the filter selects; every other exchange is **prefilled** with its true user and assistant
turns (the history a teacher-forced turn sees anyway, without generating a reply that would be thrown away), a
dialogue stops after its last selected turn, a dialogue with none is skipped, and the free-running pass (SR@k, which
needs every turn generated) is left out. The selected turns score exactly as in the full run: same history, same
per-turn seed (a test checks equality on a tiny model in float64).

Example:
    >>> from chatumm_kit.eval.turns import ExpectedTurn
    >>> far = TurnFilter(min_distance=2)
    >>> turn = ExpectedTurn(dialogue_id="d", index=3, task="edit", output="image", distance=4, distractor=False,
    ...                     answer=None, answer_scene=None, target=None, user=[], reply=[])
    >>> far.selects(turn), TurnFilter(tasks=("understand",)).selects(turn)
    (True, False)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatumm_kit.eval.turns import ExpectedTurn

__all__ = ["TurnFilter"]


@dataclass(frozen=True, kw_only=True)
class TurnFilter:
    """A predicate over :class:`~.turns.ExpectedTurn` s; a turn is selected when it passes every condition given.

    Attributes:
        min_distance: keep turns that refer to a picture or turn at least this many exchanges back (turns without a
            history dependency, ``distance`` None, are dropped); None: any distance, including none.
            ``min_distance=2`` selects the headline cells' turns (:data:`~.report.FAR_DISTANCE`).
        tasks: keep turns of these tasks (``generate``, ``edit``, ``understand``, ``caption``, ``chat``); None: all.
            ``tasks=("generate",)`` scores text-to-image turns only.

    Raises:
        ValueError: a negative ``min_distance`` or an empty ``tasks``.
    """

    min_distance: int | None = None
    tasks: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.min_distance is not None and self.min_distance < 0:
            raise ValueError(f"TurnFilter.min_distance must be >= 0 or None, got {self.min_distance}")
        if self.tasks is not None:
            if isinstance(self.tasks, str) or not len(self.tasks):
                raise ValueError(f"TurnFilter.tasks must be a non-empty list of task names or None, got {self.tasks!r}")
            object.__setattr__(self, "tasks", tuple(str(t) for t in self.tasks))

    def selects(self, turn: ExpectedTurn) -> bool:
        """True when ``turn`` is one to score."""
        if self.min_distance is not None and (turn.distance is None or turn.distance < self.min_distance):
            return False
        return self.tasks is None or turn.task in self.tasks

    def to_dict(self) -> dict[str, Any]:
        return {"min_distance": self.min_distance, "tasks": None if self.tasks is None else list(self.tasks)}
