"""The replay of dialogues (:class:`DialogueReplay`) and its exact instance, the multi-turn context-tracking benchmark
on held-out ShapesChat dialogues (:class:`ContextTrackingBenchmark`; SPEC §7, ARCHITECTURE.md).

:class:`DialogueReplay` runs the protocol below over any exchanges with any :class:`~.scoring.TurnScorer`: the
ShapesChat benchmark uses the exact :class:`~.scoring.ShapesExactScorer`; the judged multi-turn benchmark on your own
dialogues (:class:`~.tasks.DialogueBench`) uses :class:`~.scoring.JudgedReplyScorer`; the single-turn benchmarks of
:mod:`.tasks` replay one-exchange items. Under teacher forcing the replies of a lockstep group are scored together
when the group is done (a judge is then asked about them in parallel); free-running, each exchange's replies are
scored at once, since the next exchange depends on them. (Teacher-forced groups are scored in a background thread
while the model replies to the next group.)

**Data.** Dialogues from the synthesis pipeline with held-out phrasings, task seeds no training recipe uses, and
chains longer than any training dialogue (``recipes/shapes/eval.yaml``). Every assistant turn carries its ground
truth and its taxonomy tags (``synth/draft.py``); :func:`~.turns.expected_turns` reads them.

**Protocol.** Each model is wrapped as a :class:`~.responders.Responder` and run twice over the same dialogues, in
file order (the first ``max_dialogues``):

1. *Teacher-forced history* — per dialogue, walk the exchanges in order: add the true user turn, let the model
   ``respond``, score the reply (the scorer; here :func:`~.metrics.score_turn`), then ``retract`` it and add the
   **true** assistant turn (its true images as pixels) before the next exchange. Every turn is thus scored on its own, conditioned on
   the correct history, which is what makes accuracy *by dependency distance* meaningful (a failure at distance 8 is
   a failure to use a picture 8 unrelated exchanges back, not the echo of an earlier mistake). Aggregated overall,
   by distance (``none``, 0, 1, 2, 4, 8 — the ``distance`` tag), by turn index and by task.
2. *Free running* — the model's own replies stay in the history; a dialogue stops at its first failed turn
   (``success`` false). SR@k = among dialogues with at least k assistant turns, the fraction whose first k turns all
   succeed (:class:`~.metrics.SuccessRates`). With the default ``image_success_threshold = 1.0`` a surviving
   history's generated pictures are exactly the true scenes, so the ground truth of later turns stays valid.

**Batching.** A model (a :class:`~.responders.ChatSessionResponder`) runs ``batch_size`` dialogues in lockstep in
both protocols: exchange ``j`` of every dialogue in the group is replied to together, one model forward per decoding
or Euler step for all of them; dialogues that end (or fail, when free running) drop out. Each dialogue gets exactly
the turns, seeds and history it would get alone.

**Determinism.** Replies are decoded greedily by default; the image noise of the reply to exchange ``i`` of
dialogue ``d`` is seeded with ``crc32(f"{seed}:{d}:{i}")``, the same in both modes (so exchange 0 gets the same reply
in both). The same seed, data and weights give the same report.

Example:
    >>> report = run_benchmark(models={"multi_turn": "runs/shapes/chat_tiny/checkpoints/last.ckpt"},
    ...                        shards="runs/shapes/eval_data/index.json",
    ...                        settings=BenchmarkSettings(max_dialogues=100))            # doctest: +SKIP
    >>> report.write("runs/shapes/eval")                                                # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import DialogueSample, Role
from chatumm_kit.data.shapes import WorldConfig
from chatumm_kit.eval.metrics import FreeRun, TurnScore
from chatumm_kit.eval.report import BenchmarkReport, DatasetSummary, ModelReport
from chatumm_kit.eval.responders import ChatSessionResponder, ReplySettings, Responder
from chatumm_kit.eval.scoring import ScoreRequest, ShapesExactScorer, TurnScorer
from chatumm_kit.eval.turn_filter import TurnFilter
from chatumm_kit.eval.turns import ExpectedTurn, Part, Reply, expected_turns
from chatumm_kit.model import ChatUMM
from chatumm_kit.training.loading import LoadedModel, load_checkpoint

__all__ = [
    "BenchmarkSettings",
    "ModelSource",
    "DialogueReplay",
    "ScoredTurn",
    "ContextTrackingBenchmark",
    "run_benchmark",
    "ModelLike",
]

DEFAULT_BATCH_SIZE = 8
"""Dialogues run in lockstep by default. Measured on CPU (1 thread): ``benchmarks/bench_sessions.py`` has 8 tiny-model
sessions reply about 2.5× faster together than one by one; the teacher-forced pass over 16 held-out
dialogues at ``shapes/chat_tiny`` width took 26.9 s one by one, 15.3 s at 4, 11.3 s at 8 and 10.8 s at 16."""


@dataclass(frozen=True, kw_only=True)
class BenchmarkSettings:
    """Settings of a benchmark run.

    Attributes:
        max_dialogues: evaluate the first N dialogues of the shards (None: all).
        seed: seeds the per-turn image noise (see the module docstring).
        reply: how models reply (token caps, decoding, image sampler).
        image_success_threshold: attribute accuracy an image needs to count as a success (1.0: all attributes).
        batch_size: dialogues a :class:`~.responders.ChatSessionResponder` runs in lockstep, one model forward per
            decoding / Euler step for all of them (``inference/batch.py``); 1 runs them one by one. It changes the
            speed, not the report (so the report does not record it); other responders always run one by one.
        turns: score only the turns this :class:`~.turn_filter.TurnFilter` selects (teacher-forced; the other
            exchanges are prefilled with the truth, the free-running pass is left out); None: every turn, both
            protocols. ``TurnFilter(min_distance=2)`` is the cheap headline evaluation: the ``history_*_d2plus``
            cells come out exactly as in the full run.

    Example:
        >>> BenchmarkSettings(max_dialogues=10).to_dict()["max_dialogues"]
        10
    """

    max_dialogues: int | None = None
    seed: int = 0
    reply: ReplySettings = field(default_factory=ReplySettings)
    image_success_threshold: float = 1.0
    batch_size: int = DEFAULT_BATCH_SIZE
    turns: TurnFilter | None = None

    def __post_init__(self) -> None:
        if self.max_dialogues is not None and self.max_dialogues < 1:
            raise ValueError(f"BenchmarkSettings.max_dialogues must be >= 1 or None, got {self.max_dialogues}")
        if not 0.0 < self.image_success_threshold <= 1.0:
            raise ValueError(
                f"BenchmarkSettings.image_success_threshold must be in (0, 1], got {self.image_success_threshold}"
            )
        if self.batch_size < 1:
            raise ValueError(f"BenchmarkSettings.batch_size must be >= 1, got {self.batch_size}")
        if self.turns is not None and not isinstance(self.turns, TurnFilter):
            raise TypeError(f"BenchmarkSettings.turns must be a TurnFilter or None, got {type(self.turns).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The settings that decide the results (``batch_size`` only changes the speed and is left out)."""
        out = {
            "max_dialogues": self.max_dialogues,
            "seed": self.seed,
            "reply": self.reply.to_dict(),
            "image_success_threshold": self.image_success_threshold,
            **({"turns": self.turns.to_dict()} if self.turns is not None else {}),  # unfiltered reports as before
        }
        return json.loads(json.dumps(out))  # tuples → lists, as the JSON report holds them


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """A model to evaluate, by checkpoint (see :func:`~chatumm_kit.training.loading.load_checkpoint` for the arguments)."""

    checkpoint: str
    use_ema: bool | None = None
    tokenizer: str | None = None
    spec_overrides: dict[str, Any] | None = None

    def load(self) -> LoadedModel:
        return load_checkpoint(
            self.checkpoint, use_ema=self.use_ema, tokenizer=self.tokenizer, spec_overrides=self.spec_overrides
        )


