"""BAGEL release folder <-> :class:`~chatumm_kit.model.ChatUMM` (SPEC §5), and the kit's own model folder.

A BAGEL release folder holds ``llm_config.json`` (Qwen2), ``vit_config.json`` (SigLIP), ``ema.safetensors`` (every
weight but the VAE, key layout in :mod:`chatumm_kit.convert.bagel_keys`), ``ae.safetensors`` (FLUX VAE, original
layout; may be absent, then the VAE is supplied separately) and tokenizer files.

**Sizes** come from the two configs and from tensor shapes; BAGEL-7B's numbers are never assumed. Shapes give the
vocabulary (``embed_tokens``), ``head_dim`` (``q_norm``), the ViT and latent grid sides (square roots of the
position tables' rows), the latent patch (``vae2llm`` input = patch² · latent channels) and the time-embedding
width; every other tensor's shape is then checked against the model built from those sizes.

**Forced settings** the JSON does not reliably carry (SPEC §5): QK-norm on, untied embeddings (``lm_head`` is read,
never tied), MoT layers (both experts), ViT depth = config depth − 1, Linear patch embedding.

**Memory.** The model is built on the meta device; ``ema.safetensors`` is read tensor by tensor with ``safe_open``
and each tensor becomes the parameter (``load_state_dict(assign=True)``), so loading needs about one copy of the
weights. The only copies are the SigLIP tower's q/k/v, fused per layer. On CPU, safetensors maps the file
(copy-on-write), so untouched weights stay page cache; do not rewrite the file in place while the model lives
(``export_bagel`` into the same folder is safe: it writes new files).

**Model spec.** :func:`chatumm_bagel` builds a ChatUMM of BAGEL's architecture at any size from plain component
arguments; ``{"_component_": "chatumm_kit.convert.bagel.chatumm_bagel", "backbone": {...}, "vit": {...},
"vae": {...}}`` is the model spec a loaded checkpoint reports (:attr:`LoadedBagel.model_spec`) and
:func:`save_kit_folder` writes beside the weights. :func:`kit_folder` is the ``_component_`` that loads a kit folder
(weights included) from a recipe.

Example:
    >>> loaded = load_bagel("/ckpt/BAGEL-7B-MoT", dtype=torch.bfloat16, device="cuda")    # doctest: +SKIP
    >>> loaded.model.backbone.config.num_layers, loaded.tokenizer.vision_start_id           # doctest: +SKIP
    (28, 151652)
    >>> export_bagel(loaded.model, "/tmp/bagel_copy", tokenizer=loaded.tokenizer)         # doctest: +SKIP
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from chatumm_kit.components.masks import MaskBuilder
from chatumm_kit.components.mot import MoTBackbone, MoTConfig
from chatumm_kit.components.tokenizer import SIDECAR_FILE, TOKENIZER_FILE, ChatTokenizer
from chatumm_kit.components.vae import VAELatentHead, autoencoder_config
from chatumm_kit.components.vit import ViTEncoder
from chatumm_kit.config.instantiate import COMPONENT_KEY
from chatumm_kit.convert.bagel_keys import (
    BAGEL_VIT_PREFIX,
    KIT_AUTOENCODER_PREFIX,
    POSITION_TABLES,
    bagel_to_kit_name,
    bagel_vit_to_kit,
    kit_to_bagel_state,
    position_table_mismatch,
    shorten,
)
from chatumm_kit.convert.flux_vae import diffusers_to_original, infer_autoencoder_kwargs, load_flux_vae, save_flux_vae
from chatumm_kit.convert.qwen2 import mot_config_from_qwen2
from chatumm_kit.convert.siglip import vit_kwargs_from_siglip_config
from chatumm_kit.model import ChatUMM
from chatumm_kit.presets import build_model

__all__ = [
    "AE_FILE",
    "CHATUMM_BAGEL",
    "BagelConversionError",
    "BagelConversionWarning",
    "EMA_FILE",
    "KitFolder",
    "LLM_CONFIG",
    "LoadedBagel",
    "MODEL_FILE",
    "SPEC_FILE",
    "VIT_CONFIG",
    "bagel_model_spec",
    "chatumm_bagel",
    "export_bagel",
    "kit_folder",
    "kit_folder_architecture",
    "load_bagel",
    "load_kit_folder",
    "qwen2_config_from_mot",
    "save_kit_folder",
    "siglip_config_from_vit",
]

LLM_CONFIG, VIT_CONFIG, EMA_FILE, AE_FILE = "llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors"
MODEL_FILE, SPEC_FILE = "model.safetensors", "model.json"  # the kit folder (save_kit_folder)
CHATUMM_BAGEL = "chatumm_kit.convert.bagel.chatumm_bagel"  # the _component_ of a converted model's spec

_LM = "language_model.model."
_SIZING_KEYS = {  # BAGEL key -> what its shape decides (SPEC §5: sizes from shapes, not 7B constants)
    _LM + "embed_tokens.weight": "the vocabulary size",
    _LM + "layers.0.self_attn.q_norm.weight": "head_dim",
    BAGEL_VIT_PREFIX + "embeddings.position_embedding.weight": "the ViT position grid side",
    "latent_pos_embed.pos_embed": "the latent position grid side",
    "vae2llm.weight": "the latent patch size",
    "time_embedder.mlp.0.weight": "the timestep sinusoid width",
}


class BagelConversionError(ValueError):
    """A BAGEL folder (or a model to export) does not fit the kit; names the file, keys or settings at fault."""


class BagelConversionWarning(UserWarning):
    """Something converted, but not exactly as the kit would have made it (a stored sin-cos table, VAE settings)."""


@dataclass
class LoadedBagel:
    """What :func:`load_bagel` returns.

    Attributes:
        model: the ChatUMM, in eval mode.
        tokenizer: from the folder's ``tokenizer.json`` (None when the folder has none).
        model_spec: ``{"_component_": CHATUMM_BAGEL, ...}``: rebuilds the same architecture
            (:func:`chatumm_kit.presets.build_model`).
    """

    model: ChatUMM
    tokenizer: ChatTokenizer | None
    model_spec: dict[str, Any]


@dataclass
class KitFolder:
    """What :func:`load_kit_folder` returns: the module, its spec and the tokenizer saved beside it (or None)."""

    module: nn.Module
    spec: dict[str, Any]
    tokenizer: ChatTokenizer | None


# ---------------------------------------------------------------------------------------------------- model spec


def chatumm_bagel(
    *,
    backbone: Mapping[str, Any],
    vit: Mapping[str, Any],
    vae: Mapping[str, Any],
    timestep_shift: float = 1.0,
    sample_posterior: bool = False,
    autoencoder: AutoencoderKL | None = None,
) -> ChatUMM:
    """A ChatUMM of BAGEL's architecture at any size, from its components' keyword arguments.

    Args:
        backbone: :class:`~chatumm_kit.components.mot.MoTBackbone` arguments.
        vit: :class:`~chatumm_kit.components.vit.ViTEncoder` arguments.
        vae: :class:`~chatumm_kit.components.vae.VAELatentHead` arguments with ``autoencoder_kwargs``.
        timestep_shift: training timestep shift (SPEC §4).
        sample_posterior: train on latents sampled from the VAE posterior (``mean + σ·ε``), as BAGEL does (SPEC §4.1;
            the BAGEL recipes turn it on).
        autoencoder: a built autoencoder to use instead of building one from ``vae["autoencoder_kwargs"]``
            (a runtime object; the loaders pass the one they read).

    Example:
        >>> spec = load_bagel("/ckpt/BAGEL-7B-MoT").model_spec                           # doctest: +SKIP
        >>> with torch.device("meta"):                                                 # doctest: +SKIP
        ...     model = build_model(spec)
    """
    vae_kwargs = dict(vae)
    if autoencoder is not None:
        vae_kwargs.pop("autoencoder_kwargs", None)
        vae_kwargs["autoencoder"] = autoencoder
    return ChatUMM(
        backbone=MoTBackbone(**backbone),
        vit=ViTEncoder(**vit),
        vae=VAELatentHead(**vae_kwargs),
        mask_builder=MaskBuilder(),
        timestep_shift=timestep_shift,
        sample_posterior=sample_posterior,
    )


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise BagelConversionError(f"{EMA_FILE}: missing key {key!r} (its shape gives {_SIZING_KEYS[key]})")
    return shapes[key]


def _square_side(rows: int, key: str) -> int:
    side = round(rows**0.5)
    if side * side != rows:
        raise BagelConversionError(f"{EMA_FILE}: {key} has {rows} rows, not a square grid (side² rows expected)")
    return side


def bagel_model_spec(
    *,
    llm_config: Mapping[str, Any],
    vit_config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    autoencoder: AutoencoderKL,
    scaling_factor: float,
    shift_factor: float,
    attn_backend: str = "flex",
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """The ``chatumm_bagel`` model spec of a BAGEL checkpoint: sizes from both configs and the tensor shapes.

    Args:
        llm_config, vit_config: the folder's JSON configs.
        shapes: ``ema.safetensors`` key -> shape (no tensor needs to be read).
        autoencoder: the VAE (its latent channels size the latent patch).
        scaling_factor, shift_factor: latent normalisation (SPEC §4).
        attn_backend, gradient_checkpointing: backbone (and ViT) runtime settings.

    Raises:
        BagelConversionError: a key that sizes the model is missing, a table is not square, a config lacks a field.
    """
    vocab, _ = _shape(shapes, _LM + "embed_tokens.weight")
    (head_dim,) = _shape(shapes, _LM + "layers.0.self_attn.q_norm.weight")
    vit_key = BAGEL_VIT_PREFIX + "embeddings.position_embedding.weight"
    vit_side = _square_side(_shape(shapes, vit_key)[0], vit_key)
    latent_side = _square_side(_shape(shapes, "latent_pos_embed.pos_embed")[0], "latent_pos_embed.pos_embed")
    token_dim = _shape(shapes, "vae2llm.weight")[1]
    freq_dim = _shape(shapes, "time_embedder.mlp.0.weight")[1]
    channels = int(autoencoder.config.latent_channels)
    patch = round((token_dim / channels) ** 0.5)
    if patch * patch * channels != token_dim:
        raise BagelConversionError(
            f"{EMA_FILE}: vae2llm takes {token_dim} features, not patch² × {channels} latent channels of the VAE"
        )
    try:
        # SPEC §5 forced settings: QK-norm on (and untied lm_head / MoT layers: MoTBackbone always has both).
        mot = mot_config_from_qwen2(
            dict(llm_config),
            qk_norm=True,
            vocab_size=vocab,
            head_dim=head_dim,
            attn_backend=attn_backend,
            gradient_checkpointing=gradient_checkpointing,
        )
        vit = vit_kwargs_from_siglip_config(
            dict(vit_config), llm_hidden=mot.hidden_size, drop_last_layer=True, max_patches_per_side=vit_side
        )
    except KeyError as err:
        raise BagelConversionError(f"{LLM_CONFIG} / {VIT_CONFIG}: missing field {err}") from err
    vit["gradient_checkpointing"] = gradient_checkpointing
    vae = dict(
        hidden=mot.hidden_size,
        autoencoder_kwargs=autoencoder_config(autoencoder),
        scaling_factor=float(scaling_factor),
        shift_factor=float(shift_factor),
        latent_patch=patch,
        max_latent_side=latent_side,
        timestep_freq_dim=freq_dim,
    )
    return {COMPONENT_KEY: CHATUMM_BAGEL, "backbone": asdict(mot), "vit": vit, "vae": vae}


# ---------------------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BagelConversionError(f"{path.parent}: missing {path.name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BagelConversionError(f"{path}: malformed JSON: {err}") from None


def _check_layout(expected: Mapping[str, torch.Tensor], found: Mapping[str, tuple[int, ...]], *, where: str) -> None:
    """Raise listing missing keys, unexpected keys and shape mismatches between a model and a file header."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: file {list(found[k])} vs model {list(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k].shape)
    ]
    parts = [
        f"{label}: {shorten(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if parts:
        raise BagelConversionError(f"{where}: " + "; ".join(parts))


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _assign(module: nn.Module, state: dict[str, torch.Tensor], *, where: str, not_in_file: str | None = None) -> None:
    """``load_state_dict(assign=True)``: the read tensors become the parameters (no second copy)."""
    result = module.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (not_in_file and k.startswith(not_in_file))]
    if missing or result.unexpected_keys:  # _check_layout ran first; this guards the map itself
        raise BagelConversionError(
            f"{where}: missing keys: {shorten(missing)}; unexpected keys: {shorten(result.unexpected_keys)}"
        )
    left = [n for n, t in chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if left:
        raise BagelConversionError(f"{where}: tensors left unfilled on the meta device: {shorten(left)}")


def _autoencoder_for(
    folder: Path, vae: VAELatentHead | AutoencoderKL | None, *, dtype: torch.dtype | None, device: torch.device
) -> tuple[AutoencoderKL, float, float]:
    """The autoencoder and its latent normalisation: from ``vae=`` if given, else ``ae.safetensors``."""
    if vae is None:
        path = folder / AE_FILE
        if not path.is_file():
            raise BagelConversionError(
                f"{folder}: no {AE_FILE} in this folder (the release ships its VAE separately). Pass vae= to "
                "load_bagel: a diffusers AutoencoderKL (e.g. chatumm_kit.convert.flux_vae.load_flux_vae(path)) or "
                "a VAELatentHead"
            )
        ae = load_flux_vae(path)
        scale, shift = ae.config.scaling_factor, ae.config.shift_factor
    elif isinstance(vae, VAELatentHead):
        ae, scale, shift = vae.autoencoder, vae.scaling_factor, vae.shift_factor
    elif isinstance(vae, AutoencoderKL):
        ae, scale, shift = vae, vae.config.scaling_factor, vae.config.shift_factor
    else:
        raise TypeError(f"load_bagel(vae=...) expects an AutoencoderKL or a VAELatentHead, got {type(vae).__name__}")
    ae.to(device)
    if dtype is not None:
        ae.to(dtype)
    return ae, float(scale), float(shift or 0.0)


def _load_tokenizer(folder: Path, *, vocab_size: int) -> ChatTokenizer | None:
    """A kit-saved tokenizer (with its sidecar) or a Qwen2.5 folder's; None without ``tokenizer.json``."""
    if not (folder / TOKENIZER_FILE).is_file():
        return None
    if (folder / SIDECAR_FILE).is_file():
        tok = ChatTokenizer.from_file(folder)
    else:
        tok = ChatTokenizer.from_pretrained_dir(folder)
    if tok.vocab_size > vocab_size:
        raise BagelConversionError(
            f"{folder}: the tokenizer has {tok.vocab_size} ids but the embedding table only {vocab_size} rows"
        )
    return tok


def _warn_on_position_tables(state: Mapping[str, torch.Tensor], *, where: str) -> None:
    for bagel_key, kit_key in POSITION_TABLES:
        bad = position_table_mismatch(bagel_key, state[kit_key])
        if bad is not None:
            warnings.warn(
                f"{where}: {bagel_key} is not the 2-D sin-cos table the kit computes (max |diff| "
                f"{bad.max_abs_diff:.3g} > {bad.tolerance:.3g}); the stored table is used",
                BagelConversionWarning,
                stacklevel=3,
            )


def load_bagel(
    folder: str | Path,
    *,
    vae: VAELatentHead | AutoencoderKL | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    attn_backend: str = "flex",
    gradient_checkpointing: bool = False,
) -> LoadedBagel:
    """Load a BAGEL release folder into a :class:`ChatUMM` (+ its tokenizer).

    Args:
        folder: the release folder (see the module docstring).
        vae: the autoencoder when the folder has no ``ae.safetensors`` (it wins over the file when both exist). An
            ``AutoencoderKL`` brings its config's ``scaling_factor``/``shift_factor``; a ``VAELatentHead`` brings
            its autoencoder and normalisation (its LLM-facing layers are replaced by the checkpoint's). The object
            is moved/cast in place.
        dtype: cast floating-point tensors as they are read (default: keep the stored dtypes).
        device: where tensors are read to (default CPU).
        attn_backend: ``"flex"`` (GPU) or ``"sdpa"`` (dense mask; CPU tests).
        gradient_checkpointing: for the backbone and the ViT when fine-tuning.

    Raises:
        BagelConversionError: a missing file (``ae.safetensors`` without ``vae=``), missing / unexpected keys or
            shape mismatches (listed, long lists truncated with a count), malformed configs.

    Warns:
        BagelConversionWarning: a stored sin-cos table differs from the recomputed one (the stored one is kept).
    """
    folder = Path(folder)
    llm_config, vit_config = _read_json(folder / LLM_CONFIG), _read_json(folder / VIT_CONFIG)
    ema = folder / EMA_FILE
    if not ema.is_file():
        raise BagelConversionError(f"{folder}: missing {EMA_FILE}")
    device = torch.device(device if device is not None else "cpu")
    autoencoder, scale, shift = _autoencoder_for(folder, vae, dtype=dtype, device=device)
    with safe_open(str(ema), framework="pt", device=str(device)) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        spec = bagel_model_spec(
            llm_config=llm_config,
            vit_config=vit_config,
            shapes=shapes,
            autoencoder=autoencoder,
            scaling_factor=scale,
            shift_factor=shift,
            attn_backend=attn_backend,
            gradient_checkpointing=gradient_checkpointing,
        )
        with torch.device("meta"):
            model = chatumm_bagel(**{k: v for k, v in spec.items() if k != COMPONENT_KEY}, autoencoder=autoencoder)
        _check_layout(kit_to_bagel_state(model), shapes, where=str(ema))
        state: dict[str, torch.Tensor] = {}
        vit_tensors: dict[str, torch.Tensor] = {}
        for key in f.keys():  # one tensor at a time; each becomes a parameter below
            tensor = _cast(f.get_tensor(key), dtype)
            if key.startswith(BAGEL_VIT_PREFIX):
                vit_tensors[key] = tensor
            else:
                state[bagel_to_kit_name(key)] = tensor
    state.update(
        bagel_vit_to_kit(
            vit_tensors, num_layers=spec["vit"]["num_layers"], max_patches_per_side=spec["vit"]["max_patches_per_side"]
        )
    )
    del vit_tensors
    _warn_on_position_tables(state, where=str(ema))
    _assign(model, state, where=str(ema), not_in_file=KIT_AUTOENCODER_PREFIX)
    tokenizer = _load_tokenizer(folder, vocab_size=spec["backbone"]["vocab_size"])
    return LoadedBagel(model=model.eval(), tokenizer=tokenizer, model_spec=spec)


# ---------------------------------------------------------------------------------------------------- writing


def qwen2_config_from_mot(config: MoTConfig) -> dict[str, Any]:
    """A Qwen2 ``config.json`` dict for a backbone (the inverse of ``convert.qwen2.mot_config_from_qwen2``).

    ``qk_norm`` and ``tie_word_embeddings`` are written for the reader's information; loaders force them (SPEC §5).
    """
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_eps,
        "rope_theta": config.rope_theta,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "qk_norm": config.qk_norm,
    }


