"""LoRA adapters on a :class:`~chatumm_kit.model.ChatUMM`, per expert and per projection, with ``peft`` doing the maths.

Which linear maps get a low-rank update ``W x + (α / r)·B A x`` is described by a :class:`LoraSpec` (a recipe node
under ``system.adapter``): the MoT backbone's attention projections (q/k/v/o) and MLP projections (gate/up/down) of
the understanding expert, the generation expert (``*_moe_gen``, SPEC §4) or both; optionally the connectors
(ViT→LLM MLP, ``vae2llm``, ``llm2vae``, the time embedder), the ViT blocks, and the shared token table / ``lm_head``
(so the intent targets of SPEC §2 stay learnable). Modules named in ``trainable`` are trained in full.

``peft`` injects its layers in place (:func:`peft.inject_adapter_in_model`): the model stays a ``ChatUMM`` and the
MoT routing is untouched, because the routing calls each expert's projection as a module and a LoRA layer is such a
module. Everything except the adapters and ``trainable`` is frozen, so the optimizer, DDP, FSDP2 and the EMA see only
the adapter weights.

Adapters in and out use ``peft``'s own layout (``adapter_model.safetensors`` with ``base_model.model.`` keys and
``adapter_config.json``), so ``peft.PeftModel.from_pretrained(base, folder)`` loads a kit adapter onto the same base;
:func:`merge_adapter` folds the update into the base weights (peft's ``merge``) and gives back a plain ChatUMM that
:func:`chatumm_kit.convert.bagel.export_bagel` writes as a BAGEL release.

Example:
    >>> from chatumm_kit.presets import chatumm_tiny
    >>> model = apply_lora(chatumm_tiny(vocab_size=64, num_layers=1), LoraSpec(rank=4, experts="generation",
    ...                    attention=["q", "v"], mlp=[]))
    >>> sorted({n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad})
    ['backbone.layers.0.self_attn.q_proj_moe_gen', 'backbone.layers.0.self_attn.v_proj_moe_gen']
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from chatumm_kit.components.mot import GEN_SUFFIX

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "AdapterError",
    "LoraSpec",
    "ParameterCounts",
    "adapter_state_dict",
    "apply_lora",
    "has_adapter",
    "load_adapter",
    "lora_config",
    "merge_adapter",
    "parameter_counts",
    "save_adapter",
]

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # peft's names, so peft's loader reads the folder
ADAPTER_CONFIG_FILE = "adapter_config.json"
KIT_SPEC_FILE = "chatumm_adapter.json"  # the LoraSpec the adapter was trained with (kit side, informational)
_PEFT_PREFIX = "base_model.model."  # what PeftModel puts in front of the base model's module names

_ATTENTION = ("q", "k", "v", "o")
_MLP = ("gate", "up", "down")
_EXPERT_SUFFIXES = {"understanding": ("",), "generation": (GEN_SUFFIX,), "both": ("", GEN_SUFFIX)}
_CONNECTORS = r"vit\.connector\.fc[12]|vae\.(vae2llm|llm2vae|time_embedder\.mlp\.[02])"
_VIT_BLOCKS = r"vit\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
_EMBEDDINGS = r"backbone\.(embed_tokens|lm_head)"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterError(ValueError):
    """An adapter spec or folder that does not fit the model (names what and where)."""


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """Where LoRA goes and how it trains (SPEC §4 experts; the recipe node ``system.adapter``).

    Args:
        rank: ``r``, the rank of each update ``B A`` (``A: [r, in]``, ``B: [out, r]``).
        alpha: ``α``; the update is scaled by ``α / r``.
        dropout: dropout on the adapter's input (training only).
        experts: the MoT experts whose projections are adapted: ``understanding``, ``generation`` or ``both``.
        attention: attention projections to adapt, from ``q, k, v, o`` (empty: none).
        mlp: MLP projections to adapt, from ``gate, up, down`` (empty: none).
        connectors: also adapt the ViT connector (``vit.connector.fc1/fc2``), ``vae.vae2llm``, ``vae.llm2vae`` and
            the time embedder's two Linears.
        vit: also adapt every ViT block's ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``.
        embeddings: also adapt the shared token table (``backbone.embed_tokens``, an embedding LoRA) and
            ``backbone.lm_head`` — cheap, and enough for the intent markers of SPEC §2 to be learnt.
        extra_targets: more module names as regular expressions (full match, e.g. ``vae\\.llm2vae``); each must
            match at least one Linear or Embedding.
        trainable: module names trained in full beside the adapters (peft's ``modules_to_save``: a trained copy
            is saved with the adapter), e.g. ``[backbone.lm_head]``.
        base_dtype: cast the frozen base weights to this dtype (``bfloat16``: half the memory; train under
            ``precision: bf16-mixed`` so matmuls run in bf16) while adapter and ``trainable`` weights stay float32;
            ``null`` keeps the base as built. Under FSDP2 pair a bf16 base with the strategy's ``mixed_precision:
            bf16`` (FSDP2 all-gathers a unit's parameters in one dtype); that pairing has not run on a GPU in the
            tests (CPU tests cover DDP/FSDP2 in fp32 and a bf16 base under autocast).
        init: ``"zero"`` (peft's default: ``B = 0``, the adapted model starts equal to the base) or ``"random"``
            (``B`` random too; tests and parity checks).

    Example:
        >>> LoraSpec(rank=8, experts="both").target_regex()[:40]
        'backbone\\\\.layers\\\\.\\\\d+\\\\.(self_attn\\\\.(q|k|v|o)'
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    experts: Literal["understanding", "generation", "both"] = "both"
    attention: Sequence[str] = _ATTENTION
    mlp: Sequence[str] = _MLP
    connectors: bool = False
    vit: bool = False
    embeddings: bool = False
    extra_targets: Sequence[str] = ()
    trainable: Sequence[str] = ()
    base_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    init: Literal["zero", "random"] = "zero"

    _KNOWN: ClassVar[dict[str, tuple[str, ...]]] = {"attention": _ATTENTION, "mlp": _MLP}

    def __post_init__(self) -> None:
        for name in ("attention", "mlp", "extra_targets", "trainable"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = type(self).problems_of(asdict(self))
        if problems:
            raise AdapterError("LoraSpec: " + "; ".join(problems))

    @classmethod
    def problems_of(cls, kwargs: dict[str, Any]) -> list[str]:
        """What is wrong with these keyword arguments, one ``key: reason`` each (no building)."""
        problems = []
        if not isinstance(kwargs.get("rank", 16), int) or kwargs.get("rank", 16) < 1:
            problems.append(f"rank: must be an integer >= 1, got {kwargs.get('rank')!r}")
        dropout = kwargs.get("dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {kwargs.get('dropout')!r}")
        if kwargs.get("experts", "both") not in _EXPERT_SUFFIXES:
            problems.append(f"experts: expected one of {', '.join(_EXPERT_SUFFIXES)}, got {kwargs.get('experts')!r}")
        for key, known in cls._KNOWN.items():
            for i, name in enumerate(kwargs.get(key) or ()):
                if name not in known:
                    problems.append(f"{key}[{i}]: unknown projection {name!r} (known: {', '.join(known)})")
        for i, pattern in enumerate(kwargs.get("extra_targets") or ()):
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                problems.append(f"extra_targets[{i}]: not a regular expression ({err})")
        base_dtype = kwargs.get("base_dtype")
        if base_dtype is not None and base_dtype not in _DTYPES:
            problems.append(f"base_dtype: expected one of {', '.join(_DTYPES)} or null, got {base_dtype!r}")
        if kwargs.get("init", "zero") not in ("zero", "random"):
            problems.append(f"init: expected zero or random, got {kwargs.get('init')!r}")
        return problems

    @classmethod
    def check_recipe_arguments(cls, kwargs: dict[str, Any]) -> list[str]:
        """``chatumm validate`` hook: the values a signature cannot check (projection names, ranges, regexes)."""
        return cls.problems_of(kwargs)

    # ------------------------------------------------------------------ targets
    def target_parts(self) -> list[str]:
        """One full-match regular expression per adapted group of modules (the alternatives of :meth:`target_regex`)."""
        parts = []
        for suffix in _EXPERT_SUFFIXES[self.experts]:
            s = re.escape(suffix)
            if self.attention:
                parts.append(rf"backbone\.layers\.\d+\.self_attn\.({'|'.join(self.attention)})_proj{s}")
            if self.mlp:
                parts.append(rf"backbone\.layers\.\d+\.mlp{s}\.({'|'.join(self.mlp)})_proj")
        if self.connectors:
            parts.append(_CONNECTORS)
        if self.vit:
            parts.append(_VIT_BLOCKS)
        if self.embeddings:
            parts.append(_EMBEDDINGS)
        parts.extend(self.extra_targets)
        return parts

    def target_regex(self) -> str:
        """The pattern peft full-matches against module names (``adapter_config.json``'s ``target_modules``)."""
        parts = self.target_parts()
        if not parts:
            raise AdapterError("LoraSpec: nothing to adapt (attention, mlp empty and no other part switched on)")
        if len(parts) == 1:
            return parts[0]
        # Group the backbone alternatives under one prefix so the config stays readable.
        return "|".join(f"({p})" for p in parts)


def _targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Names of the modules ``spec`` adapts in ``model``; every group must match something LoRA can wrap."""
    names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for part in spec.target_parts():
        pattern = re.compile(part)
        hits = [n for n in names if pattern.fullmatch(n)]
        if not hits:
            raise AdapterError(f"LoraSpec: target {part!r} matches no module of {type(model).__name__}")
        bad = [n for n in hits if not isinstance(model.get_submodule(n), (nn.Linear, nn.Embedding))]
        if bad:
            raise AdapterError(f"LoraSpec: target {part!r} matches modules LoRA cannot wrap: {bad[:5]}")
        found += hits
    for name in spec.trainable:
        if name not in names:
            raise AdapterError(f"LoraSpec.trainable: {name!r} is not a module of {type(model).__name__}")
        if name in found:
            raise AdapterError(f"LoraSpec.trainable: {name!r} is also an adapter target; choose one")
    return found


def lora_config(spec: LoraSpec):
    """The ``peft.LoraConfig`` of a spec (what ``adapter_config.json`` holds)."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_regex(),
        modules_to_save=list(spec.trainable) or None,
        init_lora_weights=spec.init == "zero",
        bias="none",
    )


def _cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject LoRA layers into ``model`` in place (peft), freeze everything else but ``spec.trainable``; returns it.

    Raises:
        AdapterError: the model already has an adapter, or a target / trainable name fits no module.
    """
    from peft import inject_adapter_in_model

    if has_adapter(model):
        raise AdapterError(f"apply_lora: {type(model).__name__} already has an adapter (merge or rebuild it first)")
    _targets(model, spec)  # clear errors before peft's own
    model.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(not a 🤗 transformers model|already in target).*")
        inject_adapter_in_model(lora_config(spec), model)
    if spec.base_dtype is not None:
        _cast_frozen(model, _DTYPES[spec.base_dtype])
    model._chatumm_lora_spec = spec  # noqa: SLF001 - what save_adapter records beside peft's config
    return model


def has_adapter(model: nn.Module) -> bool:
    """Whether peft layers were injected into ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (LoRA ``A``/``B`` and the ``trainable`` copies) under peft's file names
    (``base_model.model.<module>.lora_A.weight``), on CPU, full (unsharded) tensors."""
    from peft import get_peft_model_state_dict

    if not has_adapter(model):
        raise AdapterError(f"adapter_state_dict: {type(model).__name__} has no adapter")
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {_PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, folder: str | Path, *, base: str | None = None) -> Path:
    """Write the adapter alone in peft's layout: ``adapter_model.safetensors`` + ``adapter_config.json`` (plus the
    kit's ``chatumm_adapter.json`` with the :class:`LoraSpec`). ``base`` is recorded as ``base_model_name_or_path``.

    Example:
        >>> save_adapter(model, "runs/lora/adapter", base="runs/bagel_7b/kit")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    state = adapter_state_dict(model)
    config = model.peft_config["default"]
    config.base_model_name_or_path = base
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    spec = getattr(model, "_chatumm_lora_spec", None)
    if spec is not None:
        (folder / KIT_SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2, default=list) + "\n")
    return folder


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Inject the adapter saved in ``folder`` (peft layout) into ``model`` and load its weights; returns ``model``.

    Raises:
        AdapterError: missing files, a target that fits no module, or adapter tensors missing or left over.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise AdapterError(f"load_adapter: {folder} has no {name}")
    if has_adapter(model):
        raise AdapterError(f"load_adapter: {type(model).__name__} already has an adapter")
    config = LoraConfig.from_pretrained(str(folder))
    raw = load_file(str(folder / ADAPTER_WEIGHTS_FILE))
    state = {k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k: v for k, v in raw.items()}
    model.requires_grad_(False)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:
        raise AdapterError(f"load_adapter: {folder} does not fit {type(model).__name__}: {err}") from None
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if ".lora_" in k or "modules_to_save" in k]
    if unexpected or missing:
        raise AdapterError(f"load_adapter: {folder}: unexpected tensors {unexpected[:10]}, missing {missing[:10]}")
    spec_file = folder / KIT_SPEC_FILE
    if spec_file.is_file():
        spec = LoraSpec(**json.loads(spec_file.read_text()))
        model._chatumm_lora_spec = spec  # noqa: SLF001
        if spec.base_dtype is not None:
            _cast_frozen(model, _DTYPES[spec.base_dtype])
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (peft's ``merge``) and remove peft's layers, in place.

    ``trainable`` copies replace their originals. The result has the plain kit layout again (``state_dict`` keys
    of the model before :func:`apply_lora`), ready for :func:`chatumm_kit.convert.bagel.export_bagel`.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if not has_adapter(model):
        raise AdapterError(f"merge_adapter: {type(model).__name__} has no adapter")
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save: the trained copy is the module now
            replacements.append((name, module.modules_to_save["default"]))
        elif isinstance(module, BaseTunerLayer):
            with torch.no_grad():
                module.merge(safe_merge=True)
            replacements.append((name, module.get_base_layer()))
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for attr in ("peft_config", "_chatumm_lora_spec"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter numbers of a model: ``trainable`` (requires grad), ``frozen`` (the rest), ``trainable_bytes``."""

    trainable: int
    frozen: int
    trainable_bytes: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Count trainable vs frozen parameters (works on the meta device: shapes only).

    Example:
        >>> parameter_counts(nn.Linear(3, 2))
        ParameterCounts(trainable=8, frozen=0, trainable_bytes=32)
    """
    trainable = frozen = nbytes = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
            nbytes += p.numel() * p.element_size()
        else:
            frozen += p.numel()
    return ParameterCounts(trainable=trainable, frozen=frozen, trainable_bytes=nbytes)