ModelLike = Responder | ModelSource | LoadedModel | str | Path | tuple[ChatUMM, ChatTokenizer]
"""What :func:`run_benchmark` accepts per model: a responder, a checkpoint (source or path), or a loaded model."""


def _as_responder(name: str, value: Any, world: WorldConfig, reply: ReplySettings) -> tuple[Responder, dict]:
    """Turn one entry of ``models`` into a responder and a description of its source for the report."""
    if isinstance(value, str | Path):
        value = ModelSource(checkpoint=str(value))
    if isinstance(value, ModelSource):
        loaded = value.load()
        source = {"kind": "checkpoint", "checkpoint": loaded.checkpoint, "ema": loaded.ema}
        return ChatSessionResponder.from_model(loaded.model, loaded.tokenizer, world=world, settings=reply), source
    if isinstance(value, LoadedModel):
        source = {"kind": "checkpoint", "checkpoint": value.checkpoint, "ema": value.ema}
        return ChatSessionResponder.from_model(value.model, value.tokenizer, world=world, settings=reply), source
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], ChatUMM):
        model, tok = value
        return ChatSessionResponder.from_model(model, tok, world=world, settings=reply), {"kind": "model"}
    if isinstance(value, Responder):
        return value, {"kind": "responder", "type": type(value).__name__}
    raise TypeError(
        f"models[{name!r}]: expected a checkpoint path, a ModelSource, a LoadedModel, a (ChatUMM, ChatTokenizer) "
        f"pair or a Responder, got {type(value).__name__}"
    )