def siglip_config_from_vit(vit: ViTEncoder) -> dict[str, Any]:
    """BAGEL's ``vit_config.json`` for an encoder: SigLIP depth = built layers + 1 (SPEC §5: loaders use depth − 1);
    ``image_size`` = grid side × patch, so the position table is the whole ``max_side²`` grid."""
    hp = vit.hparams
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": hp.hidden,
        "intermediate_size": hp.mlp_dim,
        "num_hidden_layers": hp.num_layers + 1,
        "num_attention_heads": hp.num_heads,
        "patch_size": hp.patch_size,
        "image_size": hp.max_patches_per_side * hp.patch_size,
        "layer_norm_eps": hp.layer_norm_eps,
        "num_channels": 3,
        "attention_dropout": 0.0,
    }


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _unrecorded_vae_settings(head: VAELatentHead) -> list[str]:
    """Settings ``ae.safetensors`` cannot carry that differ from what :func:`load_bagel` will assume (FLUX's)."""
    ae = head.autoencoder
    actual = autoencoder_config(ae)
    original = diffusers_to_original(ae.state_dict(), num_levels=len(actual["block_out_channels"]))
    assumed = infer_autoencoder_kwargs(original)
    diffs = [
        f"{k}={actual.get(k)!r} (load assumes {v!r})"
        for k, v in assumed.items()
        if k not in ("sample_size", "scaling_factor", "shift_factor") and actual.get(k) != v
    ]
    for name, value in (("scaling_factor", head.scaling_factor), ("shift_factor", head.shift_factor)):
        if value != assumed[name]:
            diffs.append(f"{name}={value!r} (load assumes {assumed[name]!r})")
    return diffs


