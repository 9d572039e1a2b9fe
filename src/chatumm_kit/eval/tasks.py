"""Evaluation tasks a ``chatumm eval`` recipe mixes: each reads its files, replays its exchanges through a
:class:`~.benchmark.DialogueReplay` with its :class:`~.scoring.TurnScorer`, and aggregates by its published rules.

=====================  =============================================  ==========================================
task                   data                                           scored by
=====================  =============================================  ==========================================
:class:`MMBench`       MMBench TSV                                    option matching, CircularEval
:class:`MME`           MME TSV                                        yes/no, acc and acc+ per subtask
:class:`POPE`          POPE question files + picture folder           yes/no, acc / precision / recall / F1
:class:`VQAJsonl`      generic multiple-choice / short-answer JSONL   option matching / normalised exact match
:class:`EditBench`     edit JSONL (instruction, input picture)        judge: GEdit SC, PQ, overall (0-10)
:class:`TextToImage`   prompt JSONL                                   judge: prompt adherence (0-10)
:class:`DialogueBench` your dialogues (shards or JSONL)               intent exactly; judge: reply quality;
                                                                      SR@k, by distance and turn index
:class:`ShapesChat`    held-out ShapesChat shards                     exact (world ground truth, detector)
=====================  =============================================  ==========================================

The rules and their sources are in :mod:`.understanding` and :mod:`.scoring`.

Example:
    >>> task = MME(path="data/MME.tsv")                                             # doctest: +SKIP
    >>> result = task.run(responder, context=RunContext(seed=0, batch_size=8))       # doctest: +SKIP
    >>> result.metrics["perception"]                                                 # doctest: +SKIP
    1212.5
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from chatumm_kit.data.shapes import WorldConfig
from chatumm_kit.eval import bench_files
from chatumm_kit.eval.benchmark import DEFAULT_BATCH_SIZE, DialogueReplay, ScoredTurn
from chatumm_kit.eval.judge import Judge
from chatumm_kit.eval.metrics import FreeRun, SuccessRates, TurnAggregate, TurnScore
from chatumm_kit.eval.responders import Responder
from chatumm_kit.eval.scoring import (
    JudgedEditScorer,
    JudgedPromptScorer,
    JudgedReplyScorer,
    ShapesExactScorer,
    TurnScorer,
)
from chatumm_kit.eval.turns import ExpectedTurn, expected_turns, reference_turns
from chatumm_kit.eval.understanding import (
    ChoiceScorer,
    MMEAnswerScorer,
    POPEAnswerScorer,
    ShortAnswerScorer,
    accuracy_aggregate,
    mmbench_aggregate,
    mme_aggregate,
    pope_aggregate,
)

__all__ = [
    "MAIN_METRICS",
    "RunContext",
    "TaskResult",
    "EvalTask",
    "MMBench",
    "MME",
    "POPE",
    "VQAJsonl",
    "EditBench",
    "TextToImage",
    "DialogueBench",
    "ShapesChat",
    "missing_inputs",
]


MAIN_METRICS: dict[str, tuple[str, ...]] = {
    "mmbench": ("circular_acc", "vanilla_acc"),
    "mme": ("acc",),
    "pope": ("accuracy", "precision", "recall", "f1", "yes_ratio"),
    "vqa_jsonl": ("circular_acc", "vanilla_acc", "accuracy"),
    "edit": ("edit_semantic", "edit_quality", "edit_overall"),
    "t2i": ("t2i_adherence",),
    "dialogue": ("intent", "reply_quality", "success", "judge_failed"),
    "shapes_chat": ("intent", "success", "vqa", "image_attr"),
}
"""The metrics each task kind plots and the HTML summary shows first."""


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """What every task gets from the run: reply seeds, lockstep size and the judge (None when the recipe has none)."""

    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    judge: Judge | None = None
    progress: bool = False


@dataclass
class TaskResult:
    """One task's result for one model.

    Attributes:
        metrics: the headline figures (names as the benchmark reports them).
        categories: per-category table: category → figures.
        turns: every scored teacher-forced turn, with its request (user turn, reference, reply, history).
        free_runs: free-running dialogues (multi-turn tasks only), with their scored turns.
        extra: further breakdowns (by distance, by turn index, SR@k), JSON-able.
    """

    metrics: dict[str, Any]
    categories: dict[str, dict[str, Any]]
    turns: list[ScoredTurn] = field(default_factory=list)
    free_runs: list[tuple[FreeRun, list[ScoredTurn]]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class EvalTask(Protocol):
    """A benchmark the suite can run: ``kind`` names it in the report; ``needs_judge`` says it cannot run without
    a judge."""

    kind: ClassVar[str]
    needs_judge: ClassVar[bool]

    def run(self, responder: Responder, *, context: RunContext) -> TaskResult: ...


Aggregate = Callable[[Sequence[ExpectedTurn], Sequence[TurnScore]], tuple[dict, dict]]


class _SingleTurnTask:
    """Items of one exchange each: replay teacher-forced (one pass), score, aggregate."""

    kind: ClassVar[str] = ""
    needs_judge: ClassVar[bool] = False

    def items(self) -> list[ExpectedTurn]:
        raise NotImplementedError

    def scorer(self, context: RunContext) -> TurnScorer:
        raise NotImplementedError

    def aggregate(self, expected: Sequence[ExpectedTurn], scores: Sequence[TurnScore]) -> tuple[dict, dict]:
        raise NotImplementedError

    def run(self, responder: Responder, *, context: RunContext) -> TaskResult:
        items = self.items()
        replay = DialogueReplay(expected=[[e] for e in items], scorer=self.scorer(context), seed=context.seed,
                                batch_size=context.batch_size)  # fmt: skip
        turns = replay.teacher_forced_turns(responder, progress=context.progress)
        metrics, table = self.aggregate([t.request.expected for t in turns], [t.score for t in turns])
        return TaskResult(metrics=metrics, categories=table, turns=turns)


class MMBench(_SingleTurnTask):
    """MMBench from its TSV with CircularEval (:func:`~.bench_files.read_mmbench_tsv`,
    :func:`~.understanding.mmbench_aggregate`)."""

    kind = "mmbench"

    def __init__(self, *, path: str, circular: bool = True, max_questions: int | None = None) -> None:
        self.path, self.circular, self.max_questions = path, circular, max_questions

    def items(self) -> list[ExpectedTurn]:
        return bench_files.read_mmbench_tsv(self.path, circular=self.circular, max_questions=self.max_questions)

    def scorer(self, context: RunContext) -> TurnScorer:
        return ChoiceScorer()

    def aggregate(self, expected, scores):
        return mmbench_aggregate(expected, scores)


class MME(_SingleTurnTask):
    """MME from its TSV: acc, acc+ and score per subtask; perception and cognition totals."""

    kind = "mme"

    def __init__(self, *, path: str, max_questions: int | None = None) -> None:
        self.path, self.max_questions = path, max_questions

    def items(self) -> list[ExpectedTurn]:
        return bench_files.read_mme_tsv(self.path, max_questions=self.max_questions)

    def scorer(self, context: RunContext) -> TurnScorer:
        return MMEAnswerScorer()

    def aggregate(self, expected, scores):
        return mme_aggregate(expected, scores)


class POPE(_SingleTurnTask):
    """POPE question files (each a category): accuracy, precision, recall, F1, yes-ratio."""

    kind = "pope"

    def __init__(self, *, paths: str | list[str], image_root: str, max_questions: int | None = None) -> None:
        self.paths, self.image_root, self.max_questions = paths, image_root, max_questions

    def items(self) -> list[ExpectedTurn]:
        return bench_files.read_pope(self.paths, image_root=self.image_root, max_questions=self.max_questions)

    def scorer(self, context: RunContext) -> TurnScorer:
        return POPEAnswerScorer()

    def aggregate(self, expected, scores):
        return pope_aggregate(expected, scores)


class VQAJsonl(_SingleTurnTask):
    """A generic JSONL: multiple choice (with ``options``; CircularEval if ``circular``) or short answers."""

    kind = "vqa_jsonl"

    def __init__(
        self, *, path: str, image_root: str | None = None, circular: bool = False, max_questions: int | None = None
    ) -> None:
        self.path, self.image_root, self.circular, self.max_questions = path, image_root, circular, max_questions
        self._items: list[ExpectedTurn] | None = None

    def items(self) -> list[ExpectedTurn]:
        if self._items is None:
            self._items = bench_files.read_vqa_jsonl(self.path, image_root=self.image_root, circular=self.circular,
                                                     max_questions=self.max_questions)  # fmt: skip
        return self._items

    def _choice(self) -> bool:
        return bool(self.items()) and self.items()[0].task == "choice"

    def scorer(self, context: RunContext) -> TurnScorer:
        return ChoiceScorer() if self._choice() else ShortAnswerScorer()

    def aggregate(self, expected, scores):
        return mmbench_aggregate(expected, scores) if self._choice() else accuracy_aggregate(expected, scores)


def _judged_aggregate(names: Sequence[str], scale: float) -> Aggregate:
    """Means of judged metrics on the judge's scale (over the turns that have them), and verdict counts."""

    def stats(scores: Sequence[TurnScore]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in names:
            values = [s.judged[name] for s in scores if s.judged and name in s.judged]
            out[name] = scale * sum(values) / len(values) if values else None
        out["success"] = sum(s.success for s in scores) / len(scores) if scores else None
        out["items"] = len(scores)
        out["judge_failed"] = sum(bool(s.judged and s.judged.get("judge_failed")) for s in scores)
        out["no_image"] = sum(s.predicted_output in ("text", "none") for s in scores)
        return out

    def aggregate(expected: Sequence[ExpectedTurn], scores: Sequence[TurnScore]) -> tuple[dict, dict]:
        cats: dict[str, list[TurnScore]] = {}
        for e, s in zip(expected, scores):
            if e.category is not None:
                cats.setdefault(e.category, []).append(s)
        return stats(scores), {k: stats(v) for k, v in sorted(cats.items())}

    return aggregate


def _need_judge(context: RunContext, kind: str) -> Judge:
    if context.judge is None:
        raise ValueError(f"task {kind!r} is judged: the recipe needs a 'judge' node")
    return context.judge


class EditBench(_SingleTurnTask):
    """Instruction-guided editing, GEdit-style (:class:`~.scoring.JudgedEditScorer`): mean semantic consistency,
    perceptual quality and overall on the 0–10 scale, overall and per category (GEdit's task types)."""

    kind = "edit"
    needs_judge = True

    def __init__(
        self, *, path: str, image_root: str | None = None, max_items: int | None = None, success_score: int = 7
    ) -> None:
        self.path, self.image_root, self.max_items, self.success_score = path, image_root, max_items, success_score

    def items(self) -> list[ExpectedTurn]:
        return bench_files.read_edit_jsonl(self.path, image_root=self.image_root, max_items=self.max_items)

    def scorer(self, context: RunContext) -> TurnScorer:
        return JudgedEditScorer(judge=_need_judge(context, self.kind), success_score=self.success_score)

    def aggregate(self, expected, scores):
        return _judged_aggregate(("edit_semantic", "edit_quality", "edit_overall"), 10.0)(expected, scores)


class TextToImage(_SingleTurnTask):
    """Text-to-image prompt adherence (:class:`~.scoring.JudgedPromptScorer`), mean on the 0–10 scale."""

    kind = "t2i"
    needs_judge = True

    def __init__(self, *, path: str, max_items: int | None = None, success_score: int = 7) -> None:
        self.path, self.max_items, self.success_score = path, max_items, success_score

    def items(self) -> list[ExpectedTurn]:
        return bench_files.read_t2i_jsonl(self.path, max_items=self.max_items)

    def scorer(self, context: RunContext) -> TurnScorer:
        return JudgedPromptScorer(judge=_need_judge(context, self.kind), success_score=self.success_score)

    def aggregate(self, expected, scores):
        return _judged_aggregate(("t2i_adherence",), 10.0)(expected, scores)


def _dialogue_result(replay: DialogueReplay, responder: Responder, context: RunContext) -> TaskResult:
    """Both protocols; metrics from :class:`~.metrics.TurnAggregate` (teacher-forced) and
    :class:`~.metrics.SuccessRates` (free-running)."""
    turns = replay.teacher_forced_turns(responder, progress=context.progress)
    free = replay.free_running_turns(responder, progress=context.progress)
    agg = TurnAggregate.from_turns(t.score for t in turns)
    rates = SuccessRates.from_runs([run for run, _ in free])
    metrics: dict[str, Any] = {k: v.mean for k, v in agg.overall.stats.items()}
    metrics["turns"] = len(turns)
    metrics["dialogues"] = len(free)
    metrics.update({f"sr@{k}": v for k, v in rates.sr_at_k.items()})
    table = {f"task/{k}": {m: s.mean for m, s in b.stats.items()} for k, b in agg.by_task.items()}
    extra = {"teacher_forced": agg.to_dict(), "free_running": rates.to_dict()}
    return TaskResult(metrics=metrics, categories=table, turns=turns, free_runs=free, extra=extra)


class DialogueBench:
    """Multi-turn robustness on your own dialogues (:func:`~.turns.reference_turns`): teacher-forced and
    free-running replay; intent exactly, reply quality by the judge against the reference turn and the history
    (:class:`~.scoring.JudgedReplyScorer`); SR@k with stop at the first failure; breakdowns by history distance
    (where the dialogues carry ``distance`` tags) and turn index.

    Args:
        dialogues: kit shards (``index.json``) or a dialogue ``.jsonl`` (:func:`~.bench_files.read_dialogues`).
        max_dialogues: the first this many.
        success_score: judge score (0–10) a reply needs to count as a success.
        max_history_turns: history turns shown to the judge.
        prompt: judge prompt name or file (default ``reply_quality``).
    """

    kind: ClassVar[str] = "dialogue"
    needs_judge: ClassVar[bool] = True

    def __init__(
        self,
        *,
        dialogues: str,
        max_dialogues: int | None = None,
        success_score: int = 7,
        max_history_turns: int = 8,
        prompt: str = "reply_quality",
    ) -> None:
        self.dialogues, self.max_dialogues = dialogues, max_dialogues
        self.success_score, self.max_history_turns, self.prompt = success_score, max_history_turns, prompt

    def run(self, responder: Responder, *, context: RunContext) -> TaskResult:
        samples = bench_files.read_dialogues(self.dialogues, max_dialogues=self.max_dialogues)
        scorer = JudgedReplyScorer(judge=_need_judge(context, self.kind), prompt=self.prompt,
                                   success_score=self.success_score, max_history_turns=self.max_history_turns)  # fmt: skip
        replay = DialogueReplay(expected=[reference_turns(s) for s in samples], scorer=scorer, seed=context.seed,
                                batch_size=context.batch_size)  # fmt: skip
        return _dialogue_result(replay, responder, context)


class ShapesChat:
    """The exact ShapesChat context-tracking benchmark as a suite task (no judge): held-out shards scored against
    the world's ground truth (:class:`~.scoring.ShapesExactScorer`)."""

    kind: ClassVar[str] = "shapes_chat"
    needs_judge: ClassVar[bool] = False

    def __init__(
        self,
        *,
        shards: str,
        world: WorldConfig | None = None,
        max_dialogues: int | None = None,
        image_success_threshold: float = 1.0,
    ) -> None:
        self.shards, self.world, self.max_dialogues = shards, world or WorldConfig(), max_dialogues
        self.image_success_threshold = image_success_threshold

    def run(self, responder: Responder, *, context: RunContext) -> TaskResult:
        samples = bench_files.read_dialogues(self.shards, max_dialogues=self.max_dialogues)
        scorer = ShapesExactScorer(world=self.world, image_success_threshold=self.image_success_threshold)
        replay = DialogueReplay(expected=[expected_turns(s, self.world) for s in samples], scorer=scorer,
                                seed=context.seed, batch_size=context.batch_size)  # fmt: skip
        return _dialogue_result(replay, responder, context)


INPUT_FIELDS = ("path", "paths", "image_root", "dialogues", "shards")
"""Task attributes that name files or folders a task reads (checked before any model is loaded)."""


def missing_inputs(task: object) -> dict[str, list[str]]:
    """Attribute → the paths among its value that do not exist, for each of :data:`INPUT_FIELDS` the task has."""
    out = {}
    for name in INPUT_FIELDS:
        value = getattr(task, name, None)
        if value is None:
            continue
        paths = [value] if isinstance(value, str | Path) else list(value)
        gone = [str(p) for p in paths if not Path(str(p)).exists()]
        if gone:
            out[name] = gone
    return out
