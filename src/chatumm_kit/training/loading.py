"""Load a trained ChatUMM and its tokenizer from a Lightning checkpoint of ``ChatUMMSystem``, for chat and evaluation.

The checkpoint (a ``*.ckpt`` file, or a sharded DCP folder with ``meta.pt``) carries the model *spec* in its
hyperparameters (``hyper_parameters.model`` = ``{_component_, tokenizer, vae_weights, sizes...}``, see
:mod:`chatumm_kit.presets`; an old ``{preset: NAME}`` spec is read as its ``_component_`` form). The model is rebuilt
from the spec and filled with the checkpoint's weights — the EMA weights when
:class:`~chatumm_kit.training.ema.EMACallback` saved some (``use_ema=None``, the default), or as asked.
Nothing is unpickled beyond tensors and plain values: files are read with ``torch.load(weights_only=True)`` and the
weights through :func:`chatumm_kit.training.checkpoints.read_weights`.
A checkpoint trained with ``system.adapter`` (LoRA, :mod:`chatumm_kit.training.adapters`) comes back with its adapter
injected and unmerged; a model built from a kit folder takes the folder's tokenizer.

Paths inside the spec (``tokenizer``, ``vae_weights``, a kit folder's ``path``) are stored absolute by the training
system; pass ``tokenizer=`` or ``spec_overrides=`` to point elsewhere. The tokenizer is the spec's ``tokenizer`` or,
for a kit folder spec (``chatumm_kit.convert.bagel.kit_folder``: the BAGEL recipes), the one ``chatumm convert
bagel-to-kit`` wrote into the kit folder (:func:`spec_tokenizer`), so a checkpoint of any recipe opens with no extra
argument. The weights keep the dtype they were trained in (the fp32 master weights of the BAGEL recipes, whatever
dtype the kit folder was converted to).

Example:
    >>> loaded = load_checkpoint("runs/shapes/chat_tiny/checkpoints/last.ckpt")   # doctest: +SKIP
    >>> loaded.ema, type(loaded.model).__name__                                    # doctest: +SKIP
    (True, 'ChatUMM')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.config import instantiate
from chatumm_kit.config.secrets import restore_env
from chatumm_kit.convert.provenance import WeightsOrigin, read_weights_origin
from chatumm_kit.data.packing import model_stream_settings
from chatumm_kit.data.view_sizing import ViewSizing, view_sizing_of_data
from chatumm_kit.model import ChatUMM
from chatumm_kit.presets import build_model, model_spec
from chatumm_kit.training.adapters import apply_lora
from chatumm_kit.training.checkpoints import is_sharded_checkpoint, read_weights
from chatumm_kit.training.ema import EMA_CALLBACK_MARKER, EMA_KEY_PREFIX
from chatumm_kit.training.resume import describe_load_error, unreadable_message

__all__ = [
    "LoadedModel",
    "is_model_folder",
    "load_checkpoint",
    "load_model_folder",
    "model_architecture",
    "checkpoint_hyperparameters",
    "checkpoint_has_ema",
    "checkpoint_view_sizing",
    "spec_tokenizer",
]

_KIT_FOLDER = "chatumm_kit.convert.bagel.kit_folder"  # the model spec of a converted release (named, not imported)

_META_FILE = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the DCP shards (hyperparameters, ...)


@dataclass
class LoadedModel:
    """A model ready for :class:`~chatumm_kit.inference.session.ChatSession`.

    Attributes:
        model: the ChatUMM, in eval mode, on CPU.
        tokenizer: its chat tokenizer.
        spec: the model spec it was built from (after overrides).
        checkpoint: where the weights came from.
        ema: whether the EMA weights were loaded.
        weights_origin: who trained the weights (``kit_trained`` for every training checkpoint; a model folder's
            record, :mod:`chatumm_kit.convert.provenance`) — sessions take their user-image views from it.
    """

    model: ChatUMM
    tokenizer: ChatTokenizer
    spec: dict[str, Any]
    checkpoint: str
    ema: bool
    weights_origin: WeightsOrigin = WeightsOrigin.KIT_TRAINED


def _load_plain(path: Path) -> Mapping[str, Any]:
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(unreadable_message(path, "zero bytes"))
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # damaged, or holding objects safe loading refuses: one line, and what else there is
        raise ValueError(unreadable_message(path, describe_load_error(err))) from None


def _metadata_of(checkpoint: Path) -> Mapping[str, Any]:
    """The checkpoint's non-weight entries (the whole file, or the DCP folder's ``meta.pt``)."""
    if is_sharded_checkpoint(checkpoint):
        meta = checkpoint / _META_FILE
        if not meta.is_file():
            raise FileNotFoundError(f"{checkpoint}: a sharded checkpoint folder without {_META_FILE}")
        return _load_plain(meta)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    return _load_plain(checkpoint)


def checkpoint_hyperparameters(checkpoint: str | Path) -> dict[str, Any]:
    """The ``hyper_parameters`` a ``ChatUMMSystem`` saved (raises ``ValueError`` when there is no model spec)."""
    path = Path(checkpoint)
    hparams = _metadata_of(path).get("hyper_parameters")
    if not isinstance(hparams, Mapping) or not isinstance(hparams.get("model"), Mapping):
        raise ValueError(
            f"{path}: no hyper_parameters.model (the model spec); is this a ChatUMMSystem checkpoint? "
            f"(hyper_parameters keys: {sorted(hparams) if isinstance(hparams, Mapping) else None})"
        )
    return restore_env(dict(hparams))  # ${oc.env:VAR} stored in place of environment values → this machine's


def checkpoint_view_sizing(checkpoint: str | Path, *, model: ChatUMM | None = None) -> ViewSizing | None:
    """The view sizing the checkpoint's training data used (its ``data`` node, from the recipe ``chatumm train``
    stores in every checkpoint), or ``None`` when the checkpoint carries no recipe with a ``data`` node. Stream
    settings the data node leaves to the model (``vit_patch_size``, ``vae_token_stride``) are ``model``'s."""
    recipe = _metadata_of(Path(checkpoint)).get("recipe")
    if not isinstance(recipe, str):
        return None
    data = OmegaConf.to_container(OmegaConf.create(recipe)).get("data")
    if not isinstance(data, Mapping):
        return None
    if model is not None and data.get("view_sizing") is None:
        data = {**model_stream_settings(model), **{k: v for k, v in data.items() if v is not None}}
    return view_sizing_of_data(data)