def export_bagel(model: ChatUMM, folder: str | Path, *, tokenizer: ChatTokenizer | None = None) -> Path:
    """Write ``model`` as a BAGEL release folder; :func:`load_bagel` reads it back bit for bit.

    Writes ``llm_config.json``, ``vit_config.json``, ``ema.safetensors`` (BAGEL's key layout, the model's dtypes),
    ``ae.safetensors`` (FLUX original layout, via ``convert.flux_vae.save_flux_vae``) and, if given, the tokenizer
    (``tokenizer.json`` + the kit's sidecar).

    Raises:
        BagelConversionError: the model has no QK-norm (BAGEL's layout has it, SPEC §5) or a key with no BAGEL name.

    Warns:
        BagelConversionWarning: the autoencoder differs from FLUX in settings ``ae.safetensors`` cannot record
            (e.g. ``norm_num_groups``, the latent scale/shift): pass ``vae=`` when loading the folder back.
    """
    if not model.backbone.config.qk_norm:
        raise BagelConversionError("export_bagel: the backbone has qk_norm=False; BAGEL's layout has QK-norm (SPEC §5)")
    try:
        tensors = kit_to_bagel_state(model)
    except KeyError as err:
        raise BagelConversionError(f"export_bagel: {err.args[0]}") from None
    unrecorded = _unrecorded_vae_settings(model.vae)
    if unrecorded:
        warnings.warn(
            f"export_bagel: {AE_FILE} cannot record these autoencoder settings: {', '.join(unrecorded)}; "
            "pass vae= to load_bagel to keep them",
            BagelConversionWarning,
            stacklevel=2,
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / LLM_CONFIG, qwen2_config_from_mot(model.backbone.config))
    _write_json(folder / VIT_CONFIG, siglip_config_from_vit(model.vit))
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(folder / EMA_FILE), metadata={"format": "pt"})
    del tensors
    save_flux_vae(model.vae.autoencoder, folder / AE_FILE)
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


