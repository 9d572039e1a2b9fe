"""BAGEL ``ema.safetensors`` key layout <-> :class:`~chatumm_kit.model.ChatUMM` state-dict names (SPEC §5).

The map is data: :data:`BAGEL_PREFIX_MAP` rows ``(BAGEL prefix, kit prefix)`` under which names are identical (the
kit's modules mirror BAGEL's names: ``MoTBackbone`` has BAGEL's ``language_model.model.*`` layout with its
``*_moe_gen`` twins; ``connector``, ``vae2llm``, ``llm2vae``, ``time_embedder.mlp.{0,2}``, ``*.pos_embed`` keep their
names). The SigLIP tower under :data:`BAGEL_VIT_PREFIX` goes through :mod:`chatumm_kit.convert.siglip`'s
``SIGLIP_KEY_MAP`` and its fix-ups (q/k/v fused into timm's ``qkv``), with one BAGEL-specific named fix-up:

* :func:`keep_linear_patch_embedding` — BAGEL stores the patch embedding already as a Linear ``[hidden, p*p*3]``
  in (row-in-patch, col-in-patch, channel) order, exactly the kit's layout; the SigLIP exporter would write a
  Conv2d, so the Linear weight is put back.

The autoencoder (``vae.autoencoder.*``) is not in ``ema.safetensors``: it is ``ae.safetensors`` in FLUX's original
layout (:mod:`chatumm_kit.convert.flux_vae`).

The two fixed sin-cos tables (``vit_pos_embed.pos_embed``, ``latent_pos_embed.pos_embed``) are stored in the file;
:func:`position_table_mismatch` compares a stored table with the kit's recomputed
:func:`~chatumm_kit.components.layers.sincos_2d_table` (the loader warns on a mismatch and keeps the stored values).

Example:
    >>> bagel_to_kit_name("language_model.model.layers.3.mlp_moe_gen.up_proj.weight")
    'backbone.layers.3.mlp_moe_gen.up_proj.weight'
    >>> kit_to_bagel_name("vae.time_embedder.mlp.2.bias")
    'time_embedder.mlp.2.bias'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from chatumm_kit.components.layers import sincos_2d_table
from chatumm_kit.components.vit import ViTEncoder
from chatumm_kit.convert.siglip import siglip_to_vit_state, vit_to_siglip_state

__all__ = [
    "BAGEL_PREFIX_MAP",
    "BAGEL_VIT_PREFIX",
    "KIT_AUTOENCODER_PREFIX",
    "KIT_VIT_PREFIX",
    "POSITION_TABLES",
    "PositionTableMismatch",
    "bagel_to_kit_name",
    "bagel_vit_to_kit",
    "keep_linear_patch_embedding",
    "kit_to_bagel_name",
    "kit_to_bagel_state",
    "position_table_mismatch",
    "shorten",
]

BAGEL_PREFIX_MAP: tuple[tuple[str, str], ...] = (
    ("language_model.lm_head.", "backbone.lm_head."),
    ("language_model.model.", "backbone."),
    ("connector.", "vit.connector."),
    ("vit_pos_embed.", "vit.vit_pos_embed."),
    ("vae2llm.", "vae.vae2llm."),
    ("llm2vae.", "vae.llm2vae."),
    ("time_embedder.", "vae.time_embedder."),
    ("latent_pos_embed.", "vae.latent_pos_embed."),
)
"""``(BAGEL prefix, kit prefix)``: below the prefix the names are the same on both sides."""

BAGEL_VIT_PREFIX = "vit_model.vision_model."
"""The SigLIP tower in ``ema.safetensors``; names below it follow ``convert.siglip.SIGLIP_KEY_MAP``."""
KIT_VIT_PREFIX = "vit."
"""Where the SigLIP tower lands in the kit (``ViTEncoder`` minus its connector and ``vit_pos_embed``)."""
KIT_AUTOENCODER_PREFIX = "vae.autoencoder."
"""Kit keys that live in ``ae.safetensors``, not in ``ema.safetensors``."""

POSITION_TABLES: tuple[tuple[str, str], ...] = (
    ("vit_pos_embed.pos_embed", "vit.vit_pos_embed.pos_embed"),
    ("latent_pos_embed.pos_embed", "vae.latent_pos_embed.pos_embed"),
)
"""The fixed 2-D sin-cos tables, ``(BAGEL key, kit key)`` (SPEC §5: a loader may recompute them)."""

_PATCH_WEIGHT = "embeddings.patch_embedding.weight"


def _swap_prefix(name: str, rows: list[tuple[str, str]]) -> str | None:
    """Replace the longest matching ``from`` prefix of ``rows`` by its ``to`` prefix (None: no row matches)."""
    best = max((r for r in rows if name.startswith(r[0])), key=lambda r: len(r[0]), default=None)
    return None if best is None else best[1] + name[len(best[0]) :]


def bagel_to_kit_name(name: str) -> str | None:
    """Kit name of a non-ViT BAGEL key, or None (a ViT key, handled by :func:`bagel_vit_to_kit`, or unknown)."""
    return _swap_prefix(name, list(BAGEL_PREFIX_MAP))


def kit_to_bagel_name(name: str) -> str | None:
    """BAGEL name of a kit key outside the SigLIP tower and the autoencoder, or None."""
    return _swap_prefix(name, [(kit, bagel) for bagel, kit in BAGEL_PREFIX_MAP])


def shorten(keys: list[str], *, limit: int = 20) -> str:
    """``"N [k1, k2, ...] (+M more)"`` for error messages."""
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} {keys[:limit]}{more}"


# ---------------------------------------------------------------------------------------------------- fix-ups


def keep_linear_patch_embedding(siglip_state: dict[str, torch.Tensor], vit: ViTEncoder) -> None:
    """Put the kit's Linear patch weight back in place of the Conv2d the SigLIP exporter wrote (BAGEL layout)."""
    siglip_state[_PATCH_WEIGHT] = vit.patch_embedding.weight.detach()


