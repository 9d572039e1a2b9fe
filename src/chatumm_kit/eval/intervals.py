"""95 % intervals for the benchmark's accuracies (issue 18): Wilson score intervals and bootstraps over dialogues.

* :func:`wilson` — the Wilson score interval of a proportion ``successes / n`` (turns taken as independent). For a
  partial-credit mean in [0, 1] (``image_attr``) it is applied to ``mean * n`` successes: such a variable's variance
  is at most ``p (1 - p)``, so the interval is conservative.
* :func:`dialogue_bootstrap` — a percentile bootstrap that resamples **whole dialogues** (the turns of one dialogue
  share a scene, a history and a model state, so they are correlated; resampling turns would understate the spread).
  The statistic is the turn-weighted mean of the resampled dialogues' turns.
* :func:`paired_difference_bootstrap` — the same resampling applied to two models scored on the same dialogues: each
  resample draws one set of dialogues and takes ``mean(model) - mean(baseline)`` on it, so the interval of the
  difference keeps the pairing (both models met the same hard dialogues).

All bootstraps are seeded (same inputs and seed → same interval) and use ``resamples`` draws (default 1000).

Example:
    >>> wilson(5, 10)                                                     # doctest: +ELLIPSIS
    Interval(low=0.2365..., high=0.7634...)
    >>> dialogue_bootstrap({"a": [1.0, 1.0], "b": [0.0, 0.0]}, seed=0).low <= 0.5
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "Z95", "RESAMPLES", "wilson", "dialogue_bootstrap", "paired_difference_bootstrap"]

Z95 = 1.959963984540054
"""The normal quantile of a two-sided 95 % interval."""
RESAMPLES = 1000
"""Default number of bootstrap resamples."""


@dataclass(frozen=True)
class Interval:
    """A closed interval ``[low, high]`` (a 95 % confidence interval unless said otherwise)."""

    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_list(self) -> list[float]:
        """``[low, high]`` rounded to 6 decimals, for JSON."""
        return [round(self.low, 6), round(self.high, 6)]


def wilson(successes: float, n: int, *, z: float = Z95) -> Interval | None:
    """The Wilson score interval of ``successes / n``; None when ``n == 0``.

    ``centre = (p + z²/2n) / (1 + z²/n)``, ``half = z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²)``.

    Example:
        >>> wilson(0, 10).high                                           # doctest: +ELLIPSIS
        0.2775...
    """
    if n <= 0:
        return None
    if not 0 <= successes <= n + 1e-9:
        raise ValueError(f"wilson: successes must be in [0, n={n}], got {successes}")
    p = min(1.0, successes / n)
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # The interval holds p exactly: at p = 0 or 1 rounding can leave centre ∓ half a hair inside, which would make
    # the plot's error-bar lengths (p − low, high − p) negative.
    return Interval(low=min(p, max(0.0, centre - half)), high=max(p, min(1.0, centre + half)))


def _sums(groups: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([float(sum(g)) for g in groups]), np.array([len(g) for g in groups], dtype=float)


def _percentiles(stats: np.ndarray) -> Interval:
    low, high = np.percentile(stats, [2.5, 97.5])
    return Interval(low=float(low), high=float(high))


def dialogue_bootstrap(
    values: Mapping[str, Sequence[float]], *, resamples: int = RESAMPLES, seed: int = 0
) -> Interval | None:
    """Percentile 95 % interval of the turn-weighted mean, resampling dialogues with replacement.

    Args:
        values: dialogue id → the metric's values on that dialogue's turns (dialogues without turns are ignored).
        resamples: bootstrap draws.
        seed: the generator's seed.

    Returns:
        The interval, or None when no turn was given.
    """
    groups = [list(v) for v in values.values() if len(v)]
    if not groups:
        return None
    sums, counts = _sums(groups)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(groups), size=(resamples, len(groups)))
    return _percentiles(sums[idx].sum(1) / counts[idx].sum(1))


def paired_difference_bootstrap(
    model: Mapping[str, Sequence[float]],
    baseline: Mapping[str, Sequence[float]],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, Interval] | None:
    """``mean(model) - mean(baseline)`` over the dialogues both were scored on, and its paired bootstrap interval.

    Each resample draws one multiset of shared dialogues and evaluates both turn-weighted means on it.

    Returns:
        ``(difference, interval)``, or None when the two share no dialogue with turns on both sides.

    Example:
        >>> d, ci = paired_difference_bootstrap({"a": [1, 1], "b": [1, 0]}, {"a": [0, 0], "b": [0, 0]}, seed=0)
        >>> round(d, 2), ci.low > 0
        (0.75, True)
    """
    shared = [k for k in model if len(model[k]) and k in baseline and len(baseline[k])]
    if not shared:
        return None
    ms, mc = _sums([model[k] for k in shared])
    bs, bc = _sums([baseline[k] for k in shared])
    diff = float(ms.sum() / mc.sum() - bs.sum() / bc.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(shared), size=(resamples, len(shared)))
    stats = ms[idx].sum(1) / mc[idx].sum(1) - bs[idx].sum(1) / bc[idx].sum(1)
    return diff, _percentiles(stats)