@dataclass(frozen=True)
class ScoredTurn:
    """A scored reply with what it was scored on (for reports that show replies: :mod:`.html`)."""

    request: ScoreRequest
    score: TurnScore


class DialogueReplay:
    """The replay protocol (module docstring) over any exchanges and any :class:`~.scoring.TurnScorer`.

    Args:
        expected: per dialogue, its exchanges in order (:func:`~.turns.expected_turns` for ShapesChat,
            :func:`~.turns.reference_turns` for any dialogue, one-exchange items for single-turn benchmarks).
        scorer: scores the replies.
        seed: seeds each reply (:meth:`turn_seed`).
        batch_size: dialogues a :class:`~.responders.ChatSessionResponder` runs in lockstep (speed only).
        turns: teacher forcing asks only about the turns this filter selects; every other exchange is prefilled with
            its true user and assistant turns (:mod:`.turn_filter`). None: every turn.

    Raises:
        ValueError: there are no dialogues, or a dialogue has no exchange.
    """

    def __init__(
        self,
        *,
        expected: Sequence[Sequence[ExpectedTurn]],
        scorer: TurnScorer,
        seed: int = 0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        turns: TurnFilter | None = None,
    ) -> None:
        self.expected: list[list[ExpectedTurn]] = [list(e) for e in expected]
        if not self.expected:
            raise ValueError(f"{type(self).__name__}: no dialogues to evaluate")
        empty = [i for i, e in enumerate(self.expected) if not e]
        if empty:
            raise ValueError(f"{type(self).__name__}: dialogues {empty[:5]} have no user/assistant exchange")
        self.scorer = scorer
        self.seed = seed
        self.batch_size = batch_size
        self.turns = turns

    def turn_seed(self, dialogue_id: str, index: int) -> int:
        """The seed of the reply to exchange ``index`` of ``dialogue_id`` (stable across runs and processes)."""
        return zlib.crc32(f"{self.seed}:{dialogue_id}:{index}".encode()) & 0x7FFFFFFF

    def teacher_forced(self, responder: Responder, *, progress: bool = False) -> list[TurnScore]:
        """Score every assistant turn with the true history before it."""
        return [t.score for t in self.teacher_forced_turns(responder, progress=progress)]

    def teacher_forced_turns(self, responder: Responder, *, progress: bool = False) -> list[ScoredTurn]:
        """:meth:`teacher_forced` with each score's request (its reply and history). The replies of a lockstep group
        are scored together once the group is done (a judge is then asked about all of them in parallel)."""

        def replace_reply(member: Responder, e: ExpectedTurn, reply: Reply, last: bool) -> list[Part]:
            if not last:  # the last reply needs no true replacement
                member.retract()
                member.add_turn(Role.ASSISTANT, e.reply)
            return e.reply

        per_dialogue = self._replay(responder, keep=replace_reply, stop_at_failure=False, desc="teacher-forced",
                                    progress=progress, asked=self.turns)  # fmt: skip
        return [t for turns in per_dialogue for t in turns]

    def free_running(self, responder: Responder, *, progress: bool = False) -> list[FreeRun]:
        """Run every dialogue with the model's own replies in the history, stopping at its first failure."""
        return [run for run, _ in self.free_running_turns(responder, progress=progress)]

    def free_running_turns(
        self, responder: Responder, *, progress: bool = False
    ) -> list[tuple[FreeRun, list[ScoredTurn]]]:
        """:meth:`free_running` with each dialogue's scored turns (replies and histories)."""

        def keep_own(member: Responder, e: ExpectedTurn, reply: Reply, last: bool) -> list[Part]:
            return reply.parts

        per_dialogue = self._replay(responder, keep=keep_own, stop_at_failure=True, desc="free-running",
                                    progress=progress)  # fmt: skip
        out = []
        for turns, scored in zip(self.expected, per_dialogue):
            run = FreeRun(dialogue_id=turns[0].dialogue_id, num_turns=len(turns))
            run.turns.extend(t.score for t in scored)
            if not scored[-1].score.success:
                run.first_failure = scored[-1].score.index
            out.append((run, scored))
        return out

    def _replay(
        self,
        responder: Responder,
        *,
        keep: Callable[[Responder, ExpectedTurn, Reply, bool], list[Part]],
        stop_at_failure: bool,
        desc: str,
        progress: bool,
        asked: TurnFilter | None = None,
    ) -> list[list[ScoredTurn]]:
        """Every dialogue exchange by exchange: add the true user turn, reply, then ``keep(responder, expected, reply,
        is_last)`` leaves the history as the protocol wants it and returns the assistant turn now in it. With
        ``asked``, only the exchanges it selects are replied to; the others get their true assistant turn added
        (prefilled), a dialogue ends after its last selected exchange and one with none is skipped. With
        ``stop_at_failure`` each exchange's replies are scored at once and a dialogue stops at its first failure;
        otherwise the group's replies are scored together once it is done, in a background thread while the model
        replies to the next group (a judge's latency overlaps the model's work). Returns the scored turns per
        dialogue, in order.

        A :class:`ChatSessionResponder` runs ``batch_size`` dialogues in lockstep (itself plus partners from
        :meth:`~.responders.ChatSessionResponder.spawn`), every exchange's replies together; a dialogue that ends drops
        out. Each dialogue sees exactly the calls it would see alone, so the scores are the same.
        """
        from tqdm.auto import tqdm

        together = isinstance(responder, ChatSessionResponder) and self.batch_size > 1
        size = self.batch_size if together else 1
        dialogues = self.expected
        if asked is not None:  # each dialogue up to its last selected exchange; dialogues without one are skipped
            last = [max((i for i, e in enumerate(d) if asked.selects(e)), default=-1) for d in dialogues]
            dialogues = [d[: n + 1] for d, n in zip(dialogues, last) if n >= 0]
        team: list[Responder] = [responder]
        results: list[list[ScoredTurn]] = []
        later: list[tuple[list[list[ScoreRequest]], Future]] = []  # teacher-forced groups being scored
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring") as scoring,
            tqdm(total=len(dialogues), desc=desc, unit="dlg", disable=not progress) as bar,
        ):
            for start in range(0, len(dialogues), size):
                group = dialogues[start : start + size]
                while len(team) < len(group):
                    team.append(responder.spawn())  # type: ignore[attr-defined]  (together: a ChatSessionResponder)
                histories: list[list[tuple[Role, tuple[Part, ...]]]] = [[] for _ in group]
                requests: list[list[ScoreRequest]] = [[] for _ in group]
                scored: list[list[ScoredTurn]] = [[] for _ in group]
                for member, turns in zip(team, group):
                    member.start(turns[0].dialogue_id)
                active, j = list(range(len(group))), 0
                while active:
                    for d in active:
                        e = group[d][j]
                        for text in e.system:  # instructions before the request (SPEC §4.1), never replied to
                            team[d].add_turn(Role.SYSTEM, [text])
                            histories[d].append((Role.SYSTEM, (text,)))
                        team[d].add_turn(Role.USER, e.user)
                    if asked is not None:  # the exchanges not asked about: their true reply, prefilled
                        for d in [d for d in active if not asked.selects(group[d][j])]:
                            e = group[d][j]
                            team[d].add_turn(Role.ASSISTANT, e.reply)
                            histories[d] += [(Role.USER, tuple(e.user)), (Role.ASSISTANT, tuple(e.reply))]
                        replying = [d for d in active if asked.selects(group[d][j])]
                    else:
                        replying = active
                    exchange = [group[d][j] for d in replying]
                    seeds = [self.turn_seed(e.dialogue_id, e.index) for e in exchange]
                    if together:
                        replies = ChatSessionResponder.respond_together([team[d] for d in replying], seeds=seeds)
                    else:
                        replies = [team[d].respond(seed=seed) for d, seed in zip(replying, seeds)]
                    now = []
                    for d, e, reply in zip(replying, exchange, replies):
                        now.append(ScoreRequest(expected=e, reply=reply, history=tuple(histories[d])))
                        last = j + 1 == len(group[d])
                        kept = keep(team[d], e, reply, last)
                        histories[d] += [(Role.USER, tuple(e.user)), (Role.ASSISTANT, tuple(kept))]
                    if stop_at_failure:
                        scores = self.scorer.score_many(now)
                        for d, r, s in zip(replying, now, scores):
                            scored[d].append(ScoredTurn(request=r, score=s))
                        still = [d for d, s in zip(replying, scores) if s.success and j + 1 < len(group[d])]
                    else:
                        for d, r in zip(replying, now):
                            requests[d].append(r)
                        still = [d for d in active if j + 1 < len(group[d])]
                    active, j = still, j + 1
                if stop_at_failure:
                    results.extend(scored)
                else:  # scored in the background while the model replies to the next group
                    later.append((requests, scoring.submit(self.scorer.score_many, [r for rs in requests for r in rs])))
                bar.update(len(group))
            for requests, future in later:
                scores = iter(future.result())
                results.extend([ScoredTurn(request=r, score=next(scores)) for r in rs] for rs in requests)
        return results


