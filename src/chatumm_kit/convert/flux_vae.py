"""FLUX ``ae.safetensors`` (original BFL / LDM layout) <-> diffusers ``AutoencoderKL`` (SPEC §4–5).

Loading uses diffusers' own converter for original single-file VAE layouts,
``diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint`` (offline: it only renames and reshapes). The
original layout, for reference (facts of the format):

* ``encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}``, ``encoder.down.{i}.downsample.conv``
  (every level but the last), ``encoder.mid.block_{1,2}``, ``encoder.mid.attn_1.{norm,q,k,v,proj_out}`` (1×1
  convolutions ``[C, C, 1, 1]``), ``encoder.norm_out``, ``encoder.conv_{in,out}``;
* ``decoder.up.{i}.block.{j}`` and ``decoder.up.{i}.upsample.conv`` indexed by **resolution level** (``up.0`` is the
  full-resolution level, no upsample) — diffusers' ``up_blocks`` run in the opposite order;
* no ``quant_conv`` / ``post_quant_conv`` in FLUX (``use_quant_conv=False``); older LDM VAEs have them.

:func:`diffusers_to_original` is the inverse (export, and the check that every input key was used): a loaded
checkpoint is mapped back and must reproduce exactly the keys it came from, otherwise the keys the converter
ignored are reported. The architecture is inferred from tensor shapes (:func:`infer_autoencoder_kwargs`) unless a
config is given; ``norm_num_groups`` cannot be read from weights (FLUX: 32).

Example:
    >>> ae = load_flux_vae("/path/to/BAGEL-7B-MoT/ae.safetensors")          # doctest: +SKIP
    >>> ae.encode(images).latent_dist.mode().shape[1]                       # doctest: +SKIP
    16
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from chatumm_kit.components.vae import FLUX_VAE_KWARGS, autoencoder_config

__all__ = [
    "FluxVAEConversionError",
    "diffusers_to_original",
    "infer_autoencoder_kwargs",
    "load_flux_vae",
    "original_to_diffusers",
    "save_flux_vae",
]

# Export key map (diffusers -> original) as data: regex over the diffusers key, template for the original key.
# ``{lvl}`` is the decoder's resolution level ``num_levels − 1 − up_block index``; ``{res}`` renames a resnet part.
_EXPORT_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), t)
    for p, t in (
        (
            r"encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<part>\w+)\.(?P<p>\w+)$",
            "encoder.down.{i}.block.{j}.{res}.{p}",
        ),
        (
            r"encoder\.down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv\.(?P<p>\w+)$",
            "encoder.down.{i}.downsample.conv.{p}",
        ),
        (
            r"decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<part>\w+)\.(?P<p>\w+)$",
            "decoder.up.{lvl}.block.{j}.{res}.{p}",
        ),
        (r"decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0\.conv\.(?P<p>\w+)$", "decoder.up.{lvl}.upsample.conv.{p}"),
        (
            r"(?P<side>encoder|decoder)\.mid_block\.resnets\.(?P<j>\d+)\.(?P<part>\w+)\.(?P<p>\w+)$",
            "{side}.mid.block_{j1}.{res}.{p}",
        ),
        (
            r"(?P<side>encoder|decoder)\.mid_block\.attentions\.0\.(?P<part>group_norm|to_q|to_k|to_v|to_out\.0)\.(?P<p>\w+)$",
            "{side}.mid.attn_1.{attn}.{p}",
        ),
        (r"(?P<side>encoder|decoder)\.conv_norm_out\.(?P<p>\w+)$", "{side}.norm_out.{p}"),
        (r"(?P<side>encoder|decoder)\.(?P<part>conv_in|conv_out)\.(?P<p>\w+)$", "{side}.{part}.{p}"),
        (r"(?P<part>quant_conv|post_quant_conv)\.(?P<p>\w+)$", "{part}.{p}"),
    )
]
_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}  # every other resnet part keeps its name
_ATTN_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class FluxVAEConversionError(ValueError):
    """A VAE checkpoint does not match the autoencoder (names the keys at fault)."""


def infer_autoencoder_kwargs(original: dict[str, torch.Tensor], *, norm_num_groups: int = 32) -> dict[str, Any]:
    """``AutoencoderKL`` constructor arguments read off an original-layout state dict's shapes.

    Example:
        >>> infer_autoencoder_kwargs(load_file("ae.safetensors"))["latent_channels"]     # doctest: +SKIP
        16
    """
    try:
        levels = sorted({int(m.group(1)) for k in original if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        widths = [int(original[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
        per_level = {int(m.group(1)) for k in original if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        kwargs = dict(FLUX_VAE_KWARGS)
        kwargs.update(
            in_channels=int(original["encoder.conv_in.weight"].shape[1]),
            out_channels=int(original["decoder.conv_out.weight"].shape[0]),
            down_block_types=["DownEncoderBlock2D"] * len(levels),
            up_block_types=["UpDecoderBlock2D"] * len(levels),
            block_out_channels=widths,
            layers_per_block=len(per_level),
            latent_channels=int(original["decoder.conv_in.weight"].shape[1]),
            norm_num_groups=norm_num_groups,
            use_quant_conv="quant_conv.weight" in original,
            use_post_quant_conv="post_quant_conv.weight" in original,
            mid_block_add_attention="encoder.mid.attn_1.q.weight" in original,
        )
    except KeyError as err:
        raise FluxVAEConversionError(f"not an original-layout VAE state dict: no key {err}") from err
    if not levels or levels != list(range(len(levels))):
        raise FluxVAEConversionError(f"encoder.down levels {levels} are not 0..n-1")
    return kwargs


def diffusers_to_original(state: dict[str, torch.Tensor], *, num_levels: int) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> original (FLUX ``ae.safetensors``) layout.

    ``num_levels`` is ``len(block_out_channels)`` (needed to reverse the decoder's block order). Named fix-up:
    attention q/k/v/proj_out weights become 1×1 convolution weights ``[C, C, 1, 1]`` (diffusers keeps Linear).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        hit = next(((m, t) for pattern, t in _EXPORT_RULES if (m := pattern.match(key))), None)
        if hit is None:
            raise FluxVAEConversionError(f"diffusers key {key!r} has no original-layout name")
        m, template = hit
        g = m.groupdict()
        fields = dict(g)
        if "i" in g:
            fields["lvl"] = num_levels - 1 - int(g["i"])
        if "j" in g:
            fields["j1"] = int(g["j"]) + 1  # mid.block_1 / block_2
        if "part" in g:
            fields["res"] = _RESNET_PARTS.get(g["part"], g["part"])
            fields["attn"] = _ATTN_PARTS.get(g["part"], g["part"])
        if ".attentions." in key and g["part"] != "group_norm" and g["p"] == "weight" and value.ndim == 2:
            value = value[:, :, None, None]  # Linear -> 1×1 conv
        out[template.format(**fields)] = value
    return out


def original_to_diffusers(original: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Original layout -> diffusers keys with diffusers' converter; raises if any input key went unused."""
    converted = convert_ldm_vae_checkpoint(original, kwargs)
    converted = {k: v for k, v in converted.items() if v is not None}
    roundtrip = diffusers_to_original(converted, num_levels=len(kwargs["block_out_channels"]))
    unused = sorted(original.keys() - roundtrip.keys())
    if unused:
        raise FluxVAEConversionError(f"original-layout keys the converter did not use: {unused}")
    return converted


