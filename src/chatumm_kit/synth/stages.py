"""The three synthesis stages of SPEC §6, each a function from dialogue drafts to dialogue drafts.

A stage is any callable ``stage(draft, ctx) -> draft`` with a ``name``; it may raise
:class:`~.draft.DropDialogue` (or let an :class:`~.ops.OpFailed` escape) to drop the dialogue with a reason. The
pipeline runs them in order on an empty draft, so a user can run any prefix, or append a stage of their own.

1. :class:`ChainStage` — *stateful dialogues*: chains single-turn records so later turns act on earlier results
   (generate, then edit the result, then ask about it). Each next exchange either follows up on the image of the
   exchange just before (a record of the pool acting on that very image, or a question written by ``image2qa``) or
   starts fresh. Dataset text becomes user queries through ``caption2query``, ``edit2query``, ``vqa2query``,
   ``caption_request``.
2. :class:`DistractorStage` — *long-range dependency*: picks a turn that acts on the previous turn's image, inserts
   ``k`` unrelated exchanges before it (fresh pool records or ``make_distractor`` chat), and rewrites its query with
   ``query2dep_q`` so it names the earlier picture.
3. :class:`InterleaveStage` — *interleaved output*: when the final reply is an image, ``image2qa`` writes a question
   and answer about it; the query becomes ``<query-final> <Q>`` and the reply ``<image> <A>``.

Structural choices (next task, follow-up or fresh, ``k``, interleave or not) use the stage's prior weights times the
balancer's :class:`~.taxonomy.Steering`, so a run drifts toward the recipe's target mix without wasted calls.

Example:
    >>> stages = [ChainStage(turns=[2, 3]), DistractorStage(k=[0, 1, 2, 4, 8]), InterleaveStage(p=0.5)]
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from chatumm_kit.synth.draft import DialogueDraft, DropDialogue, Exchange, ExchangeTruth
from chatumm_kit.synth.ops import (
    Caption2QueryIn,
    CaptionRequestIn,
    Edit2QueryIn,
    Image2QAIn,
    MakeDistractorIn,
    Query2DepQIn,
    Vqa2QueryIn,
)
from chatumm_kit.synth.records import (
    CaptionRecord,
    ChatRecord,
    EditRecord,
    Record,
    TextToImageRecord,
    VQARecord,
)
from chatumm_kit.synth.runner import OpRunner
from chatumm_kit.synth.sources import RecordPool
from chatumm_kit.synth.taxonomy import Steering, Task, TaxonomyTargets

__all__ = [
    "Stage",
    "StageContext",
    "ChainStage",
    "DistractorStage",
    "InterleaveStage",
    "build_exchange",
    "TASK_OF_KIND",
    "DEFAULT_TOPICS",
]

TASK_OF_KIND: dict[str, Task] = {
    "t2i": Task.GENERATE,
    "edit": Task.EDIT,
    "vqa": Task.UNDERSTAND,
    "caption": Task.CAPTION,
    "chat": Task.CHAT,
}
_KIND_OF_TASK = {v: k for k, v in TASK_OF_KIND.items()}

DEFAULT_TOPICS: tuple[str, ...] = (
    "cooking",
    "arithmetic",
    "geography",
    "music",
    "astronomy",
    "gardening",
    "history",
    "sports",
    "grammar",
    "travel",
)


@dataclass
class StageContext:
    """What a stage may use besides the draft: the record pool, the operation runner, a private seeded RNG and the
    balancer's steering (frozen for the current shard)."""

    pool: RecordPool
    ops: OpRunner
    rng: random.Random
    steer: Steering = field(default_factory=lambda: Steering(targets=TaxonomyTargets(), shares={}))


@runtime_checkable
class Stage(Protocol):
    name: str

    def __call__(self, draft: DialogueDraft, ctx: StageContext) -> DialogueDraft: ...


def _choose(rng: random.Random, options: Sequence[Any], weights: Sequence[float]) -> Any:
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"no option has positive weight: {list(zip(options, weights))}")
    return rng.choices(list(options), weights=list(weights), k=1)[0]


def _truth(rec: Record) -> dict | None:
    return dict(rec.meta) if rec.meta else None


def _describe(draft: DialogueDraft, key: str) -> str:
    """What is known about a picture of the draft in words; ``""`` when nothing is (never its internal key: an LLM
    would put "img1" into the user's mouth)."""
    return draft.images[key].description or ""