def checkpoint_has_ema(checkpoint: str | Path) -> bool:
    """Whether the checkpoint holds EMA weights written by ``EMACallback``."""
    path = Path(checkpoint)
    if is_sharded_checkpoint(path):
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        return any(EMA_KEY_PREFIX in k for k in keys)
    callbacks = _metadata_of(path).get("callbacks") or {}
    return any(
        isinstance(s, Mapping) and s.get("format") == EMA_CALLBACK_MARKER and "shadow" in s for s in callbacks.values()
    )


def spec_tokenizer(spec: Mapping[str, Any]) -> str | None:
    """Where the tokenizer of a (``_component_``-form) model spec lives, or ``None`` when the spec does not say.

    The spec's ``tokenizer`` when it names one; for a kit folder spec, the kit folder itself (``chatumm convert
    bagel-to-kit`` writes the release's tokenizer beside the weights).

    Example:
        >>> spec_tokenizer({"_component_": "chatumm_kit.convert.bagel.kit_folder", "path": "runs/bagel_7b/kit"})
        'runs/bagel_7b/kit'
        >>> spec_tokenizer({"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": 300}) is None
        True
    """
    if spec.get("tokenizer") is not None:
        return str(spec["tokenizer"])
    if spec.get("_component_") == _KIT_FOLDER and spec.get("path") is not None:
        return str(spec["path"])
    return None


def _require_file(spec: Mapping[str, Any], key: str, checkpoint: Path) -> None:
    value = spec.get(key)
    if value is not None and not Path(str(value)).exists():
        raise FileNotFoundError(
            f"{checkpoint}: the model spec's {key} {str(value)!r} does not exist (paths are read relative to the "
            f"current directory, as at training); run from the training directory or pass "
            f"spec_overrides={{'{key}': ...}}" + (" or tokenizer=..." if key == "tokenizer" else "")
        )