def load_flux_vae(
    path: str | Path,
    *,
    kwargs: dict[str, Any] | None = None,
    norm_num_groups: int = 32,
    dtype: torch.dtype | None = None,
) -> AutoencoderKL:
    """Load an original-layout VAE file (FLUX ``ae.safetensors``) into a diffusers ``AutoencoderKL``.

    Args:
        path: the ``.safetensors`` file.
        kwargs: ``AutoencoderKL`` constructor arguments; inferred from shapes when None (scale/shift: FLUX's).
        norm_num_groups: GroupNorm groups when inferring (FLUX: 32).
        dtype: cast to this dtype after loading (default float32).

    Raises:
        FluxVAEConversionError: keys the converter ignored, or autoencoder weights left unfilled / with no place.
    """
    original = load_file(str(path))
    kwargs = infer_autoencoder_kwargs(original, norm_num_groups=norm_num_groups) if kwargs is None else dict(kwargs)
    converted = original_to_diffusers(original, kwargs)
    ae = AutoencoderKL(**kwargs)
    expected = ae.state_dict().keys()
    missing, extra = sorted(expected - converted.keys()), sorted(converted.keys() - expected)
    if missing or extra:
        raise FluxVAEConversionError(
            f"{path}: autoencoder weights missing {missing}; converted keys with no place {extra}"
        )
    ae.load_state_dict(converted, strict=True)
    ae.eval()
    return ae.to(dtype) if dtype is not None else ae


def save_flux_vae(autoencoder: AutoencoderKL, path: str | Path) -> Path:
    """Write an ``AutoencoderKL`` in the original layout (what :func:`load_flux_vae` reads)."""
    num_levels = len(autoencoder_config(autoencoder)["block_out_channels"])
    state = diffusers_to_original(autoencoder.state_dict(), num_levels=num_levels)
    path = Path(path)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path