def build_exchange(
    draft: DialogueDraft, ctx: StageContext, rec: Record, *, focus: str | None = None, distractor: bool = False
) -> Exchange:
    """Turn one record into an exchange of ``draft`` (registering its pictures).

    ``focus``: key of the earlier image the record acts on (a follow-up; its input image is not re-attached).
    """
    truth = _truth(rec)
    context = "previous" if focus else "uploaded"

    def input_image(ref_image) -> tuple[str, list[str]]:
        if focus is not None:
            return focus, []
        key = draft.add_image(
            ref_image, origin_role="uploaded", record=rec.id, description=ctx.pool.describe(ref_image)
        )
        return key, [key]

    if isinstance(rec, TextToImageRecord):
        q = ctx.ops.run("caption2query", Caption2QueryIn(caption=rec.caption, truth=truth))
        key = draft.add_image(rec.image, origin_role="generated", record=rec.id, description=rec.caption)
        return Exchange(
            task=Task.GENERATE,
            query=q.query,
            reply_image=key,
            record=rec.id,
            distractor=distractor,
            truth=ExchangeTruth(image=key, instruction=rec.caption, world=truth),
            ops=["caption2query"],
        )
    if isinstance(rec, EditRecord):
        src, uploads = input_image(rec.source)
        q = ctx.ops.run("edit2query", Edit2QueryIn(instruction=rec.instruction, context=context, truth=truth))
        desc = ctx.pool.describe(rec.target) or f"{_describe(draft, src) or 'a picture'}, edited: {rec.instruction}"
        key = draft.add_image(rec.target, origin_role="generated", record=rec.id, description=desc)
        return Exchange(
            task=Task.EDIT,
            query=q.query,
            user_images=uploads,
            reply_image=key,
            refers_to=focus,
            record=rec.id,
            distractor=distractor,
            truth=ExchangeTruth(image=key, instruction=rec.instruction, world=truth),
            ops=["edit2query"],
        )
    if isinstance(rec, VQARecord):
        src, uploads = input_image(rec.image)
        q = ctx.ops.run(
            "vqa2query", Vqa2QueryIn(question=rec.question, answer=rec.answer, context=context, truth=truth)
        )
        return Exchange(
            task=Task.UNDERSTAND,
            query=q.query,
            user_images=uploads,
            reply_text=rec.answer,
            refers_to=focus,
            record=rec.id,
            distractor=distractor,
            truth=ExchangeTruth(answer=rec.answer, question=rec.question, world=truth),
            ops=["vqa2query"],
        )
    if isinstance(rec, CaptionRecord):
        src, uploads = input_image(rec.image)
        q = ctx.ops.run("caption_request", CaptionRequestIn(context=context, truth=truth))
        return Exchange(
            task=Task.CAPTION,
            query=q.query,
            user_images=uploads,
            reply_text=rec.caption,
            refers_to=focus,
            record=rec.id,
            distractor=distractor,
            truth=ExchangeTruth(answer=rec.caption, world=truth),
            ops=["caption_request"],
        )
    if isinstance(rec, ChatRecord):
        return Exchange(
            task=Task.CHAT,
            query=rec.prompt,
            reply_text=rec.response,
            record=rec.id,
            distractor=distractor,
            truth=ExchangeTruth(answer=rec.response),
        )
    raise DropDialogue("unknown_record", f"{type(rec).__name__} {rec.id!r}")