def load_checkpoint(
    checkpoint: str | Path,
    *,
    use_ema: bool | None = None,
    tokenizer: ChatTokenizer | str | Path | None = None,
    spec_overrides: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Rebuild the model of a ``ChatUMMSystem`` checkpoint and load its weights.

    Args:
        checkpoint: ``*.ckpt`` file or sharded checkpoint folder.
        use_ema: True — the EMA weights (error if there are none); False — the raw weights; None — EMA when present.
        tokenizer: a tokenizer, or the path of one, instead of the spec's ``tokenizer``.
        spec_overrides: keys of the model spec to replace (e.g. ``{"vae_weights": "elsewhere/vae.safetensors"}``).
        device: where the weights are loaded (``"cuda"``: straight onto the GPU). None: the CPU.
        dtype: the floating-point dtype the weights are cast to as they are read (e.g. ``torch.bfloat16``); None: as
            stored.

    The model is built on the meta device and each checkpoint tensor is cast and moved to ``device`` as it is read
    (``read_weights(convert=...)``: a file is memory-mapped, a sharded folder read in groups), so neither a randomly
    initialised model nor a full copy of the stored (e.g. fp32 master) weights is ever made on the host.

    Raises:
        FileNotFoundError: the checkpoint, or a file the spec names, is missing.
        ValueError: not a ChatUMMSystem checkpoint, EMA asked for but absent, or weights that do not fit the spec.
    """
    path = Path(checkpoint)
    hparams = checkpoint_hyperparameters(path)
    spec = model_spec(hparams["model"])
    spec.update(spec_overrides or {})
    if isinstance(tokenizer, ChatTokenizer):
        tok = tokenizer
        if "tokenizer" in spec:  # a preset sized by its tokenizer file: size it by this one instead
            spec.pop("tokenizer")
            if spec.get("vocab_size") is None:
                spec["vocab_size"] = tok.vocab_size
    else:
        if tokenizer is not None:
            spec["tokenizer"] = str(tokenizer)
        source = spec_tokenizer(spec)
        if source is None:
            raise ValueError(
                f"{path}: the model spec names no tokenizer (no 'tokenizer' key, not a kit folder); pass tokenizer="
            )
        if not Path(source).exists():
            raise FileNotFoundError(
                f"{path}: the model spec's tokenizer {source!r} does not exist"
                + (" (the kit folder the spec names)" if spec.get("tokenizer") is None else "")
                + "; pass tokenizer= or spec_overrides={'tokenizer': ...}"
            )
        tok = ChatTokenizer.from_file(source)
    _require_file(spec, "vae_weights", path)
    _require_file(spec, "path", path)

    ema = checkpoint_has_ema(path) if use_ema is None else bool(use_ema)
    target = torch.device(device if device is not None else "cpu")

    def convert(key: str, tensor: torch.Tensor) -> torch.Tensor:  # one tensor at a time, straight to its place
        cast = dtype if dtype is not None and tensor.is_floating_point() else None
        return tensor.to(device=target, dtype=cast)

    with torch.device("meta"):  # the architecture only: no weights are allocated until the checkpoint's arrive
        model = model_architecture(spec)
        if hparams.get("adapter"):  # trained with LoRA: rebuild the unmerged adapter the weights belong to
            apply_lora(model, instantiate(hparams["adapter"], path="hyper_parameters.adapter"))
    weights = read_weights(path, use_ema=ema, prefix="model.", convert=convert)
    try:
        model.load_state_dict(weights, strict=True, assign=True)  # the read tensors become the parameters
    except RuntimeError as err:
        raise ValueError(f"{path}: the weights do not fit the model spec {spec}: {err}") from None
    del weights
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{path}: the checkpoint does not fill {left[:10]} (the model spec {spec})")
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, spec=spec, checkpoint=str(path), ema=ema)


def model_architecture(spec: Mapping[str, Any]) -> ChatUMM:
    """The model of a (``_component_``-form) spec without reading any weights the spec would load — a kit folder
    spec builds from the folder's ``model.json`` (:func:`~chatumm_kit.convert.bagel.kit_folder_architecture`), not
    from its weight file. Build it under ``torch.device("meta")`` and assign the checkpoint's tensors.

    Example:
        >>> with torch.device("meta"):                                                   # doctest: +SKIP
        ...     model = model_architecture({"_component_": _KIT_FOLDER, "path": "runs/bagel_7b/kit"})
    """
    if spec.get("_component_") == _KIT_FOLDER:
        from chatumm_kit.convert.bagel import kit_folder_architecture

        return kit_folder_architecture(**{k: v for k, v in spec.items() if k != "_component_"})
    return build_model(spec)


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a kit folder (``model.json``) or a BAGEL release folder (``llm_config.json``)."""
    path = Path(path)
    return path.is_dir() and ((path / "model.json").is_file() or (path / "llm_config.json").is_file())


def load_model_folder(
    folder: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> LoadedModel:
    """A kit folder (``chatumm convert bagel-to-kit``) or a BAGEL release folder, ready to chat: built on meta, each
    tensor cast and placed on ``device`` as it is read, with the folder's tokenizer and weights origin.

    Attention runs on SDPA on the CPU (the flex backend needs a GPU).

    Example:
        >>> loaded = load_model_folder("runs/bagel_7b/kit", device="cuda", dtype=torch.bfloat16)   # doctest: +SKIP
        >>> loaded.weights_origin.value                                                           # doctest: +SKIP
        'bagel_release'
    """
    from dataclasses import replace

    from chatumm_kit.convert.bagel import SPEC_FILE, load_bagel, load_kit_folder

    path = Path(folder)
    target = torch.device(device if device is not None else "cpu")
    backend = "sdpa" if target.type == "cpu" else "flex"
    if (path / SPEC_FILE).is_file():
        kit = load_kit_folder(path, dtype=dtype, device=target)
        model, tokenizer, spec = kit.module, kit.tokenizer, kit.spec
        if not isinstance(model, ChatUMM):
            raise ValueError(f"{path}: holds a {type(model).__name__}, not a ChatUMM")
        model.backbone.config = replace(model.backbone.config, attn_backend=backend)
    else:
        loaded = load_bagel(path, dtype=dtype, device=target, attn_backend=backend)
        model, tokenizer, spec = loaded.model, loaded.tokenizer, loaded.model_spec
    if tokenizer is None:
        raise ValueError(f"{path}: no tokenizer.json beside the weights")
    origin = read_weights_origin(path)
    return LoadedModel(
        model=model.eval(), tokenizer=tokenizer, spec=spec, checkpoint=str(path), ema=False, weights_origin=origin
    )
