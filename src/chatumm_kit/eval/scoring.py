"""The one scoring interface of ``eval/``: a :class:`TurnScorer` turns replies into :class:`~.metrics.TurnScore` s.

Every benchmark in the kit is a replay of exchanges (:class:`~.benchmark.DialogueReplay`: a user turn in, a model
reply out, teacher-forced or free-running) plus a scorer, plus the aggregation its published rules ask for:

* :class:`ShapesExactScorer` — the exact ShapesChat scoring (:func:`~.metrics.score_turn`: intent, VQA, captions,
  generated images through the detector), judge-free;
* :class:`JudgedReplyScorer` — any dialogue: intent exactly (the reply's modality against the reference turn's),
  reply quality by the judge (prompt ``reply_quality``) against the reference turn and the history;
* :class:`JudgedEditScorer` (GEdit-style) and :class:`JudgedPromptScorer` (text-to-image prompt adherence);
* the understanding benchmarks' answer scorers (:mod:`.understanding`).

A scorer sees a batch of :class:`ScoreRequest` s at once (every turn of a lockstep group, teacher-forced; one exchange
of each running dialogue, free-running), so a judged scorer asks for all their verdicts in parallel.

Judged metrics (:data:`~.metrics.JUDGED_METRICS`) are the judge's integer scores divided by their maximum (10), so
they live in [0, 1] beside the exact ones. A turn without a verdict (every answer unparseable, or the backend
unreachable) has no judged score — none is guessed — counts 1 in ``judge_failed`` and is not a success.

Example:
    >>> scorer = ShapesExactScorer(world=WorldConfig())                                        # doctest: +SKIP
    >>> scorer.score_many([ScoreRequest(expected=turn, reply=Reply(parts=["red"]))])[0].success  # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from chatumm_kit.data.dialogue import Role
from chatumm_kit.data.shapes import WorldConfig
from chatumm_kit.eval.judge import Content, Judge, Verdict, judge_picture
from chatumm_kit.eval.metrics import TurnScore, score_turn
from chatumm_kit.eval.turns import ExpectedTurn, Part, Reply
from chatumm_kit.synth.records import ImageRef

__all__ = [
    "ScoreRequest",
    "TurnScorer",
    "ShapesExactScorer",
    "JudgedReplyScorer",
    "JudgedEditScorer",
    "JudgedPromptScorer",
    "judge_parts",
    "TEXT_SHOWN",
]

TEXT_SHOWN = 200
"""Characters of predicted / expected text kept per turn in a report."""

History = tuple[tuple[Role, tuple[Part, ...]], ...]


@dataclass(frozen=True)
class ScoreRequest:
    """One reply to score.

    Attributes:
        expected: the exchange (its user turn, reference reply, tags, ground truth if any).
        reply: what the model answered.
        history: the conversation before the exchange's user turn, as the model saw it: ``(role, parts)`` pairs
            (teacher-forced: the true turns; free-running: the model's own replies).
    """

    expected: ExpectedTurn
    reply: Reply
    history: History = ()


@runtime_checkable
class TurnScorer(Protocol):
    """Scores replies: one :class:`~.metrics.TurnScore` per request, in order."""

    def score_many(self, requests: Sequence[ScoreRequest]) -> list[TurnScore]: ...


def _base(expected: ExpectedTurn, reply: Reply, **fields) -> TurnScore:
    """A :class:`TurnScore` with the turn's identity, its intent and its texts; ``fields`` fill the rest."""
    values = dict(
        dialogue_id=expected.dialogue_id,
        index=expected.index,
        task=expected.task,
        distance=expected.distance,
        distractor=expected.distractor,
        expected_output=expected.output,
        predicted_output=reply.modality,
        intent=reply.modality == expected.output,
        text_metric=None,
        text_correct=None,
        caption_attr=None,
        image=None,
        success=False,
        expected_text=None if expected.answer is None else expected.answer[:TEXT_SHOWN],
        predicted_text=reply.text[:TEXT_SHOWN],
    )
    values.update(fields)
    return TurnScore(**values)


class ShapesExactScorer:
    """The exact ShapesChat scoring (:func:`~.metrics.score_turn`); the history is not needed.

    Args:
        world: the world whose detector reads generated pictures.
        image_success_threshold: attribute accuracy an image needs to count as a success.
    """

    def __init__(self, *, world: WorldConfig, image_success_threshold: float = 1.0) -> None:
        self.world = world
        self.image_success_threshold = image_success_threshold

    def score_many(self, requests: Sequence[ScoreRequest]) -> list[TurnScore]:
        return [
            score_turn(
                expected=r.expected,
                reply=r.reply,
                world=self.world,
                image_success_threshold=self.image_success_threshold,
            )
            for r in requests
        ]


def judge_parts(parts: Sequence[Part], *, empty: str = "(nothing)") -> list[str | ImageRef]:
    """A turn's parts as judge content: texts as they are, pictures as :func:`~.judge.judge_picture` refs."""
    out: list[str | ImageRef] = []
    for p in parts:
        if isinstance(p, torch.Tensor):
            out += ["\n", judge_picture(p), "\n"]
        else:
            out.append(p)
    return out or [empty]


class _JudgedScorer:
    """Asks the judge about every request at once; subclasses say what to show it and what its scores mean."""

    prompt_name: str = ""

    def __init__(self, *, judge: Judge, prompt: str | None = None, success_score: int = 7) -> None:
        self.judge = judge
        self.prompt = judge.prompt(prompt or self.prompt_name)
        self.success_score = success_score

    def content(self, request: ScoreRequest) -> Content | None:
        """What the judge sees, or None when the reply can be scored without it (see subclasses)."""
        raise NotImplementedError

    def metrics(self, request: ScoreRequest, verdict: Verdict | None) -> tuple[dict[str, float], bool]:
        """The turn's judged metrics and whether it succeeded."""
        raise NotImplementedError

    def score_many(self, requests: Sequence[ScoreRequest]) -> list[TurnScore]:
        contents = [self.content(r) for r in requests]
        asked = [i for i, c in enumerate(contents) if c is not None]
        verdicts: list[Verdict | None] = [None] * len(requests)
        for i, v in zip(asked, self.judge.verdicts(self.prompt, [contents[i] for i in asked])):
            verdicts[i] = v
        out = []
        for r, v in zip(requests, verdicts):
            if v is not None and not v.ok:
                judged, success = {"judge_failed": 1.0}, False  # nothing guessed: no score, not a success
            else:
                judged, success = self.metrics(r, v)
                judged["judge_failed"] = 0.0
            out.append(
                _base(
                    r.expected,
                    r.reply,
                    success=bool(success),
                    judged=judged,
                    verdict=None if v is None else v.to_dict(),
                )
            )
        return out


class JudgedReplyScorer(_JudgedScorer):
    """Intent exactly, reply quality by the judge against the reference turn and the history.

    ``reply_quality`` = the judge's ``score`` / 10; a turn succeeds when its intent is right and the score is at least
    ``success_score`` (free-running dialogues stop at the first turn that does not).

    Args:
        judge: the judge.
        prompt: a judge prompt with one score named ``score`` (default the packaged ``reply_quality``).
        success_score: the lowest score that counts as a success.
        max_history_turns: the last this many turns of the history are shown (earlier ones are said to be omitted).
    """

    prompt_name = "reply_quality"

    def __init__(
        self, *, judge: Judge, prompt: str | None = None, success_score: int = 7, max_history_turns: int = 8
    ) -> None:
        super().__init__(judge=judge, prompt=prompt, success_score=success_score)
        self.max_history_turns = max_history_turns

    def content(self, request: ScoreRequest) -> Content:
        history = request.history[-self.max_history_turns :] if self.max_history_turns else ()
        shown: list[str | ImageRef] = []
        skipped = len(request.history) - len(history)
        if skipped:
            shown.append(f"({skipped} earlier turns omitted)\n")
        for role, parts in history:
            shown += [f"{role.value.capitalize()}: ", *judge_parts(parts), "\n"]
        return self.prompt.render(
            {
                "history": shown or ["(none: this is the first turn)"],
                "user": judge_parts(request.expected.user),
                "reference": judge_parts(request.expected.reply, empty="(empty)"),
                "candidate": judge_parts(request.reply.parts, empty="(empty reply)"),
            }
        )

    def metrics(self, request: ScoreRequest, verdict: Verdict | None) -> tuple[dict[str, float], bool]:
        assert verdict is not None and verdict.scores is not None
        score = verdict.scores["score"]
        top = self.prompt.scores["score"][1]
        intent = request.reply.modality == request.expected.output
        return {"reply_quality": score / top}, intent and score >= self.success_score


def _first_picture(parts: Sequence[Part]) -> torch.Tensor | None:
    return next((p for p in parts if isinstance(p, torch.Tensor)), None)


def _words(parts: Sequence[Part]) -> str:
    return " ".join(p for p in parts if isinstance(p, str)).strip()


class JudgedEditScorer(_JudgedScorer):
    """GEdit-style scoring of an instruction-guided edit (GEdit-Bench, Step1X-Edit arXiv:2504.17761; VIEScore,
    arXiv:2312.14867): the judge sees the source picture (the user turn's first), the instruction (the user turn's
    words) and the edited picture (the reply's first) and gives ``semantic_consistency`` and ``perceptual_quality``
    0–10. ``edit_semantic`` and ``edit_quality`` are those / 10 and ``edit_overall`` = sqrt(SC × PQ) / 10, VIEScore's
    overall score. A reply without a picture did no edit: 0 on all three, and the judge is not asked. A turn succeeds
    when its semantic consistency reaches ``success_score``.
    """

    prompt_name = "gedit"

    def content(self, request: ScoreRequest) -> Content | None:
        edited = _first_picture(request.reply.parts)
        source = _first_picture(request.expected.user)
        if edited is None:
            return None
        if source is None:
            raise ValueError(f"{request.expected.dialogue_id}: an edit item needs an input picture in its user turn")
        return self.prompt.render(
            {
                "source": ["\n", judge_picture(source)],
                "instruction": _words(request.expected.user),
                "edited": ["\n", judge_picture(edited)],
            }
        )

    def metrics(self, request: ScoreRequest, verdict: Verdict | None) -> tuple[dict[str, float], bool]:
        if verdict is None:
            return {"edit_semantic": 0.0, "edit_quality": 0.0, "edit_overall": 0.0}, False
        assert verdict.scores is not None
        sc, pq = verdict.scores["semantic_consistency"], verdict.scores["perceptual_quality"]
        top = self.prompt.scores["semantic_consistency"][1]
        return {
            "edit_semantic": sc / top,
            "edit_quality": pq / top,
            "edit_overall": math.sqrt(sc * pq) / top,
        }, sc >= self.success_score


class JudgedPromptScorer(_JudgedScorer):
    """Prompt adherence of a generated picture (text-to-image): the judge sees the prompt (the user turn's words) and
    the reply's first picture and gives ``score`` 0–10; ``t2i_adherence`` = score / 10. A reply without a picture
    scores 0 and the judge is not asked. A turn succeeds when the score reaches ``success_score``."""

    prompt_name = "t2i_adherence"

    def content(self, request: ScoreRequest) -> Content | None:
        image = _first_picture(request.reply.parts)
        if image is None:
            return None
        return self.prompt.render({"prompt": _words(request.expected.user), "image": ["\n", judge_picture(image)]})

    def metrics(self, request: ScoreRequest, verdict: Verdict | None) -> tuple[dict[str, float], bool]:
        if verdict is None:
            return {"t2i_adherence": 0.0}, False
        assert verdict.scores is not None
        score = verdict.scores["score"]
        return {"t2i_adherence": score / self.prompt.scores["score"][1]}, score >= self.success_score