class ChainStage:
    """Stage 1: chain records into a stateful dialogue of ``turns`` exchanges.

    Args:
        turns: ``[min, max]`` exchanges (inclusive), drawn uniformly.
        follow_prob: prior probability that an exchange follows up on the previous exchange's image (when one
            exists) rather than starting fresh.
        task_prior: prior weight per task name (``generate``, ``edit``, ``understand``, ``caption``, ``chat``);
            missing tasks weigh 1. Multiplied by the balancer's steering.
        qa_followups: when the data has no question about an image, let ``image2qa`` write one ("ask about it").
    """

    name = "chain"

    def __init__(
        self,
        *,
        turns: Sequence[int] = (2, 4),
        follow_prob: float = 0.7,
        task_prior: Mapping[str, float] | None = None,
        qa_followups: bool = True,
    ) -> None:
        lo, hi = (int(turns[0]), int(turns[1])) if len(turns) == 2 else (int(turns[0]), int(turns[0]))
        if not 1 <= lo <= hi:
            raise ValueError(f"ChainStage.turns must be [min, max] with 1 <= min <= max, got {list(turns)}")
        if not 0.0 <= follow_prob <= 1.0:
            raise ValueError(f"ChainStage.follow_prob must be in [0, 1], got {follow_prob}")
        self.turns = (lo, hi)
        self.follow_prob = follow_prob
        self.task_prior = {Task(k): float(v) for k, v in (task_prior or {}).items()}
        self.qa_followups = qa_followups

    def _prior(self, tasks: Sequence[Task]) -> list[float]:
        return [self.task_prior.get(t, 1.0) for t in tasks]

    def _follow_up(self, draft: DialogueDraft, ctx: StageContext, task: Task, focus: str) -> Exchange | None:
        ref = draft.images[focus].ref
        rec = ctx.pool.follow_up(_KIND_OF_TASK[task], ref, ctx.rng)
        if rec is not None:
            return build_exchange(draft, ctx, rec, focus=focus)
        if task is Task.UNDERSTAND and self.qa_followups:
            qa = ctx.ops.run(
                "image2qa", Image2QAIn(image=ref, description=draft.images[focus].description, truth=ref.truth)
            )
            return Exchange(
                task=Task.UNDERSTAND,
                query=qa.question,
                reply_text=qa.answer,
                refers_to=focus,
                truth=ExchangeTruth(answer=qa.answer, question=qa.question),
                ops=["image2qa"],
            )
        return None

    def _fresh(self, draft: DialogueDraft, ctx: StageContext, task: Task) -> Exchange | None:
        rec = ctx.pool.fresh(_KIND_OF_TASK[task], ctx.rng)
        return build_exchange(draft, ctx, rec) if rec is not None else None

    def next_exchange(self, draft: DialogueDraft, ctx: StageContext) -> Exchange:
        focus = draft.exchanges[-1].focus if draft.exchanges else None
        follow_tasks = [Task.EDIT, Task.UNDERSTAND, Task.CAPTION] if focus else []
        fresh_tasks = [TASK_OF_KIND[k] for k in sorted(ctx.pool.fresh_kinds()) if k in TASK_OF_KIND]
        order = ["none"]
        if follow_tasks:
            w = ctx.steer.weights("dependency", ["previous", "none"], [self.follow_prob, 1.0 - self.follow_prob])
            first = _choose(ctx.rng, ["previous", "none"], w) if sum(w) > 0 else "previous"
            order = [first, "none" if first == "previous" else "previous"]
        for mode in order:  # the chosen mode first; the other when the data has nothing for it
            tasks = follow_tasks if mode == "previous" else fresh_tasks
            while tasks:
                weights = ctx.steer.weights("task", [t.value for t in tasks], self._prior(tasks))
                if sum(weights) <= 0:
                    break
                task = _choose(ctx.rng, tasks, weights)
                ex = self._follow_up(draft, ctx, task, focus) if mode == "previous" else self._fresh(draft, ctx, task)
                if ex is not None:
                    return ex
                tasks = [t for t in tasks if t is not task]
        raise DropDialogue("chain_no_record", f"the pool has nothing to continue after {len(draft.exchanges)} turn(s)")

    def __call__(self, draft: DialogueDraft, ctx: StageContext) -> DialogueDraft:
        n = ctx.rng.randint(*self.turns)
        while len(draft.exchanges) < n:
            draft.exchanges.append(self.next_exchange(draft, ctx))
        draft.stages.append(self.name)
        return draft


