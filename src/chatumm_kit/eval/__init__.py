"""Evaluation (``chatumm eval``): the exact ShapesChat context-tracking benchmark, understanding benchmarks from
their published files (MMBench, MME, POPE, generic JSONL), judged editing / text-to-image / multi-turn dialogues,
and suites that mix them (:mod:`.suite`, :mod:`.tasks`). One scoring interface: :class:`TurnScorer` (:mod:`.scoring`).

The ShapesChat benchmark:
:func:`run_benchmark` scores models (checkpoints or any :class:`Responder`) turn by turn against the world's ground
truth — intent, VQA exact match, captions, generated-image attributes via the detector — broken down by
history-dependency distance and turn index, plus SR@k with stop at first failure; :class:`BenchmarkReport` writes
JSON and a PNG chart. See :mod:`chatumm_kit.eval.benchmark` for the protocol.

Example:
    >>> from chatumm_kit.eval import BenchmarkSettings, run_benchmark
    >>> report = run_benchmark(models={"multi_turn": "runs/shapes/chat_tiny/checkpoints/last.ckpt"},
    ...                        shards="runs/shapes/eval_data/index.json",
    ...                        settings=BenchmarkSettings(max_dialogues=50))   # doctest: +SKIP
    >>> report.write("runs/shapes/eval")                                       # doctest: +SKIP
"""

from chatumm_kit.eval.bench_files import (
    BenchmarkFileError,
    read_dialogues,
    read_edit_jsonl,
    read_mmbench_tsv,
    read_mme_tsv,
    read_pope,
    read_t2i_jsonl,
    read_vqa_jsonl,
)
from chatumm_kit.eval.benchmark import (
    BenchmarkSettings,
    ContextTrackingBenchmark,
    DialogueReplay,
    ModelLike,
    ModelSource,
    ScoredTurn,
    run_benchmark,
)
from chatumm_kit.eval.judge import Judge, JudgePrompt, Verdict
from chatumm_kit.eval.metrics import (
    METRICS,
    Breakdown,
    FreeRun,
    MetricStat,
    SuccessRates,
    TurnAggregate,
    TurnScore,
    score_turn,
)
from chatumm_kit.eval.report import BenchmarkReport, DatasetSummary, FarHistory, ModelReport
from chatumm_kit.eval.responders import (
    ChatSessionResponder,
    OracleResponder,
    ReplySettings,
    Responder,
)
from chatumm_kit.eval.scoring import (
    JudgedEditScorer,
    JudgedPromptScorer,
    JudgedReplyScorer,
    ScoreRequest,
    ShapesExactScorer,
    TurnScorer,
)
from chatumm_kit.eval.suite import SuiteReport, SuiteSettings, run_suite
from chatumm_kit.eval.tasks import (
    MME,
    POPE,
    DialogueBench,
    EditBench,
    EvalTask,
    MMBench,
    RunContext,
    ShapesChat,
    TaskResult,
    TextToImage,
    VQAJsonl,
)
from chatumm_kit.eval.turn_filter import TurnFilter
from chatumm_kit.eval.turns import ExpectedTurn, Reply, expected_turns, modality_of, reference_turns
from chatumm_kit.eval.understanding import (
    ChoiceScorer,
    MMEAnswerScorer,
    POPEAnswerScorer,
    ShortAnswerScorer,
    extract_choice,
    mme_answer,
    normalise_short_answer,
    pope_answer,
)

__all__ = [
    "METRICS",
    "MME",
    "POPE",
    "BenchmarkFileError",
    "BenchmarkReport",
    "BenchmarkSettings",
    "Breakdown",
    "ChatSessionResponder",
    "ChoiceScorer",
    "ContextTrackingBenchmark",
    "DatasetSummary",
    "DialogueBench",
    "DialogueReplay",
    "EditBench",
    "EvalTask",
    "ExpectedTurn",
    "FarHistory",
    "FreeRun",
    "Judge",
    "JudgePrompt",
    "JudgedEditScorer",
    "JudgedPromptScorer",
    "JudgedReplyScorer",
    "MMBench",
    "MMEAnswerScorer",
    "MetricStat",
    "ModelLike",
    "ModelReport",
    "ModelSource",
    "OracleResponder",
    "POPEAnswerScorer",
    "Reply",
    "ReplySettings",
    "Responder",
    "RunContext",
    "ScoreRequest",
    "ScoredTurn",
    "ShapesChat",
    "ShapesExactScorer",
    "ShortAnswerScorer",
    "SuccessRates",
    "SuiteReport",
    "SuiteSettings",
    "TaskResult",
    "TextToImage",
    "TurnAggregate",
    "TurnFilter",
    "TurnScore",
    "TurnScorer",
    "VQAJsonl",
    "Verdict",
    "expected_turns",
    "extract_choice",
    "mme_answer",
    "modality_of",
    "normalise_short_answer",
    "pope_answer",
    "read_dialogues",
    "read_edit_jsonl",
    "read_mmbench_tsv",
    "read_mme_tsv",
    "read_pope",
    "read_t2i_jsonl",
    "read_vqa_jsonl",
    "reference_turns",
    "run_benchmark",
    "run_suite",
    "score_turn",
]