def bagel_vit_to_kit(
    vit_tensors: dict[str, torch.Tensor], *, num_layers: int, max_patches_per_side: int
) -> dict[str, torch.Tensor]:
    """BAGEL ``vit_model.vision_model.*`` tensors -> kit ``vit.*`` keys, through ``convert.siglip``.

    q/k/v are fused (``siglip.fuse_qkv``); the Linear patch weight passes through ``conv_patch_to_linear`` unchanged;
    the ``max_side²`` position table is placed on the same grid (an identity copy).
    """
    converted = siglip_to_vit_state(
        vit_tensors, num_layers=num_layers, max_patches_per_side=max_patches_per_side, prefix=BAGEL_VIT_PREFIX
    )
    return {KIT_VIT_PREFIX + k: v for k, v in converted.items()}


def kit_to_bagel_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A ``ChatUMM``'s ``ema.safetensors`` tensors under BAGEL names (autoencoder excluded).

    Works on a meta-device model too (then it gives the expected names and shapes without allocating). Tensors
    are the model's own (no copy) except the SigLIP tower, whose fused ``qkv`` is split into q/k/v copies.

    Raises:
        KeyError: a kit key has no BAGEL name (the model is not BAGEL-shaped).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(KIT_AUTOENCODER_PREFIX):
            continue
        name = kit_to_bagel_name(key)
        if name is not None:
            out[name] = value.detach()
        elif not key.startswith(KIT_VIT_PREFIX):
            raise KeyError(f"kit key {key!r} has no place in the BAGEL layout (SPEC §5)")
    vit: ViTEncoder = model.vit  # type: ignore[assignment]
    siglip = vit_to_siglip_state(vit)
    keep_linear_patch_embedding(siglip, vit)
    out.update({BAGEL_VIT_PREFIX + k: v for k, v in siglip.items()})
    return out


# ---------------------------------------------------------------------------------------------------- sin-cos tables


@dataclass(frozen=True)
class PositionTableMismatch:
    """A stored sin-cos table that is not the kit's recomputed one (``max_abs_diff`` over all entries)."""

    key: str
    max_abs_diff: float
    tolerance: float


def position_table_mismatch(key: str, table: torch.Tensor) -> PositionTableMismatch | None:
    """Compare a stored ``[side², dim]`` table with :func:`sincos_2d_table`; None when they agree.

    Tolerance: two ulps at 1.0 in the stored dtype (bf16 rounding of a value in [-1, 1] stays inside it).
    """
    side = round(table.shape[0] ** 0.5)
    expected = sincos_2d_table(dim=table.shape[1], max_side=side)
    tol = 2 * torch.finfo(table.dtype).eps if table.is_floating_point() else 0.0
    diff = float((table.detach().float().cpu() - expected).abs().max()) if table.numel() else 0.0
    return None if diff <= tol else PositionTableMismatch(key=key, max_abs_diff=diff, tolerance=tol)