class ContextTrackingBenchmark(DialogueReplay):
    """The exact ShapesChat benchmark: :class:`DialogueReplay` of held-out dialogues with the
    :class:`~.scoring.ShapesExactScorer` (protocol in the module docstring).

    Args:
        samples: the dialogues (synthesized, with ground truth in their metadata); the first
            ``settings.max_dialogues`` are used.
        world: the ShapesChat world they live in (default :class:`WorldConfig`).
        settings: benchmark settings.

    Raises:
        ValueError: a dialogue lacks the metadata the benchmark scores against (named), or there are no dialogues.
    """

    def __init__(
        self,
        *,
        samples: Iterable[DialogueSample],
        world: WorldConfig | None = None,
        settings: BenchmarkSettings = BenchmarkSettings(),
    ) -> None:
        self.world = world or WorldConfig()
        self.settings = settings
        self.samples = list(itertools.islice(samples, settings.max_dialogues))
        if not self.samples:
            raise ValueError("ContextTrackingBenchmark: no dialogues to evaluate")
        super().__init__(
            expected=[expected_turns(s, self.world) for s in self.samples],
            scorer=ShapesExactScorer(world=self.world, image_success_threshold=settings.image_success_threshold),
            seed=settings.seed,
            batch_size=settings.batch_size,
            turns=settings.turns,
        )

    @classmethod
    def from_shards(
        cls, shards: Any, *, world: WorldConfig | None = None, settings: BenchmarkSettings = BenchmarkSettings()
    ) -> ContextTrackingBenchmark:
        """Read the dialogues from shards (anything :func:`~chatumm_kit.data.shards.read_samples` accepts)."""
        from chatumm_kit.data.shards import read_samples

        return cls(samples=read_samples(shards), world=world, settings=settings)

    def summary(self) -> DatasetSummary:
        return DatasetSummary.from_turns(self.expected, [s.dialogue.id for s in self.samples])

    def evaluate(
        self, name: str, responder: Responder, *, source: Mapping[str, Any] | None = None, progress: bool = False
    ) -> ModelReport:
        """Both protocols for one responder; with ``settings.turns`` the selected teacher-forced turns only (SR@k
        needs every turn generated, so the free-running pass is left out)."""
        return ModelReport.from_scores(
            name=name,
            source=source or {"kind": "responder", "type": type(responder).__name__},
            turns=self.teacher_forced(responder, progress=progress),
            free_runs=self.free_running(responder, progress=progress) if self.turns is None else [],
        )

    def report(self, results: Sequence[ModelReport]) -> BenchmarkReport:
        """Assemble model results into a report with this benchmark's settings and dataset summary."""
        settings = {
            **self.settings.to_dict(),
            "world": {"image_size": self.world.image_size, "grid": self.world.grid},
        }
        return BenchmarkReport(settings=settings, data=self.summary(), models={r.name: r for r in results})


