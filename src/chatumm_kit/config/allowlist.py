"""What a recipe may build: an explicit list of callables, plus what the user adds on the command line.

A YAML recipe is data, not a program (ARCHITECTURE "Recipes"). Whole packages cannot be the boundary: ``torch``
holds ``torch.utils.collect_env.run`` (runs a shell command) and ``torch.load`` (unpickles), ``webdataset`` opens
``pipe:`` URLs. So ``_component_`` may only name a callable on :data:`RECIPE_CALLABLES` — the kit's public
components, systems, data modules, helpers and ``prepare`` steps, torch's optimizers, LR schedulers and plain layers,
Lightning's Trainer, callbacks, loggers, strategies and plugins, and the timm/diffusers classes the kit wraps — each
written exactly as listed (no other spelling of the same object, no attribute chain below it). Every entry was read
for what it does when called with recipe values: none starts a process, imports a named file, unpickles or sends
data to a host the recipe names, except as the threat model in the README states (``prepare`` steps run other
recipes under this same list; :class:`~chatumm_kit.synth.OpenAIChatBackend` talks to https or loopback hosts only).

Anything else needs the user's explicit opt-in on the command line, kept in an :class:`AllowList`:

* ``--allow DOTTED`` admits one more callable, exactly as written;
* ``--allow-root PREFIX`` admits every public callable under a package (``mylab``, ``lightning.pytorch.demos``) that
  is defined there (``mylab.os.system`` is still refused);
* ``--trust-recipe`` admits any public callable: the recipe is then as powerful as a Python script.

The list in force is a context variable: the CLI sets it once (:func:`using_allow_list`), and every recipe built
during that command — nested ones run by ``prepare`` steps included — obeys it.

Example:
    >>> DEFAULT_ALLOW_LIST.admits("torch.optim.AdamW"), DEFAULT_ALLOW_LIST.admits("torch.utils.collect_env.run")
    (True, False)
    >>> DEFAULT_ALLOW_LIST.extended(names=["json.loads"]).admits("json.loads")
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "RECIPE_CALLABLES",
    "AllowList",
    "DEFAULT_ALLOW_LIST",
    "current_allow_list",
    "using_allow_list",
    "allow_list_from_args",
]


def _names(prefix: str, *attrs: str) -> tuple[str, ...]:
    return tuple(f"{prefix}.{a}" for a in attrs)


# --- the kit: what its recipes, docs and tests build ------------------------------------------------------------
_KIT: tuple[str, ...] = (
    # systems and models (model specs name a preset; BAGEL-shaped models are built from component arguments)
    *_names("chatumm_kit.systems.unified", "ChatUMMSystem"),
    *_names("chatumm_kit.systems.text_lm", "TextLMSystem"),
    *_names("chatumm_kit.systems.vit_probe", "ViTProbeSystem"),
    *_names("chatumm_kit.systems.autoencoder", "AutoencoderSystem"),
    *_names("chatumm_kit.presets", "chatumm_tiny", "chatumm_bagel_7b"),
    *_names("chatumm_kit.convert.bagel", "chatumm_bagel", "kit_folder"),
    *_names("chatumm_kit.model", "ChatUMM"),
    # components (plain modules and the LightningModules of the weighted parts)
    *_names("chatumm_kit.components.mot", "MoTBackbone", "MoTDecoderLayer", "MoTConfig"),
    *_names("chatumm_kit.components.vit", "ViTEncoder"),
    *_names("chatumm_kit.components.vae", "VAELatentHead", "tiny_autoencoder", "autoencoder_config"),
    *_names("chatumm_kit.components.masks", "MaskBuilder"),
    *_names(
        "chatumm_kit.components.layers", "MLPConnector", "PositionTable2D", "RMSNorm", "RotaryEmbedding", "SwiGLU",
        "TimestepEmbedder",
    ),
    # data
    *_names("chatumm_kit.data.datamodule", "DialogueDataModule", "SourceSpec"),
    *_names("chatumm_kit.data.word_noise", "WordNoise"),
    *_names(
        "chatumm_kit.data.view_sizing", "ViewSizing", "ViewRule", "ViewSizing.capped", "ViewSizing.bagel",
        "ViewSizing.shapes",
    ),
    *_names("chatumm_kit.data.shapes", "WorldConfig", "world_words"),
    *_names("chatumm_kit.data.shapes.images", "ShapesImageDataModule"),
    *_names("chatumm_kit.data.shapes.probe", "ShapesProbeDataModule"),
    *_names("chatumm_kit.data.text", "TextLMDataModule"),
    # training: prepare steps, callbacks, schedules, optimizer specs, strategies
    *_names(
        "chatumm_kit.training.prepare", "ensure_synthesised", "ensure_trained", "ensure_tokenizer", "ensure_exported"
    ),
    *_names("chatumm_kit.training.adapters", "LoraSpec"),
    *_names("chatumm_kit.training.callbacks", "DataHealthLogger", "GenerationPreview", "ExportAutoencoder"),
    *_names("chatumm_kit.training.ema", "EMACallback"),
    *_names("chatumm_kit.training.schedules", "ConstantSchedule", "CosineSchedule"),
    *_names("chatumm_kit.training.optim", "OptimizerSpec"),
    *_names("chatumm_kit.training.strategies", "ddp", "fsdp2", "fsdp_gpu", "FSDP2Strategy"),
    # synthesis
    *_names(
        "chatumm_kit.synth",
        "SynthPipeline", "ShapesPool", "ShapesRuleBackend", "ShapesPhrasing", "ChainStage", "DistractorStage",
        "InterleaveStage", "TaxonomyTargets", "DatasetPool", "JsonlSource", "WebDatasetSource", "OpenAIChatBackend",
    ),
    # evaluation and inference settings
    *_names("chatumm_kit.eval", "ModelSource", "ReplySettings", "BenchmarkSettings", "TurnFilter"),
    # the evaluation suite: tasks read local benchmark files; the judge asks its backend (same key/env rules)
    *_names(
        "chatumm_kit.eval", "Judge", "SuiteSettings", "MMBench", "MME", "POPE", "VQAJsonl", "EditBench", "TextToImage",
        "DialogueBench", "ShapesChat",
    ),
    *_names("chatumm_kit.eval.cli", "summarise"),
    *_names("chatumm_kit.inference.sampler", "SamplerConfig"),
    *_names("chatumm_kit.inference", "SamplerConfig", "SessionConfig"),
)  # fmt: skip

# --- torch: optimizers, LR schedulers, plain layers (constructors allocate tensors, nothing more) ------------------
_TORCH: tuple[str, ...] = (
    *_names(
        "torch.optim", "Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam",
        "Adafactor",
    ),
    *_names(
        "torch.optim.lr_scheduler", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR",
        "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR", "SequentialLR",
        "ChainedScheduler", "ReduceLROnPlateau",
    ),
    *_names(
        "torch.nn", "Identity", "Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Embedding",
        "LayerNorm", "GroupNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d", "Dropout", "ReLU", "GELU", "SiLU", "Tanh",
        "Sigmoid", "Softmax", "Flatten", "Upsample", "AvgPool2d", "MaxPool2d", "AdaptiveAvgPool2d", "Sequential",
        "ModuleList", "ModuleDict", "MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
        "MSELoss", "L1Loss", "SmoothL1Loss", "CrossEntropyLoss",
    ),
)  # fmt: skip

# --- Lightning: Trainer, callbacks, local loggers, strategies, plugins ----------------------------------------------
# Left out on purpose: LambdaCallback / ModelPruning (run callables), BasePredictionWriter (abstract), and the
# loggers that send to a service (wandb, MLflow, Comet, Neptune): add them with --allow when you mean to.
_LIGHTNING: tuple[str, ...] = (
    "lightning.Trainer",
    "lightning.pytorch.Trainer",
    *_names(
        "lightning.pytorch.callbacks", "ModelCheckpoint", "EarlyStopping", "LearningRateMonitor", "ModelSummary",
        "RichModelSummary", "RichProgressBar", "TQDMProgressBar", "StochasticWeightAveraging",
        "GradientAccumulationScheduler", "Timer", "DeviceStatsMonitor", "ThroughputMonitor", "OnExceptionCheckpoint",
        "LearningRateFinder", "BatchSizeFinder",
    ),
    *_names("lightning.pytorch.loggers", "TensorBoardLogger", "CSVLogger"),
    *_names("lightning.pytorch.strategies", "DDPStrategy", "FSDPStrategy", "SingleDeviceStrategy", "ModelParallelStrategy"),
    *_names(
        "lightning.pytorch.plugins", "MixedPrecision", "HalfPrecision", "DoublePrecision", "FSDPPrecision", "Precision",
    ),
    *_names(
        "lightning.pytorch.plugins.environments", "LightningEnvironment", "SLURMEnvironment", "TorchElasticEnvironment"
    ),
)  # fmt: skip

# --- the timm / diffusers classes the kit wraps (constructors only: no from_pretrained, no create_model) ------------
_WRAPPED: tuple[str, ...] = (
    "timm.models.vision_transformer.Block",
    "timm.models.vision_transformer.VisionTransformer",
    "timm.layers.GELUTanh",
    "diffusers.AutoencoderKL",
)

RECIPE_CALLABLES: frozenset[str] = frozenset(_KIT + _TORCH + _LIGHTNING + _WRAPPED)


def _under(dotted: str, prefix: str) -> bool:
    return dotted == prefix or dotted.startswith(prefix + ".")


@dataclass(frozen=True)
class AllowList:
    """The callables recipes may build.

    Args:
        names: exact dotted paths (default: :data:`RECIPE_CALLABLES`).
        roots: package prefixes the user opted into wholesale (``--allow-root``).
        trust_all: any public callable (``--trust-recipe``).
    """

    names: frozenset[str] = RECIPE_CALLABLES
    roots: frozenset[str] = field(default_factory=frozenset)
    trust_all: bool = False

    def extended(self, *, names: Iterable[str] = (), roots: Iterable[str] = (), trust_all: bool = False) -> AllowList:
        """This list plus the user's additions."""
        return AllowList(
            names=self.names | frozenset(names),
            roots=self.roots | frozenset(roots),
            trust_all=self.trust_all or trust_all,
        )

    def admits(self, dotted: str) -> bool:
        """Whether ``dotted`` may be imported and built (decided on the text alone, before importing anything)."""
        return self.trust_all or dotted in self.names or any(_under(dotted, r) for r in self.roots)

    def admits_owner(self, dotted: str, owner: str | None) -> bool:
        """For a name admitted through a root: the object must be defined under one too (``mylab.os.system`` is not)."""
        if self.trust_all or dotted in self.names or owner is None:
            return True
        return any(_under(owner, r) for r in self.roots)

    def near_miss(self, dotted: str) -> str | None:
        """The listed name the user probably meant: same last part (``...model_checkpoint.ModelCheckpoint``), else
        a close spelling (``torch.nn.Lineer``)."""
        last = dotted.rsplit(".", 1)[-1]
        hits = sorted(n for n in self.names if n.rsplit(".", 1)[-1] == last)
        if hits:
            return hits[0]
        close = difflib.get_close_matches(dotted, sorted(self.names), n=1, cutoff=0.85)
        return close[0] if close else None


DEFAULT_ALLOW_LIST = AllowList()

_ACTIVE: contextvars.ContextVar[AllowList] = contextvars.ContextVar("chatumm_allow_list", default=DEFAULT_ALLOW_LIST)


def current_allow_list() -> AllowList:
    """The allow-list in force (the kit's default unless a command set one)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def using_allow_list(allow: AllowList) -> Iterator[AllowList]:
    """Make ``allow`` the list in force inside the ``with`` block (nested recipes included)."""
    token = _ACTIVE.set(allow)
    try:
        yield allow
    finally:
        _ACTIVE.reset(token)


def allow_list_from_args(args: object) -> AllowList:
    """The default list plus the ``--allow`` / ``--allow-root`` / ``--trust-recipe`` options of a parsed command line."""
    return DEFAULT_ALLOW_LIST.extended(
        names=getattr(args, "allow", None) or (),
        roots=getattr(args, "allow_root", None) or (),
        trust_all=bool(getattr(args, "trust_recipe", False)),
    )
