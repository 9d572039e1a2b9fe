"""Named model sizes: ``chatumm_tiny`` (the embedded ShapesChat world, CPU) and ``chatumm_bagel_7b`` (BAGEL-7B-MoT).

A *model spec* is a plain mapping ``{"preset": NAME, **keyword arguments of that preset}``: what a recipe writes
under ``system.model`` and what a training system stores in its hyperparameters, so a checkpoint can rebuild the
model without pickled objects.

Example:
    >>> model = build_model({"preset": "chatumm_tiny", "vocab_size": 300})
    >>> model.hidden_size
    64
    >>> with torch.device("meta"):
    ...     big = chatumm_bagel_7b()
    >>> big.backbone.embed_tokens.weight.shape
    torch.Size([152064, 3584])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from chatumm_kit.components.masks import MaskBuilder
from chatumm_kit.components.mot import MoTBackbone
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.components.vae import VAELatentHead, tiny_autoencoder
from chatumm_kit.components.vit import ViTEncoder
from chatumm_kit.model import ChatUMM
from chatumm_kit.training.callbacks import load_autoencoder_file

__all__ = ["PRESETS", "build_model", "check_model_spec", "chatumm_tiny", "chatumm_bagel_7b"]


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
) -> ChatUMM:
    """A ChatUMM small enough to train on a laptop CPU on 32×32 ShapesChat images.

    With the defaults a 32×32 image is 16 ViT tokens (patch 8) and 16 VAE tokens (4× autoencoder → 8×8 latents,
    2×2 latent patches), so the packer's ``vit_patch_size`` is 8 and its ``vae_token_stride`` is 8.

    Args:
        vocab_size: token table size; or give ``tokenizer`` and it is read from the file.
        vae_weights: a safetensors file written by :class:`~chatumm_kit.training.callbacks.ExportAutoencoder`
            (the ``shapes/vae`` recipe); without it the autoencoder is randomly initialised.
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
    return ChatUMM(backbone=backbone, vit=vit, vae=vae, mask_builder=MaskBuilder(), timestep_shift=timestep_shift)


def chatumm_bagel_7b(
    *,
    vocab_size: int = 152064,
    attn_backend: str = "flex",
    gradient_checkpointing: bool = True,
    timestep_shift: float = 1.0,
) -> ChatUMM:
    """The BAGEL-7B-MoT shapes (SPEC §5): Qwen2.5-7B MoT, SigLIP so400m (26 of 27 layers), FLUX VAE.

    Build it under ``torch.device("meta")`` to inspect or shard it without allocating; weights come from
    :mod:`chatumm_kit.convert.bagel`.
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
    return ChatUMM(backbone=backbone, vit=vit, vae=vae, mask_builder=MaskBuilder(), timestep_shift=timestep_shift)


def flux_autoencoder_kwargs() -> dict[str, Any]:
    """``AutoencoderKL`` arguments of the FLUX VAE (8× downsampling, 16 latent channels, no quant convs)."""
    from chatumm_kit.convert.flux_vae import FLUX_VAE_KWARGS

    return dict(FLUX_VAE_KWARGS)


def chatumm_bagel(**kwargs: Any) -> ChatUMM:
    """BAGEL's architecture at any size, from the component keyword arguments a converted ``model.json`` holds
    (see :func:`chatumm_kit.convert.bagel.bagel_model_spec`)."""
    from chatumm_kit.convert.bagel import chatumm_bagel as build

    return build(**kwargs)


def kit_folder(*, path: str, attn_backend: str | None = None, gradient_checkpointing: bool | None = None) -> ChatUMM:
    """The model saved in a kit folder (``chatumm convert bagel-to-kit BAGEL_DIR KIT_DIR``), weights included.

    ``attn_backend`` / ``gradient_checkpointing`` override the saved settings (e.g. ``sdpa`` on CPU).
    """
    from chatumm_kit.convert.bagel import load_kit_folder

    model = load_kit_folder(path).module
    if attn_backend is not None:
        model.backbone.config = replace(model.backbone.config, attn_backend=attn_backend)
    if gradient_checkpointing is not None:
        model.backbone.config = replace(model.backbone.config, gradient_checkpointing=gradient_checkpointing)
    return model.train()


PRESETS: dict[str, Callable[..., ChatUMM]] = {
    "kit_folder": kit_folder,
    "chatumm_tiny": chatumm_tiny,
    "chatumm_bagel_7b": chatumm_bagel_7b,
    "chatumm_bagel": chatumm_bagel,
}


def _split_spec(spec: Mapping[str, Any]) -> tuple[Callable[..., ChatUMM], dict[str, Any]]:
    kwargs = dict(spec)
    name = kwargs.pop("preset", None)
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name], kwargs


def check_model_spec(spec: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the key when ``spec`` does not bind to its preset's signature."""
    fn, kwargs = _split_spec(spec)
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # a forwarding preset: its target checks the keys when it builds
    for key in kwargs:
        if key not in params:
            raise ValueError(f"model.{key}: unexpected keyword argument {key!r} for preset {spec['preset']!r}")


def build_model(spec: Mapping[str, Any]) -> ChatUMM:
    """Build the model a spec describes."""
    check_model_spec(spec)
    fn, kwargs = _split_spec(spec)
    return fn(**kwargs)
