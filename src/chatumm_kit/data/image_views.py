"""Pixel views of one image for the stream: the ViT view (patches) and the VAE view (pixels in [-1, 1]) (SPEC §2, §4).

Both views keep the image's native aspect ratio as well as a grid allows: each side is a multiple of the view's token
stride (ViT patch size, or VAE downsample × latent patch = 16 for FLUX); the sizes themselves follow a
:class:`~chatumm_kit.data.view_sizing.ViewSizing` policy.

Example:
    >>> fit_size(32, 48, multiple=14, max_side=980)
    (28, 42)
    >>> img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    >>> vit_patches(resize_image(img, (32, 32)), patch=16, mean=(0.5,) * 3, std=(0.5,) * 3).shape
    torch.Size([4, 768])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from chatumm_kit.components.layers import grid_rc  # the token grid of a view (re-exported for the data tier)
from chatumm_kit.data.view_sizing import ViewRule

__all__ = ["fit_size", "resize_image", "vit_patches", "vae_pixels", "grid_rc"]


def fit_size(height: int, width: int, *, multiple: int, max_side: int) -> tuple[int, int]:
    """Target ``(h, w)``: multiples of ``multiple``, each ``<= max_side``, aspect ratio kept as well as possible.

    The image is scaled down (never up) so its longer side fits the cap, then each side is rounded to the nearest
    multiple (at least one ``multiple``): :class:`~chatumm_kit.data.view_sizing.ViewRule` with no minimum side.
    """
    return ViewRule(max_side=max_side, stride=multiple).size(height, width)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``uint8 [3, H, W]`` → ``float32 [3, h, w]`` in ``[0, 255]`` (antialiased bicubic; exact copy if same size)."""
    x = image.to(torch.float32)
    if tuple(image.shape[-2:]) == tuple(size):
        return x
    x = F.interpolate(x[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    return x.clamp_(0.0, 255.0)


def vit_patches(pixels: torch.Tensor, *, patch: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[3, h, w]`` in ``[0, 255]`` → ``[gh*gw, patch*patch*3]`` normalised patches, row-major over the grid.

    Each patch is flattened as (row-in-patch, col-in-patch, channel), the order of a Linear patch embedding (SPEC §4).
    """
    c, h, w = pixels.shape
    if h % patch or w % patch:
        raise ValueError(f"vit_patches: {h}x{w} is not a multiple of patch {patch}")
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = (pixels / 255.0 - m) / s
    gh, gw = h // patch, w // patch
    # [C, gh, p, gw, p] -> [gh, gw, p_row, p_col, C]
    return x.reshape(c, gh, patch, gw, patch).permute(1, 3, 2, 4, 0).reshape(gh * gw, patch * patch * c).contiguous()


def vae_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """``[3, h, w]`` in ``[0, 255]`` → the same in ``[-1, 1]`` (the VAE's input range)."""
    return pixels / 127.5 - 1.0