def run_benchmark(
    *,
    models: Mapping[str, ModelLike],
    shards: Any,
    settings: BenchmarkSettings | None = None,
    world: WorldConfig | None = None,
    progress: bool = False,
) -> BenchmarkReport:
    """Evaluate several models on the same held-out dialogues and return the comparison.

    Args:
        models: name → checkpoint path, :class:`ModelSource`, :class:`~chatumm_kit.training.loading.LoadedModel`, ``(ChatUMM,
            ChatTokenizer)`` or any :class:`~.responders.Responder` (e.g. ``{"multi_turn": ..., "single_turn": ...}``).
        shards: the held-out dialogues (an ``index.json``, a shard, or a list of them).
        settings: benchmark settings (``max_dialogues``, ``seed``, reply and sampler settings, success threshold).
        world: the ShapesChat world (default :class:`WorldConfig`).
        progress: show progress bars.

    Returns:
        the :class:`~.report.BenchmarkReport` (write it with ``report.write(out_dir)``).
    """
    if not models:
        raise ValueError("run_benchmark: models is empty")
    settings = settings or BenchmarkSettings()
    bench = ContextTrackingBenchmark.from_shards(shards, world=world, settings=settings)
    results = []
    for name, value in models.items():
        responder, source = _as_responder(name, value, bench.world, settings.reply)
        results.append(bench.evaluate(name, responder, source=source, progress=progress))
    report = bench.report(results)
    report.settings["shards"] = [str(s) for s in shards] if isinstance(shards, list | tuple) else str(shards)
    return report