# ---------------------------------------------------------------------------------------------------- kit folder


def save_kit_folder(
    module: nn.Module, spec: Mapping[str, Any], folder: str | Path, *, tokenizer: ChatTokenizer | None = None
) -> Path:
    """Write the kit's model folder: ``model.safetensors`` (the module's state dict, kit names), ``model.json``
    (``spec``: the ``_component_`` node that rebuilds the module — a model spec, or a component's node) and the
    tokenizer if given.

    ``model.json`` of a ChatUMM is what a recipe puts under ``system.model``; ``model.safetensors`` is its
    ``init_from`` file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / SPEC_FILE, spec)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / MODEL_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def load_kit_folder(
    folder: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> KitFolder:
    """Read a folder written by :func:`save_kit_folder` (built on meta, weights read tensor by tensor).

    Raises:
        BagelConversionError: a missing file, or weights that do not match the spec's module (keys listed).
    """
    folder = Path(folder)
    spec = _read_json(folder / SPEC_FILE)
    weights = folder / MODEL_FILE
    if not weights.is_file():
        raise BagelConversionError(f"{folder}: missing {MODEL_FILE}")
    with torch.device("meta"):
        module = build_model(spec)  # a model spec, or any component's node (old {"preset": ...} specs too)
    device = torch.device(device if device is not None else "cpu")
    with safe_open(str(weights), framework="pt", device=str(device)) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        _check_layout(module.state_dict(), shapes, where=str(weights))
        state = {k: _cast(f.get_tensor(k), dtype) for k in f.keys()}
    _assign(module, state, where=str(weights))
    tokenizer = ChatTokenizer.from_file(folder) if (folder / TOKENIZER_FILE).is_file() else None
    return KitFolder(module=module.eval(), spec=spec, tokenizer=tokenizer)


def kit_folder(
    *,
    path: str,
    attn_backend: str | None = None,
    gradient_checkpointing: bool | None = None,
    timestep_shift: float | None = None,
    sample_posterior: bool | None = None,
) -> ChatUMM:
    """The model saved in a kit folder (``chatumm convert bagel-to-kit BAGEL_DIR KIT_DIR``), weights included: the
    ``_component_`` a recipe names under ``system.model`` to fine-tune a converted model.

    ``attn_backend`` / ``gradient_checkpointing`` override the saved settings (e.g. ``sdpa`` on CPU); so do the flow
    settings ``timestep_shift`` (training timestep shift, SPEC §4) and ``sample_posterior`` (latents sampled from
    the VAE posterior in training, SPEC §4.1) — recipe keys like any model spec's.
    """
    model = load_kit_folder(path).module
    return _with_settings(model, attn_backend, gradient_checkpointing, timestep_shift, sample_posterior).train()


def kit_folder_architecture(
    *,
    path: str,
    attn_backend: str | None = None,
    gradient_checkpointing: bool | None = None,
    timestep_shift: float | None = None,
    sample_posterior: bool | None = None,
) -> ChatUMM:
    """:func:`kit_folder`'s model built from the folder's ``model.json`` only — the weights are not read (build it
    under ``torch.device("meta")`` to fill it from a checkpoint of a recipe that started from the folder)."""
    model = build_model(_read_json(Path(path) / SPEC_FILE))
    return _with_settings(model, attn_backend, gradient_checkpointing, timestep_shift, sample_posterior)


def _with_settings(model, attn_backend, gradient_checkpointing, timestep_shift, sample_posterior) -> ChatUMM:
    if attn_backend is not None:
        model.backbone.config = replace(model.backbone.config, attn_backend=attn_backend)
    if gradient_checkpointing is not None:
        model.backbone.config = replace(model.backbone.config, gradient_checkpointing=gradient_checkpointing)
    if timestep_shift is not None:
        model.timestep_shift = float(timestep_shift)
    if sample_posterior is not None:
        model.sample_posterior = bool(sample_posterior)
    return model
