"""Image → scene: read a ShapesChat image back, exactly on clean renders and gracefully on generated ones.

The detector mirrors the renderer cell by cell (objects never leave their cell, see :mod:`.geometry`):

1. every pixel is explained as a palette colour blended with the background (blur and anti-aliasing blend edges:
   a pale orange edge pixel is orange at 60 %, not yellow), see :func:`_blend`; it is foreground when the blend
   fraction of its best colour is at least ``_FOREGROUND``. A clean render's pixels are exactly 0 or 1;
2. the cell's foreground mask is compared in Hamming distance with every (shape, size) stamp, also shifted by up to
   ``max_shift`` pixels so a slightly off-centre generated object still matches; the nearest wins, and the cell
   holds an object only when that stamp is nearer than the empty cell is (so scattered noise pixels read as empty).
   Unshifted stamps come first and ties go to the first, so a clean render — whose mask *is* its stamp, distance 0,
   while no other stamp equals it (checked by :class:`WorldConfig`) — is read back exactly;
3. the colour is the palette colour with the least blend cost summed over the foreground pixels inside the matched
   stamp (summing averages noise away; pixels spilled in from a neighbour are left out).

Example:
    >>> from chatumm_kit.data.shapes import Scene, ShapeObject, WorldConfig, render
    >>> cfg = WorldConfig()
    >>> scene = Scene(objects=(ShapeObject(shape="triangle", colour="blue", size="small", cell=8),))
    >>> detect(render(scene, cfg), cfg) == scene
    True
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .render import stamps
from .scene import Scene, ShapeObject, WorldConfig

__all__ = ["detect", "detect_batch", "to_float_image"]

_CHUNK = 512  # images per vectorised step: bounds the [B * H * W, colours] blend tensors
_FOREGROUND = 0.45  # a pixel is foreground when at least this blend of its best palette colour (see _blend)
_LAMBDA = 0.1  # prior towards unblended colours in the colour cost (see _blend)


def to_float_image(image: Tensor) -> Tensor:
    """uint8 images (0–255) or float images in [0, 1] → float32 in 0–255 units (same shape).

    Raises ``ValueError`` for a float image far outside [0, 1] (e.g. a [-1, 1] or 0–255 float tensor).
    """
    if image.dtype == torch.uint8:
        return image.to(torch.float32)
    if not image.is_floating_point():
        raise ValueError(f"detect: expected a uint8 or float image, got dtype {image.dtype}")
    lo, hi = float(image.min()), float(image.max())
    if lo < -0.5 or hi > 1.5:
        raise ValueError(f"detect: float images must be in [0, 1]; got values in [{lo:.3g}, {hi:.3g}]")
    return image.to(torch.float32).clamp(0, 1) * 255.0


@functools.lru_cache(maxsize=64)
def _templates(config: WorldConfig, max_shift: int) -> tuple[Tensor, Tensor, int]:
    """Binary stamps, shifted: (``[K * S * Z, cs * cs]`` masks, their areas, number of (shape, size) pairs).

    Shift 0 comes first so ``argmin`` prefers an exact unshifted match.
    """
    base = stamps(config, 1)  # [S, Z, cs, cs]
    s, z, cs, _ = base.shape
    flat = base.reshape(s * z, cs, cs)
    shifts = [(0, 0)] + [
        (dy, dx)
        for dy in range(-max_shift, max_shift + 1)
        for dx in range(-max_shift, max_shift + 1)
        if (dy, dx) != (0, 0)
    ]
    out = []
    for dy, dx in shifts:
        padded = F.pad(flat, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))  # shift, then crop back to cs
        out.append(padded[:, max(-dy, 0) : max(-dy, 0) + cs, max(-dx, 0) : max(-dx, 0) + cs])
    masks = torch.cat(out).reshape(len(shifts) * s * z, cs * cs)
    return masks, masks.sum(-1), s * z


@functools.lru_cache(maxsize=64)
def _refs(config: WorldConfig) -> Tensor:
    """``[1 + C, 3]`` float32: the background, then the palette colours."""
    return torch.tensor([config.background, *config.palette.values()], dtype=torch.float32)


def detect(image: Tensor, config: WorldConfig, *, max_shift: int = 1) -> Scene:
    """Detect the scene in one image.

    Args:
        image: uint8 ``[3, H, W]`` (0–255) or float ``[3, H, W]`` in [0, 1]; ``H = W = config.image_size``.
        config: the world the image belongs to.
        max_shift: pixels a stamp may be shifted when matching shapes (0 = centred only).

    Returns:
        the detected :class:`Scene` (any number of objects, at most one per cell).
    """
    if image.dim() != 3:
        raise ValueError(f"detect: expected [3, H, W], got {tuple(image.shape)}; use detect_batch for batches")
    return detect_batch(image.unsqueeze(0), config, max_shift=max_shift)[0]


def detect_batch(images: Tensor, config: WorldConfig, *, max_shift: int = 1) -> list[Scene]:
    """Detect scenes in a batch ``[B, 3, H, W]`` (uint8 or float in [0, 1]); same rules as :func:`detect`."""
    size = config.image_size
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
        raise ValueError(f"detect: expected [B, 3, {size}, {size}] for image_size={size}, got {tuple(images.shape)}")
    scenes: list[Scene] = []
    for start in range(0, images.shape[0], _CHUNK):
        scenes.extend(_detect_chunk(to_float_image(images[start : start + _CHUNK]), config, max_shift))
    return scenes


def _blend(pixels: Tensor, refs: Tensor) -> tuple[Tensor, Tensor]:
    """Explain each pixel as palette colour k blended with the background: (cost, blend fraction).

    Blur and anti-aliasing mix an object's colour with the background along the segment ``bg → colour``, so an edge
    pixel of an orange shape is a pale orange, not a yellow. The cost is ``min_a |r - a d|^2 + LAMBDA (1 - a)^2 |d|^2``
    with ``r = pixel - bg``, ``d = colour - bg``, ``a in [0, 1]``: zero only for the exact colour (a = 1), small for
    its blends, and the ``LAMBDA`` prior keeps a pure colour from being read as a blend of a darker palette colour.
    The blend fraction is the plain projection ``r·d / |d|^2`` (0 = background, 1 = the pure colour).

    Args:
        pixels: float ``[N, 3]`` in 0–255; refs: ``[1 + C, 3]`` (background first).
    Returns:
        cost ``[N, C]`` and blend fraction ``[N, C]``.
    """
    r = pixels - refs[0]
    d = refs[1:] - refs[0]  # [C, 3]
    dd = (d * d).sum(-1)  # [C]
    dr = r @ d.T  # [N, C]
    frac = dr / dd
    a = ((frac + _LAMBDA) / (1 + _LAMBDA)).clamp(0, 1)
    cost = (r * r).sum(-1, keepdim=True) - 2 * a * dr + a * a * dd + _LAMBDA * (1 - a) ** 2 * dd
    return cost, frac


def _detect_chunk(x: Tensor, config: WorldConfig, max_shift: int) -> list[Scene]:
    layout, g = config.layout, config.grid
    cs, m = layout.cell_px, layout.margin
    b, cells, p = x.shape[0], g * g, cs * cs
    refs = _refs(config)
    board = x[:, :, m : m + g * cs, m : m + g * cs]
    # [B, 3, g*cs, g*cs] → one row per pixel, grouped by cell: [B * cells * P, 3]
    pix = board.reshape(b, 3, g, cs, g, cs).permute(0, 2, 4, 3, 5, 1).reshape(-1, 3)
    cost, frac = _blend(pix, refs)
    nearest = cost.argmin(-1, keepdim=True)
    fg = (frac.gather(-1, nearest) >= _FOREGROUND).view(b * cells, p).to(torch.float32)
    n_fg = fg.sum(-1)

    masks, areas, pairs = _templates(config, max_shift)
    hamming = n_fg[:, None] + areas - 2.0 * (fg @ masks.T)  # [B * cells, K * S * Z]
    best_dist, best = hamming.min(-1)
    present = best_dist < n_fg  # some stamp explains the mask better than the empty cell (distance n_fg) does

    # Colour: blend cost summed over the foreground pixels inside the matched stamp (not over pixels spilled in).
    inside = (fg * masks[best]).unsqueeze(1)  # [B * cells, 1, P]
    colour = (inside @ cost.view(b * cells, p, -1)).squeeze(1).argmin(-1)  # [B * cells]
    best = best % pairs  # shape-major (shape, size) index

    shapes, sizes, colours = config.shapes, tuple(config.sizes), tuple(config.palette)
    nz = len(sizes)
    objs: list[list[ShapeObject]] = [[] for _ in range(b)]
    hits = present.nonzero().flatten()
    for flat, t, k in zip(hits.tolist(), best[hits].tolist(), colour[hits].tolist()):
        i, c = divmod(flat, cells)
        objs[i].append(ShapeObject(shape=shapes[t // nz], colour=colours[k], size=sizes[t % nz], cell=c))
    return [Scene(objects=tuple(o)) for o in objs]
