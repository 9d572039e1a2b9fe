"""Named model sizes: ``chatumm_tiny`` (the embedded ShapesChat world, CPU) and ``chatumm_bagel_7b`` (BAGEL-7B-MoT),
and :func:`build_model`, which builds the model a *model spec* describes.

A model spec is a recipe node like any other: ``{"_component_": dotted.path, **keyword arguments}`` naming a callable
that returns a :class:`~chatumm_kit.model.ChatUMM` — a preset here, :func:`chatumm_kit.convert.bagel.chatumm_bagel`
(BAGEL's architecture at any size) or :func:`chatumm_kit.convert.bagel.kit_folder` (a converted model folder). It
is what a recipe writes under ``system.model``, what a training system stores in its hyperparameters and what a kit
folder's ``model.json`` holds, so a checkpoint rebuilds its model without pickled objects. Specs written before the
kit used ``_component_`` here (``{"preset": NAME, ...}``) still load: :func:`model_spec` maps the old names.

Example:
    >>> model = build_model({"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": 300})
    >>> model.hidden_size
    64
    >>> model_spec({"preset": "chatumm_tiny", "vocab_size": 300})["_component_"]
    'chatumm_kit.presets.chatumm_tiny'
    >>> with torch.device("meta"):
    ...     big = chatumm_bagel_7b()
    >>> big.backbone.embed_tokens.weight.shape
    torch.Size([152064, 3584])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from chatumm_kit.components.masks import MaskBuilder
from chatumm_kit.components.mot import MoTBackbone
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.components.vae import FLUX_VAE_KWARGS, VAELatentHead, load_autoencoder_file, tiny_autoencoder
from chatumm_kit.components.vit import ViTEncoder
from chatumm_kit.config import AllowList, RecipeError, instantiate, validate_recipe
from chatumm_kit.config.instantiate import COMPONENT_KEY
from chatumm_kit.model import ChatUMM

__all__ = [
    "LEGACY_PRESET_NAMES",
    "build_model",
    "check_model_spec",
    "chatumm_bagel_7b",
    "chatumm_tiny",
    "flux_autoencoder_kwargs",
    "model_spec",
]

# The ``{"preset": NAME}`` model specs of checkpoints and kit folders written before ``_component_`` named the model.
LEGACY_PRESET_NAMES: dict[str, str] = {
    "chatumm_tiny": "chatumm_kit.presets.chatumm_tiny",
    "chatumm_bagel_7b": "chatumm_kit.presets.chatumm_bagel_7b",
    "chatumm_bagel": "chatumm_kit.convert.bagel.chatumm_bagel",
    "kit_folder": "chatumm_kit.convert.bagel.kit_folder",
}
_LEGACY_KEY = "preset"


def _vocab_size(vocab_size: int | None, tokenizer: str | None) -> int:
    if vocab_size is not None:
        return vocab_size
    if tokenizer is None:
        raise ValueError("a model preset needs vocab_size or tokenizer (a tokenizer.json path)")
    return ChatTokenizer.from_file(tokenizer).vocab_size


def chatumm_tiny(
    *,
    vocab_size: int | None = None,
    tokenizer: str | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vit_patch_size: int = 8,
    vit_hidden: int = 64,
    vit_layers: int = 2,
    vit_heads: int = 4,
    vit_max_side: int = 16,
    latent_channels: int = 4,
    vae_downsample: int = 4,
    max_latent_side: int = 16,
    vae_weights: str | None = None,
    attn_backend: str = "sdpa",
    gradient_checkpointing: bool = False,
    timestep_shift: float = 1.0,
    sample_posterior: bool = False,
) -> ChatUMM:
    """A ChatUMM small enough to train on a laptop CPU on 32×32 ShapesChat images.

    With the defaults a 32×32 image is 16 ViT tokens (patch 8) and 16 VAE tokens (4× autoencoder → 8×8 latents,
    2×2 latent patches), so the packer's ``vit_patch_size`` is 8 and its ``vae_token_stride`` is 8.

    Args:
        vocab_size: token table size; or give ``tokenizer`` and it is read from the file.
        vae_weights: a safetensors file written by :class:`~chatumm_kit.training.callbacks.ExportAutoencoder`
            (the ``shapes/vae`` recipe); without it the autoencoder is randomly initialised.
        timestep_shift / sample_posterior: the flow-matching settings of :class:`~chatumm_kit.model.ChatUMM`
            (training timestep shift; latents sampled from the VAE posterior, off for ShapesChat).
    """
    vocab = _vocab_size(vocab_size, tokenizer)
    backbone = MoTBackbone(
        vocab_size=vocab,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size,
        attn_backend=attn_backend,
        gradient_checkpointing=gradient_checkpointing,
    )
    backbone.init_generation_from_understanding()  # SPEC §4: the gen expert starts as a copy of und
    vit = ViTEncoder(
        patch_size=vit_patch_size,
        hidden=vit_hidden,
        num_layers=vit_layers,
        num_heads=vit_heads,
        mlp_dim=4 * vit_hidden,
        max_patches_per_side=vit_max_side,
        llm_hidden=hidden_size,
    )
    autoencoder = tiny_autoencoder(latent_channels=latent_channels, downsample=vae_downsample)
    scale, shift = load_autoencoder_file(autoencoder, vae_weights) if vae_weights else (1.0, 0.0)
    vae = VAELatentHead(
        hidden=hidden_size,
        autoencoder=autoencoder,
        scaling_factor=scale,
        shift_factor=shift,
        max_latent_side=max_latent_side,
    )
    return ChatUMM(
        backbone=backbone,
        vit=vit,
        vae=vae,
        mask_builder=MaskBuilder(),
        timestep_shift=timestep_shift,
        sample_posterior=sample_posterior,
    )


def chatumm_bagel_7b(
    *,
    vocab_size: int = 152064,
    attn_backend: str = "flex",
    gradient_checkpointing: bool = True,
    timestep_shift: float = 1.0,
    sample_posterior: bool = False,
) -> ChatUMM:
    """The BAGEL-7B-MoT shapes (SPEC §5): Qwen2.5-7B MoT, SigLIP so400m (26 of 27 layers), FLUX VAE.

    Build it under ``torch.device("meta")`` to inspect or shard it without allocating; weights come from
    :mod:`chatumm_kit.convert.bagel`. ``sample_posterior=True`` trains on latents sampled from the VAE posterior, as BAGEL does (the BAGEL recipes set it).
    """
    backbone = MoTBackbone(
        vocab_size=vocab_size,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=18944,
        rope_theta=1e6,
        attn_backend=attn_backend,
        gradient_checkpointing=gradient_checkpointing,
    )
    vit = ViTEncoder(
        patch_size=14,
        hidden=1152,
        num_layers=26,
        num_heads=16,
        mlp_dim=4304,
        max_patches_per_side=70,
        llm_hidden=3584,
        gradient_checkpointing=gradient_checkpointing,
    )
    vae = VAELatentHead(hidden=3584, autoencoder_kwargs=flux_autoencoder_kwargs(), max_latent_side=64)
    return ChatUMM(
        backbone=backbone,
        vit=vit,
        vae=vae,
        mask_builder=MaskBuilder(),
        timestep_shift=timestep_shift,
        sample_posterior=sample_posterior,
    )


def flux_autoencoder_kwargs() -> dict[str, Any]:
    """``AutoencoderKL`` arguments of the FLUX VAE (8× downsampling, 16 latent channels, no quant convs)."""
    return dict(FLUX_VAE_KWARGS)


def model_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` in the ``_component_`` form (an old ``{"preset": NAME}`` spec mapped through
    :data:`LEGACY_PRESET_NAMES`); raises :class:`~chatumm_kit.config.RecipeError` naming ``model.preset`` when the
    old name is unknown, or ``model`` when the spec names no callable at all."""
    spec = dict(spec)
    if COMPONENT_KEY in spec:
        return spec
    if _LEGACY_KEY not in spec:
        raise RecipeError(f"model: a model spec needs {COMPONENT_KEY} (e.g. chatumm_kit.presets.chatumm_tiny)")
    name = spec.pop(_LEGACY_KEY)
    if name not in LEGACY_PRESET_NAMES:
        raise RecipeError(f"model.preset: unknown preset {name!r} (known: {', '.join(LEGACY_PRESET_NAMES)})")
    return {COMPONENT_KEY: LEGACY_PRESET_NAMES[name], **spec}


def check_model_spec(spec: Mapping[str, Any], *, allow: AllowList | None = None) -> None:
    """Raise :class:`~chatumm_kit.config.RecipeError` naming ``model.KEY`` when ``spec`` does not bind to its
    callable's signature (the recipe validator's own rule, run on the one node; nothing is built)."""
    validate_recipe({"model": model_spec(spec)}, allow=allow)


def build_model(spec: Mapping[str, Any], *, allow: AllowList | None = None) -> ChatUMM:
    """Build the model a spec describes, through the recipe engine (the allow-list applies)."""
    return instantiate(model_spec(spec), allow=allow, path="model")
