"""Scene → image: rasterise a ShapesChat scene with coordinate grids (no drawing library, exact, batched).

Each (shape, size) is stamped once per config as a cell-sized coverage mask (:mod:`.geometry`); a render fills every
cell with the background and blends the stamp of its object, then tiles the cells onto the canvas. Without
anti-aliasing the coverage is binary, so every pixel is exactly the background or a palette colour — the property
that lets :func:`~chatumm_kit.data.shapes.detect.detect` invert renders exactly.

Example:
    >>> from chatumm_kit.data.shapes import Scene, ShapeObject, WorldConfig
    >>> cfg = WorldConfig()
    >>> img = render(Scene(objects=(ShapeObject(shape="square", colour="red", size="large", cell=0),)), cfg)
    >>> img.dtype, tuple(img.shape), img[:, 5, 5].tolist()
    (torch.uint8, (3, 32, 32), [220, 20, 40])
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from .geometry import shape_stamps
from .scene import Scene, WorldConfig

__all__ = ["render", "render_batch", "stamps"]

_AA_SUPERSAMPLE = 4


@functools.lru_cache(maxsize=64)
def stamps(config: WorldConfig, supersample: int = 1) -> Tensor:
    """Cached coverage masks ``[len(shapes), len(sizes), cell_px, cell_px]`` (float32 in [0, 1]) of a config."""
    return shape_stamps(
        cell_px=config.layout.cell_px, shapes=config.shapes, half_extents=config.half_extents, supersample=supersample
    )


def render(scene: Scene, config: WorldConfig, *, antialias: bool = False) -> Tensor:
    """Render one scene.

    Args:
        scene: the scene; every attribute must belong to ``config``.
        config: the world (vocabulary, image size, background).
        antialias: blend edge pixels by sub-pixel coverage (4×4 supersampling). Off by default: plain renders
            hold only background and palette colours, which the detector inverts exactly.

    Returns:
        uint8 ``[3, image_size, image_size]``.
    """
    return render_batch([scene], config, antialias=antialias)[0]


def render_batch(scenes: Sequence[Scene], config: WorldConfig, *, antialias: bool = False) -> Tensor:
    """Render many scenes at once: uint8 ``[len(scenes), 3, image_size, image_size]`` (same rules as :func:`render`)."""
    layout, g, size = config.layout, config.grid, config.image_size
    cs = layout.cell_px
    shape_ix = {s: i for i, s in enumerate(config.shapes)}
    size_ix = {s: i for i, s in enumerate(config.sizes)}
    colours = torch.tensor(list(config.palette.values()), dtype=torch.float32)  # [C, 3]
    colour_ix = {c: i for i, c in enumerate(config.palette)}
    bg = torch.tensor(config.background, dtype=torch.float32)

    rows: list[tuple[int, int, int, int, int]] = []
    for b, scene in enumerate(scenes):
        config.validate_scene(scene)
        rows.extend((b, o.cell, shape_ix[o.shape], size_ix[o.size], colour_ix[o.colour]) for o in scene.objects)

    n = len(scenes)
    cells = bg.view(1, 1, 3, 1, 1).expand(n, g * g, 3, cs, cs).clone()  # [B, cells, 3, cs, cs]
    if rows:
        idx = torch.tensor(rows, dtype=torch.long)
        cover = stamps(config, _AA_SUPERSAMPLE if antialias else 1)[idx[:, 2], idx[:, 3]]  # [N, cs, cs]
        rgb = colours[idx[:, 4]]  # [N, 3]
        cells[idx[:, 0], idx[:, 1]] = bg.view(1, 3, 1, 1) + cover[:, None] * (rgb - bg).view(-1, 3, 1, 1)
    board = cells.view(n, g, g, 3, cs, cs).permute(0, 3, 1, 4, 2, 5).reshape(n, 3, g * cs, g * cs)
    canvas = bg.view(1, 3, 1, 1).expand(n, 3, size, size).clone()
    m = layout.margin
    canvas[:, :, m : m + g * cs, m : m + g * cs] = board
    return canvas.round_().clamp_(0, 255).to(torch.uint8)