class DistractorStage:
    """Stage 2: insert ``k`` unrelated exchanges before a turn that acts on the previous turn's image, and rewrite
    that turn's query with ``query2dep_q`` so it names the picture it means.

    Args:
        k: the distractor counts to choose from (``0`` = leave the dialogue as it is), e.g. ``[0, 1, 2, 4, 8]``.
        k_prior: prior weights of ``k`` (default uniform); multiplied by the balancer's ``distance`` steering.
        pool_fraction: share of distractors drawn as fresh pool records (pictures that compete for "the last
            image"); the rest are ``make_distractor`` text exchanges.
        topics: topics for ``make_distractor``.
    """

    name = "distractors"

    def __init__(
        self,
        *,
        k: Sequence[int] = (0, 1, 2, 4, 8),
        k_prior: Sequence[float] | None = None,
        pool_fraction: float = 0.5,
        topics: Sequence[str] = DEFAULT_TOPICS,
    ) -> None:
        self.k = [int(x) for x in k]
        if not self.k or any(x < 0 for x in self.k):
            raise ValueError(f"DistractorStage.k must be a non-empty list of counts >= 0, got {list(k)}")
        self.k_prior = list(k_prior) if k_prior is not None else [1.0] * len(self.k)
        if len(self.k_prior) != len(self.k):
            raise ValueError(f"DistractorStage.k_prior has {len(self.k_prior)} weights for {len(self.k)} values of k")
        if not 0.0 <= pool_fraction <= 1.0:
            raise ValueError(f"DistractorStage.pool_fraction must be in [0, 1], got {pool_fraction}")
        self.pool_fraction = pool_fraction
        self.topics = list(topics)

    def make_distractor(self, draft: DialogueDraft, ctx: StageContext, i: int) -> Exchange:
        # One choice among the pool's kinds and "small talk" (``None``): prior pool_fraction vs the rest, steered.
        fresh = [k for k in sorted(ctx.pool.fresh_kinds()) if k in TASK_OF_KIND]
        options: list[str | None] = [*fresh, None]
        prior = [self.pool_fraction / len(fresh)] * len(fresh) + [1.0 - self.pool_fraction] if fresh else [1.0]
        names = [TASK_OF_KIND[k].value if k else Task.CHAT.value for k in options]
        kind = _choose(ctx.rng, options, ctx.steer.weights("task", names, prior))
        if kind is not None:
            rec = ctx.pool.fresh(kind, ctx.rng)
            if rec is not None:
                return build_exchange(draft, ctx, rec, distractor=True)
        topic = ctx.rng.choice(self.topics) if self.topics else "general knowledge"
        avoid = tuple(e.description for e in draft.images.values() if e.description)
        qa = ctx.ops.run(
            "make_distractor", MakeDistractorIn(topic=topic, avoid=avoid, seed=ctx.rng.randrange(1 << 30), truth=None)
        )
        return Exchange(
            task=Task.CHAT,
            query=qa.question,
            reply_text=qa.answer,
            distractor=True,
            truth=ExchangeTruth(answer=qa.answer, question=qa.question),
            ops=["make_distractor"],
        )

    def rewrite(self, draft: DialogueDraft, ctx: StageContext, j: int) -> None:
        """Rewrite exchange ``j``'s query so it names the picture it refers to."""
        ex = draft.exchanges[j]
        assert ex.refers_to is not None
        target = draft.images[ex.refers_to]
        others = [k for k in draft.history_keys(j) if k != ex.refers_to]
        truth = None
        if target.ref.truth is not None:
            truth = {
                "task": ex.task.value,
                "instruction": ex.truth.instruction,
                "question": ex.truth.question,
                "target": target.ref.truth,
                "others": [draft.images[k].ref.truth for k in others],
                "position": draft.history_keys(j).index(ex.refers_to),
            }
        described = _describe(draft, ex.refers_to)
        q = ctx.ops.run(
            "query2dep_q",
            Query2DepQIn(
                query=ex.query,
                target=described,
                others=tuple(d for d in (_describe(draft, k) for k in others) if d),
                distance=draft.distance(j) or 0,
                truth=truth,
                target_image=None if described else target.ref,  # no words for it: the model sees the picture
            ),
        )
        ex.query = q.query
        ex.ops.append("query2dep_q")

    def __call__(self, draft: DialogueDraft, ctx: StageContext) -> DialogueDraft:
        draft.stages.append(self.name)
        edges = [j for j, ex in enumerate(draft.exchanges) if ex.refers_to and draft.distance(j) == 0]
        if not edges:
            return draft
        weights = ctx.steer.weights("distance", [str(k) for k in self.k], self.k_prior)
        k = _choose(ctx.rng, self.k, weights)
        if k == 0:
            return draft
        j = ctx.rng.choice(edges)
        inserted = [self.make_distractor(draft, ctx, i) for i in range(k)]
        draft.exchanges[j:j] = inserted
        draft.distractors += k
        self.rewrite(draft, ctx, j + k)
        return draft


class InterleaveStage:
    """Stage 3: with probability ``p`` (times the ``output`` steering), make a final image reply interleaved: the
    query gains the question ``image2qa`` wrote about the final image, the reply gains its answer after the image.
    """

    name = "interleave"

    def __init__(self, *, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"InterleaveStage.p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, draft: DialogueDraft, ctx: StageContext) -> DialogueDraft:
        draft.stages.append(self.name)
        if not draft.exchanges:
            return draft
        last = draft.exchanges[-1]
        if last.reply_image is None or last.reply_text:
            return draft
        w = ctx.steer.weights("output", ["interleaved", "image"], [self.p, 1.0 - self.p])
        if _choose(ctx.rng, [True, False], w) is False:
            return draft
        entry = draft.images[last.reply_image]
        qa = ctx.ops.run("image2qa", Image2QAIn(image=entry.ref, description=entry.description, truth=entry.ref.truth))
        last.query = f"{last.query} {qa.question}"
        last.reply_text = qa.answer
        last.truth.question = qa.question
        last.truth.answer = qa.answer
        last.ops.append("image2qa")
        draft.interleaved = True
        return draft
