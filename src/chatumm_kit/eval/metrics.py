"""Scoring one assistant turn against the ShapesChat ground truth, and aggregating scores (the benchmark's maths).

**Per turn** (:func:`score_turn`), with ``expected`` an :class:`~.turns.ExpectedTurn` and ``reply`` a
:class:`~.turns.Reply`:

* ``intent`` — the reply's output modality (text / image / interleaved) equals the expected one (SPEC §2: intent is
  predicted, so answering a drawing request with words is an error of its own);
* text, by task (``None`` when the turn expects no text):
  ``vqa`` (understand) and ``chat`` — :func:`~chatumm_kit.data.shapes.normalise_answer` of both sides equal;
  ``caption`` — the scene :func:`~chatumm_kit.data.shapes.parse_caption` reads from the reply equals the true scene
  (``caption_attr``: per-attribute partial credit of that parse, an unparsable reply counting as an empty scene);
  ``interleaved_text`` — the text of an image + text reply, normalised exact match;
* image, for turns that expect one: the reply's **first** image is detected (resized to the world's size first if
  needed) and scored attribute by attribute against the target scene
  (:class:`~chatumm_kit.data.shapes.AttributeScore`): ``image_attr`` (mean of count, colour, shape, size, position;
  partial credit), ``image_exact`` (all attributes right) and each attribute alone. A reply without an image scores
  as an empty scene (0 everywhere);
* ``success`` — intent right, text right (if expected) and ``image_attr >= image_success_threshold`` (if expected);
  the default threshold 1.0 means "every attribute right".

**Aggregates**: :class:`MetricStat` (sum and count, hence the mean), :class:`Breakdown` (one stat per metric),
:class:`TurnAggregate` (overall, by dependency distance, by turn index, by task) and :class:`SuccessRates` (SR@k with
stop at first failure over :class:`FreeRun` s). Every class has ``to_dict``/``from_dict``; JSON keys are strings.

Example:
    >>> from chatumm_kit.data.shapes import WorldConfig
    >>> from chatumm_kit.eval.turns import ExpectedTurn, Reply
    >>> exp = ExpectedTurn(dialogue_id="d", index=0, task="understand", output="text", distance=2, distractor=False,
    ...                    answer="red", answer_scene=None, target=None, user=["What colour?"], reply=["red"])
    >>> s = score_turn(expected=exp, reply=Reply(parts=["It is red."]), world=WorldConfig())
    >>> (s.intent, s.text_metric, s.text_correct, s.success)
    (True, 'vqa', True, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from chatumm_kit.data.shapes import (
    AttributeScore,
    Scene,
    WorldConfig,
    describe,
    detect,
    normalise_answer,
    parse_caption,
    score,
)
from chatumm_kit.eval.intervals import Interval, wilson
from chatumm_kit.eval.turns import ExpectedTurn, Reply

__all__ = [
    "METRICS",
    "IMAGE_METRICS",
    "JUDGED_METRICS",
    "TurnScore",
    "score_turn",
    "MetricStat",
    "Breakdown",
    "TurnAggregate",
    "FreeRun",
    "SuccessRates",
    "distance_order",
]

IMAGE_METRICS = (
    "image_attr",
    "image_exact",
    "image_count",
    "image_colour",
    "image_shape",
    "image_size",
    "image_position",
)
JUDGED_METRICS = (
    "reply_quality",
    "edit_semantic",
    "edit_quality",
    "edit_overall",
    "t2i_adherence",
    "judge_failed",
)
"""Metrics of judged turns (:mod:`.scoring`): judge scores scaled to [0, 1], and the share of turns left unjudged."""
METRICS = (
    "success",
    "intent",
    "vqa",
    "caption",
    "caption_attr",
    "chat",
    "interleaved_text",
    "answer",
    *IMAGE_METRICS,
    *JUDGED_METRICS,
)
"""Every metric a :class:`Breakdown` can hold, in report order (``answer``: an understanding benchmark's exact
answer, :mod:`.understanding`)."""

_TEXT_SHOWN = 200  # characters of predicted/expected text kept per turn in the report


def _text_metric(expected: ExpectedTurn) -> str | None:
    if expected.output == "image":
        return None
    if expected.output == "interleaved":
        return "interleaved_text"
    return {"understand": "vqa", "caption": "caption", "chat": "chat"}.get(expected.task, "chat")


def _fit_image(image: torch.Tensor, world: WorldConfig) -> torch.Tensor:
    """A ``[3, H, W]`` image (uint8, or float in [0, 1]) at the world's size, for the detector."""
    size = world.image_size
    if tuple(image.shape[-2:]) == (size, size):
        return image
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x.clamp(0, 1)


