"""Conversational data synthesis (SPEC §6): single-turn datasets → multi-turn, long-range, interleaved dialogues.

Sources (:mod:`.sources`, :mod:`.shapes_source`) give typed records; atomic operations (:mod:`.ops`) rewrite their text
through a backend (:mod:`.backends`: OpenAI-compatible; :mod:`.shapes_backend`: rule-based) with an answer cache
(:mod:`.cache`); stages (:mod:`.stages`) chain records, insert distractors and make interleaved replies; the taxonomy
(:mod:`.taxonomy`) tags, steers and reports; :mod:`.pipeline` runs it all into resumable shards.

Example:
    >>> from chatumm_kit.synth import ChainStage, ShapesPool, ShapesRuleBackend, SynthPipeline
    >>> SynthPipeline(pool=ShapesPool(), backend=ShapesRuleBackend(), stages=[ChainStage()],
    ...               output_dir="out", num_dialogues=10).run()  # doctest: +SKIP
"""

from chatumm_kit.synth.backends import OpenAIChatBackend, RateLimiter, image_data_url
from chatumm_kit.synth.cache import AnswerCache
from chatumm_kit.synth.draft import (
    DialogueDraft,
    DialogueMeta,
    DropDialogue,
    Exchange,
    ExchangeMeta,
    ExchangeTruth,
    ImageLink,
    ImageMeta,
)
from chatumm_kit.synth.ops import (
    OPERATIONS,
    Backend,
    BackendError,
    ChatMessage,
    Operation,
    OpFailed,
    OpOutputError,
    get_op,
    register_op,
)
from chatumm_kit.synth.pipeline import SynthAborted, SynthPipeline, run_synth
from chatumm_kit.synth.records import (
    CaptionRecord,
    ChatRecord,
    EditRecord,
    ImageRef,
    Record,
    TextToImageRecord,
    VQARecord,
)
from chatumm_kit.synth.runner import OpRunner, OpStats
from chatumm_kit.synth.shapes_backend import ShapesRuleBackend
from chatumm_kit.synth.shapes_phrasing import ShapesPhrasing
from chatumm_kit.synth.shapes_source import ShapesPool
from chatumm_kit.synth.sources import DatasetPool, JsonlSource, RecordPool, WebDatasetSource
from chatumm_kit.synth.stages import ChainStage, DistractorStage, InterleaveStage, Stage, StageContext
from chatumm_kit.synth.taxonomy import (
    Dependency,
    InputModality,
    MixBalancer,
    OutputModality,
    SynthReport,
    Task,
    TaxonomyTargets,
    TurnTags,
)

__all__ = [
    "AnswerCache",
    "Backend",
    "BackendError",
    "CaptionRecord",
    "ChainStage",
    "ChatMessage",
    "ChatRecord",
    "DatasetPool",
    "Dependency",
    "DialogueDraft",
    "DialogueMeta",
    "DistractorStage",
    "DropDialogue",
    "EditRecord",
    "Exchange",
    "ExchangeMeta",
    "ExchangeTruth",
    "ImageLink",
    "ImageMeta",
    "ImageRef",
    "InputModality",
    "InterleaveStage",
    "JsonlSource",
    "MixBalancer",
    "OPERATIONS",
    "OpFailed",
    "OpOutputError",
    "OpRunner",
    "OpStats",
    "OpenAIChatBackend",
    "Operation",
    "OutputModality",
    "RateLimiter",
    "Record",
    "RecordPool",
    "ShapesPhrasing",
    "ShapesPool",
    "ShapesRuleBackend",
    "Stage",
    "StageContext",
    "SynthAborted",
    "SynthPipeline",
    "SynthReport",
    "Task",
    "TaxonomyTargets",
    "TextToImageRecord",
    "TurnTags",
    "VQARecord",
    "WebDatasetSource",
    "get_op",
    "image_data_url",
    "register_op",
    "run_synth",
]
