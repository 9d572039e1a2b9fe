"""Attribute-by-attribute scoring of a predicted scene (or image) against the target scene, with partial credit.

Predicted and target objects are paired by an assignment that maximises the number of agreeing attributes (colour,
shape, size, cell); every attribute score is then the number of pairs that agree on it divided by
``max(#predicted, #target)``, so both a missing and an extra object cost credit. ``count`` is 1 when the object counts
are equal; ``accuracy`` is the mean of the five; ``exact`` is 1 when the scenes are equal.

Example:
    >>> from chatumm_kit.data.shapes import Scene, ShapeObject
    >>> target = Scene(objects=(ShapeObject(shape="circle", colour="red", size="small", cell=0),))
    >>> pred = Scene(objects=(ShapeObject(shape="square", colour="red", size="small", cell=0),))
    >>> s = score(pred, target)
    >>> (s.colour, s.shape, s.accuracy, s.exact)
    (1.0, 0.0, 0.8, 0.0)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from torch import Tensor

from .detect import detect
from .scene import Scene, ShapeObject, WorldConfig

__all__ = ["AttributeScore", "score", "match_objects"]

_ATTRS = ("colour", "shape", "size", "cell")
_MAX_EXHAUSTIVE = 40320  # assignments tried exhaustively (8!); beyond that, greedy pairing


@dataclass(frozen=True, kw_only=True)
class AttributeScore:
    """Per-attribute credit in [0, 1] (see the module docstring for the exact definitions).

    Attributes:
        count: 1.0 if the predicted and target object counts are equal, else 0.0.
        colour, shape, size, position: matched pairs agreeing on the attribute / max(#predicted, #target).
        accuracy: mean of count, colour, shape, size and position.
        exact: 1.0 if the predicted scene equals the target scene, else 0.0.
    """

    count: float
    colour: float
    shape: float
    size: float
    position: float
    accuracy: float
    exact: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def mean(cls, scores: Sequence[AttributeScore]) -> AttributeScore:
        """Field-wise mean over many scores (e.g. a whole evaluation set)."""
        if not scores:
            raise ValueError("AttributeScore.mean: no scores to average")
        return cls(**{f.name: sum(getattr(s, f.name) for s in scores) / len(scores) for f in fields(cls)})


def _agreement(a: ShapeObject, b: ShapeObject) -> int:
    return sum(getattr(a, k) == getattr(b, k) for k in _ATTRS)


def match_objects(predicted: Scene, target: Scene) -> list[tuple[int, int]]:
    """Pair predicted with target objects to maximise agreeing attributes.

    Returns:
        ``min(len(predicted), len(target))`` pairs ``(predicted index, target index)``, sorted by target index.
        Exhaustive over assignments (ties → the first in lexicographic order) when there are at most 8! of them,
        greedy by agreement otherwise.
    """
    p, t = predicted.objects, target.objects
    if not p or not t:
        return []
    gain = [[_agreement(a, b) for b in t] for a in p]
    small, large = (p, t) if len(p) <= len(t) else (t, p)
    n_assign = math.perm(len(large), len(small))
    pairs: list[tuple[int, int]]
    if n_assign <= _MAX_EXHAUSTIVE:
        best, best_val = None, -1
        for perm in itertools.permutations(range(len(large)), len(small)):
            if len(p) <= len(t):
                cand = [(i, j) for i, j in enumerate(perm)]
            else:
                cand = [(i, j) for j, i in enumerate(perm)]
            val = sum(gain[i][j] for i, j in cand)
            if val > best_val:
                best, best_val = cand, val
        pairs = best or []
    else:
        order = sorted(((gain[i][j], -i, -j) for i in range(len(p)) for j in range(len(t))), reverse=True)
        used_p: set[int] = set()
        used_t: set[int] = set()
        pairs = []
        for _, ni, nj in order:
            i, j = -ni, -nj
            if i not in used_p and j not in used_t:
                pairs.append((i, j))
                used_p.add(i)
                used_t.add(j)
    return sorted(pairs, key=lambda ij: ij[1])


def score(prediction: Scene | Tensor, target: Scene, *, config: WorldConfig | None = None) -> AttributeScore:
    """Score a predicted scene, or an image (detected first), against the target scene.

    Args:
        prediction: a :class:`Scene`, or an image ``[3, H, W]`` (uint8, or float in [0, 1]) to :func:`detect`.
        target: the ground-truth scene.
        config: the world; required when ``prediction`` is an image.
    """
    if isinstance(prediction, Tensor):
        if config is None:
            raise ValueError("score: an image prediction needs config= to detect its scene")
        prediction = detect(prediction, config)
    pairs = match_objects(prediction, target)
    denom = max(len(prediction), len(target))
    per: dict[str, float] = {}
    for attr in _ATTRS:
        agree = sum(getattr(prediction.objects[i], attr) == getattr(target.objects[j], attr) for i, j in pairs)
        per[attr] = 1.0 if denom == 0 else agree / denom
    count = float(len(prediction) == len(target))
    parts = (count, per["colour"], per["shape"], per["size"], per["cell"])
    return AttributeScore(
        count=count,
        colour=per["colour"],
        shape=per["shape"],
        size=per["size"],
        position=per["cell"],
        accuracy=sum(parts) / len(parts),
        exact=float(prediction == target),
    )