@dataclass
class TurnScore:
    """The score of one assistant turn (see the module docstring for each field's rule).

    Attributes:
        dialogue_id, index, task, distance, distractor: copied from the :class:`~.turns.ExpectedTurn`.
        expected_output, predicted_output: output modalities (``predicted_output`` may be ``"none"``).
        intent: the modalities agree.
        text_metric: which text metric the turn counts in (``vqa``, ``caption``, ``chat``, ``interleaved_text``), or
            None when no text is expected.
        text_correct: exact match of the text (None when no text is expected).
        caption_attr: partial credit of a caption's parsed scene (captions only).
        image: attribute scores of the first generated image (None when no image is expected).
        success: everything expected is right.
        expected_text, predicted_text: the texts (truncated), for reading the report.
        detected: the canonical caption of the scene detected in the first generated image, if any.
        extracted: what an answer-extraction rule read from the reply (an option letter, ``yes``/``no``), if any.
        judged: judged metrics of the turn (name in :data:`JUDGED_METRICS` → value in [0, 1]), if judged.
        verdict: the judge's :class:`~.judge.Verdict` as a dict (scores, reason or error), if judged.
    """

    dialogue_id: str
    index: int
    task: str
    distance: int | None
    distractor: bool
    expected_output: str
    predicted_output: str
    intent: bool
    text_metric: str | None
    text_correct: bool | None
    caption_attr: float | None
    image: AttributeScore | None
    success: bool
    expected_text: str | None = None
    predicted_text: str = ""
    detected: str | None = None
    extracted: str | None = None
    judged: dict[str, float] | None = None
    verdict: dict[str, Any] | None = None

    @property
    def distance_key(self) -> str:
        return "none" if self.distance is None else str(self.distance)

    def values(self) -> dict[str, float]:
        """Metric name → value (0/1 for binary metrics) for every metric that applies to this turn."""
        out = {"success": float(self.success), "intent": float(self.intent)}
        if self.text_metric is not None and self.text_correct is not None:
            out[self.text_metric] = float(self.text_correct)
        if self.caption_attr is not None:
            out["caption_attr"] = self.caption_attr
        if self.image is not None:
            s = self.image
            out.update(
                image_attr=s.accuracy,
                image_exact=s.exact,
                image_count=s.count,
                image_colour=s.colour,
                image_shape=s.shape,
                image_size=s.size,
                image_position=s.position,
            )
        if self.judged:
            out.update(self.judged)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "dialogue_id": self.dialogue_id,
            "index": self.index,
            "task": self.task,
            "distance": self.distance,
            "distractor": self.distractor,
            "expected_output": self.expected_output,
            "predicted_output": self.predicted_output,
            "intent": self.intent,
            "text_metric": self.text_metric,
            "text_correct": self.text_correct,
            "caption_attr": self.caption_attr,
            "image": self.image.as_dict() if self.image is not None else None,
            "success": self.success,
            "expected_text": self.expected_text,
            "predicted_text": self.predicted_text,
            "detected": self.detected,
            # exact benchmarks leave these out, so their reports stay as they were
            **({"extracted": self.extracted} if self.extracted is not None else {}),
            **({"judged": dict(self.judged)} if self.judged is not None else {}),
            **({"verdict": dict(self.verdict)} if self.verdict is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TurnScore:
        data = dict(d)
        data["image"] = AttributeScore(**data["image"]) if data.get("image") is not None else None
        return cls(**data)


def score_turn(
    *, expected: ExpectedTurn, reply: Reply, world: WorldConfig, image_success_threshold: float = 1.0
) -> TurnScore:
    """Score one reply against its ground truth (rules in the module docstring)."""
    grid = world.grid
    predicted_output = reply.modality
    intent = predicted_output == expected.output
    ok = intent

    metric = _text_metric(expected)
    text_correct: bool | None = None
    caption_attr: float | None = None
    if metric is not None:
        text = reply.text
        if metric == "caption" and expected.answer_scene is not None:
            parsed = parse_caption(text, world) if text else None
            text_correct = parsed == expected.answer_scene
            caption_attr = score(parsed if parsed is not None else Scene(), expected.answer_scene).accuracy
        else:
            want = expected.answer or ""
            text_correct = bool(text) and normalise_answer(text, grid) == normalise_answer(want, grid)
        ok = ok and text_correct

    image_score: AttributeScore | None = None
    detected: str | None = None
    if expected.output != "text":
        assert expected.target is not None, "an image turn always carries its target scene (see expected_turns)"
        images = reply.images
        found = detect(_fit_image(images[0], world), world) if images else Scene()
        image_score = score(found, expected.target)
        detected = describe(found, world) if images else None
        ok = ok and image_score.accuracy >= image_success_threshold - 1e-9

    return TurnScore(
        dialogue_id=expected.dialogue_id,
        index=expected.index,
        task=expected.task,
        distance=expected.distance,
        distractor=expected.distractor,
        expected_output=expected.output,
        predicted_output=predicted_output,
        intent=intent,
        text_metric=metric,
        text_correct=text_correct,
        caption_attr=caption_attr,
        image=image_score,
        success=bool(ok),
        expected_text=None if expected.answer is None else expected.answer[:_TEXT_SHOWN],
        predicted_text=reply.text[:_TEXT_SHOWN],
        detected=detected,
    )


# ---------------------------------------------------------------------------------------------------- aggregates
@dataclass
class MetricStat:
    """A running mean: ``total`` of the values and their ``count``; ``to_dict`` adds the mean's Wilson 95 % interval
    (``ci95``, issue 18)."""

    total: float = 0.0
    count: int = 0

    def add(self, value: float) -> None:
        self.total += float(value)
        self.count += 1

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def interval(self) -> Interval | None:
        """The Wilson 95 % interval of the mean (:func:`~.intervals.wilson`; conservative for partial credit)."""
        return wilson(min(max(self.total, 0.0), self.count), self.count) if self.count else None

    def to_dict(self) -> dict[str, Any]:
        ci = self.interval
        return {
            "mean": self.mean,
            "total": self.total,
            "count": self.count,
            "ci95": None if ci is None else ci.to_list(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricStat:
        return cls(total=float(d["total"]), count=int(d["count"]))


@dataclass
class Breakdown:
    """One :class:`MetricStat` per metric that at least one added turn had (keys in :data:`METRICS` order)."""

    stats: dict[str, MetricStat] = field(default_factory=dict)

    def add(self, turn: TurnScore) -> None:
        values = turn.values()
        for name in METRICS:
            if name in values:
                self.stats.setdefault(name, MetricStat()).add(values[name])
        self.stats = {k: self.stats[k] for k in METRICS if k in self.stats}

    def mean(self, metric: str) -> float | None:
        """The metric's mean, or None when no turn had it."""
        if metric not in METRICS:
            raise KeyError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
        stat = self.stats.get(metric)
        return None if stat is None else stat.mean

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() for k, v in self.stats.items()}

    @classmethod
    def merged(cls, parts: Iterable[Breakdown]) -> Breakdown:
        """One breakdown over the turns of all ``parts`` (totals and counts added, so means are turn-weighted)."""
        out = cls()
        for part in parts:
            for name, stat in part.stats.items():
                acc = out.stats.setdefault(name, MetricStat())
                acc.total += stat.total
                acc.count += stat.count
        out.stats = {k: out.stats[k] for k in METRICS if k in out.stats}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Breakdown:
        unknown = sorted(set(d) - set(METRICS))
        if unknown:
            raise ValueError(f"Breakdown.from_dict: unknown metrics {unknown}")
        return cls(stats={k: MetricStat.from_dict(d[k]) for k in METRICS if k in d})


def distance_order(key: str) -> tuple[int, int]:
    """Sort key of distance buckets: ``"none"`` first, then distances ascending."""
    return (0, 0) if key == "none" else (1, int(key))


@dataclass
class TurnAggregate:
    """Per-turn scores aggregated overall and broken down by distance (``"none"``, ``"0"``, ``"1"``, ...), by turn
    index (``"0"``, ``"1"``, ...) and by task."""

    overall: Breakdown = field(default_factory=Breakdown)
    by_distance: dict[str, Breakdown] = field(default_factory=dict)
    by_turn: dict[str, Breakdown] = field(default_factory=dict)
    by_task: dict[str, Breakdown] = field(default_factory=dict)

    @classmethod
    def from_turns(cls, turns: Iterable[TurnScore]) -> TurnAggregate:
        agg = cls()
        for t in turns:
            agg.overall.add(t)
            agg.by_distance.setdefault(t.distance_key, Breakdown()).add(t)
            agg.by_turn.setdefault(str(t.index), Breakdown()).add(t)
            agg.by_task.setdefault(t.task, Breakdown()).add(t)
        agg.by_distance = {k: agg.by_distance[k] for k in sorted(agg.by_distance, key=distance_order)}
        agg.by_turn = {k: agg.by_turn[k] for k in sorted(agg.by_turn, key=int)}
        agg.by_task = dict(sorted(agg.by_task.items()))
        return agg

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.to_dict(),
            "by_distance": {k: v.to_dict() for k, v in self.by_distance.items()},
            "by_turn": {k: v.to_dict() for k, v in self.by_turn.items()},
            "by_task": {k: v.to_dict() for k, v in self.by_task.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TurnAggregate:
        return cls(
            overall=Breakdown.from_dict(d["overall"]),
            by_distance={k: Breakdown.from_dict(v) for k, v in d["by_distance"].items()},
            by_turn={k: Breakdown.from_dict(v) for k, v in d["by_turn"].items()},
            by_task={k: Breakdown.from_dict(v) for k, v in d["by_task"].items()},
        )


@dataclass
class FreeRun:
    """One dialogue run free (the model's own replies stay in the history) until its first failed turn.

    Attributes:
        dialogue_id: the dialogue.
        num_turns: its number of assistant turns.
        turns: the scores of the turns played: all of them, or up to and including the first failure.
        first_failure: index of the first failed turn, or None when every turn succeeded.
    """

    dialogue_id: str
    num_turns: int
    turns: list[TurnScore] = field(default_factory=list)
    first_failure: int | None = None

    @property
    def survived(self) -> int:
        """Turns that succeeded before the first failure (``num_turns`` when none failed)."""
        return self.num_turns if self.first_failure is None else self.first_failure

    def to_dict(self) -> dict[str, Any]:
        return {
            "dialogue_id": self.dialogue_id,
            "num_turns": self.num_turns,
            "first_failure": self.first_failure,
            "turns": [t.to_dict() for t in self.turns],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FreeRun:
        return cls(
            dialogue_id=str(d["dialogue_id"]),
            num_turns=int(d["num_turns"]),
            turns=[TurnScore.from_dict(t) for t in d.get("turns", [])],
            first_failure=None if d.get("first_failure") is None else int(d["first_failure"]),
        )


@dataclass
class SuccessRates:
    """SR@k with stop at first failure (MSE-Bench / LME-Bench style, SPEC §7).

    ``sr_at_k[k]`` = among dialogues with at least ``k`` assistant turns (``dialogues_at_k[k]`` of them), the fraction
    whose first ``k`` turns all succeeded when run free (``successes_at_k[k]`` of them). ``first_failure`` counts
    dialogues by the index of their first failed turn (``"none"``: no failure); ``mean_survived`` is the mean number of
    turns before the first failure.

    **Intervals** (issue 18): each dialogue contributes exactly one success-or-failure to SR@k, and dialogues are
    independent draws, so the Wilson score interval of ``successes_at_k[k] / dialogues_at_k[k]`` (:meth:`interval`,
    ``ci95`` in JSON) is already a dialogue-level interval — a bootstrap over dialogues would estimate the same binomial
    spread. (The SR@k of one dialogue set at different k are nested, hence correlated with each other.)

    Example:
        >>> sr = SuccessRates.from_runs([FreeRun("a", 2), FreeRun("b", 2, first_failure=1)])
        >>> sr.sr_at_k[2], sr.successes_at_k[2], sr.dialogues_at_k[2]
        (0.5, 1, 2)
        >>> sr.interval(2).low < 0.5 < sr.interval(2).high
        True
    """

    sr_at_k: dict[int, float] = field(default_factory=dict)
    dialogues_at_k: dict[int, int] = field(default_factory=dict)
    first_failure: dict[str, int] = field(default_factory=dict)
    mean_survived: float = 0.0
    successes_at_k: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_runs(cls, runs: Sequence[FreeRun]) -> SuccessRates:
        if not runs:
            return cls()
        longest = max(r.num_turns for r in runs)
        out = cls()
        for k in range(1, longest + 1):
            eligible = [r for r in runs if r.num_turns >= k]
            out.dialogues_at_k[k] = len(eligible)
            out.successes_at_k[k] = sum(r.survived >= k for r in eligible)
            out.sr_at_k[k] = out.successes_at_k[k] / len(eligible)
        keys = ["none" if r.first_failure is None else str(r.first_failure) for r in runs]
        out.first_failure = {k: keys.count(k) for k in sorted(set(keys), key=distance_order)}
        out.mean_survived = sum(r.survived for r in runs) / len(runs)
        return out

    def interval(self, k: int) -> Interval | None:
        """The Wilson 95 % interval of SR@k (dialogues as the independent units); None when no dialogue reached k."""
        n = self.dialogues_at_k.get(k, 0)
        return wilson(self.successes_at_k.get(k, 0), n) if n else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sr_at_k": {str(k): v for k, v in self.sr_at_k.items()},
            "dialogues_at_k": {str(k): v for k, v in self.dialogues_at_k.items()},
            "successes_at_k": {str(k): v for k, v in self.successes_at_k.items()},
            "ci95": {str(k): ci.to_list() for k in self.sr_at_k if (ci := self.interval(k)) is not None},
            "first_failure": dict(self.first_failure),
            "mean_survived": self.mean_survived,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SuccessRates:
        sr = {int(k): float(v) for k, v in d["sr_at_k"].items()}
        n = {int(k): int(v) for k, v in d["dialogues_at_k"].items()}
        # reports written before successes_at_k was recorded: the counts follow from the rates
        succ = d.get("successes_at_k") or {str(k): round(sr[k] * n[k]) for k in sr}
        return cls(
            sr_at_k=sr,
            dialogues_at_k=n,
            first_failure={str(k): int(v) for k, v in d["first_failure"].items()},
            mean_survived=float(d["mean_survived"]),
            successes_at_k={int(k): int(v) for k, v in succ.items()},
        )
