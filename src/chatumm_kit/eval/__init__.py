"""The exact multi-turn context-tracking benchmark on held-out ShapesChat dialogues (``chatumm eval``).

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

from chatumm_kit.eval.benchmark import (
    BenchmarkSettings,
    ContextTrackingBenchmark,
    ModelLike,
    ModelSource,
    run_benchmark,
)
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
from chatumm_kit.eval.turns import ExpectedTurn, Reply, expected_turns, modality_of

__all__ = [
    "METRICS",
    "BenchmarkReport",
    "BenchmarkSettings",
    "Breakdown",
    "ChatSessionResponder",
    "ContextTrackingBenchmark",
    "DatasetSummary",
    "ExpectedTurn",
    "FarHistory",
    "FreeRun",
    "MetricStat",
    "ModelLike",
    "ModelReport",
    "ModelSource",
    "OracleResponder",
    "Reply",
    "ReplySettings",
    "Responder",
    "SuccessRates",
    "TurnAggregate",
    "TurnScore",
    "expected_turns",
    "modality_of",
    "run_benchmark",
    "score_turn",
]
