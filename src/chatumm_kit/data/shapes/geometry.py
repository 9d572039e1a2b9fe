"""Pixel geometry of the ShapesChat world: where cells are and what each shape covers.

The image is a ``grid × grid`` board of square cells of ``cell_px = image_size // grid`` pixels, centred on the
canvas (the leftover ``image_size - grid * cell_px`` pixels become a margin). Every object sits centred on one pixel
of its cell, ``anchor = (cell_px - 1) // 2`` pixels from the cell's top-left corner, and never leaves its cell: the
largest half-extent is ``(cell_px - 2) // 2``, so two large objects in neighbouring cells are always separated by at
least one background pixel. That is what lets the detector read the image cell by cell.

Shapes are predicates on continuous offsets ``(u, v)`` from the anchor (``v`` grows downwards) with an integer
half-extent ``h``. Every boundary is placed so that no pixel centre (integer ``u, v``) lies exactly on it, so a
plain render is an exact, tie-free function of the scene; anti-aliasing supersamples the same predicates.

Example:
    >>> stamps = shape_stamps(cell_px=10, shapes=("circle", "square"), half_extents=(2, 4))
    >>> tuple(stamps.shape), int(stamps[1, 1].sum())   # a large square is 9 × 9 pixels
    ((2, 2, 10, 10), 81)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["SHAPE_PREDICATES", "CellLayout", "shape_stamps", "check_distinct"]

ShapePredicate = Callable[[Tensor, Tensor, int], Tensor]


def _square(u: Tensor, v: Tensor, h: int) -> Tensor:
    return torch.maximum(u.abs(), v.abs()) < h + 0.5


def _circle(u: Tensor, v: Tensor, h: int) -> Tensor:
    # (h + 0.5)^2 = h^2 + h + 0.25: never equal to an integer u^2 + v^2, and it cuts the square's corners.
    return u * u + v * v < (h + 0.5) ** 2


def _triangle(u: Tensor, v: Tensor, h: int) -> Tensor:
    # Apex up, base along the bottom edge; the half-width (v + h + 0.5) / 2 is a quarter-integer at pixel centres.
    return (v.abs() < h + 0.5) & (u.abs() < (v + h + 0.5) / 2)


def _diamond(u: Tensor, v: Tensor, h: int) -> Tensor:
    return u.abs() + v.abs() < h + 0.5


def _cross(u: Tensor, v: Tensor, h: int) -> Tensor:
    arm = h // 3  # arms 1 px wide at h = 2, 3 px at h = 4
    return (torch.maximum(u.abs(), v.abs()) < h + 0.5) & (torch.minimum(u.abs(), v.abs()) < arm + 0.5)


SHAPE_PREDICATES: dict[str, ShapePredicate] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
    "cross": _cross,
}
"""Known shape names → predicate ``(u, v, h) -> BoolTensor``; a :class:`WorldConfig` may use any subset."""


class CellLayout:
    """Cell geometry of one image size and grid.

    Attributes:
        cell_px: side of a cell in pixels.
        margin: pixels before the first cell (top and left); the board spans ``[margin, margin + grid * cell_px)``.
        anchor: offset of the object centre pixel from the cell's top-left corner.
        max_half_extent: the largest half-extent that keeps an object inside its cell with a background gap.
    """

    def __init__(self, *, image_size: int, grid: int) -> None:
        if grid < 1:
            raise ValueError(f"CellLayout: grid must be >= 1, got {grid}")
        self.cell_px = image_size // grid
        if self.cell_px < 4:
            raise ValueError(
                f"CellLayout: image_size={image_size} gives {self.cell_px}-pixel cells for grid={grid}; need >= 4"
            )
        self.margin = (image_size - grid * self.cell_px) // 2
        self.anchor = (self.cell_px - 1) // 2
        self.max_half_extent = (self.cell_px - 2) // 2

    def half_extent(self, fraction: float) -> int:
        """Integer half-extent for a size given as a fraction of the largest one (at least 1 pixel)."""
        return max(1, round(fraction * self.max_half_extent))


def shape_stamps(*, cell_px: int, shapes: Sequence[str], half_extents: Sequence[int], supersample: int = 1) -> Tensor:
    """Coverage of every (shape, size) inside one cell.

    Args:
        cell_px: cell side in pixels.
        shapes: shape names (keys of :data:`SHAPE_PREDICATES`).
        half_extents: integer half-extent of each size.
        supersample: sub-samples per pixel side; 1 = binary coverage at pixel centres (exact renders), > 1 = the
            fraction of ``supersample²`` sub-pixel points inside the shape (anti-aliasing).

    Returns:
        float32 ``[len(shapes), len(half_extents), cell_px, cell_px]`` with values in ``[0, 1]``.
    """
    unknown = [s for s in shapes if s not in SHAPE_PREDICATES]
    if unknown:
        raise ValueError(f"shape_stamps: unknown shapes {unknown}; known: {sorted(SHAPE_PREDICATES)}")
    if supersample < 1:
        raise ValueError(f"shape_stamps: supersample must be >= 1, got {supersample}")
    anchor = (cell_px - 1) // 2
    sub = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample - 0.5
    pix = torch.arange(cell_px, dtype=torch.float64) - anchor
    fine = (pix[:, None] + sub[None, :]).reshape(-1)  # [cell_px * supersample]
    v, u = torch.meshgrid(fine, fine, indexing="ij")
    out = torch.empty(len(shapes), len(half_extents), cell_px, cell_px, dtype=torch.float32)
    for i, name in enumerate(shapes):
        for j, h in enumerate(half_extents):
            inside = SHAPE_PREDICATES[name](u, v, int(h)).to(torch.float32)
            out[i, j] = inside.reshape(cell_px, supersample, cell_px, supersample).mean(dim=(1, 3))
    return out


def check_distinct(stamps: Tensor, *, shapes: Sequence[str], sizes: Sequence[str], where: str) -> None:
    """Raise ``ValueError`` if two (shape, size) stamps cover the same pixels (the detector could not tell them apart).

    Args:
        stamps: binary ``[S, Z, cell_px, cell_px]`` from :func:`shape_stamps`.
        shapes, sizes: names along the first two axes, for the message.
        where: what to name in the message (e.g. the config).
    """
    flat = stamps.reshape(len(shapes) * len(sizes), -1)
    names = [(s, z) for s in shapes for z in sizes]
    for a in range(flat.shape[0]):
        if flat[a].sum() == 0:
            raise ValueError(f"{where}: {names[a][1]} {names[a][0]} covers no pixel")
        for b in range(a + 1, flat.shape[0]):
            if torch.equal(flat[a], flat[b]):
                raise ValueError(
                    f"{where}: {names[a][1]} {names[a][0]} and {names[b][1]} {names[b][0]} render to the same pixels; "
                    "use a larger image_size, fewer shapes or more distinct sizes"
                )
