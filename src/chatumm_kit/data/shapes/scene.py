"""Scenes of the ShapesChat world and the config that fixes its vocabulary and pixel size (ARCHITECTURE.md).

A :class:`Scene` is a few :class:`ShapeObject` s, each with a shape, a colour, a size and a cell of the grid (row-major
index, ``0`` = top left). Scenes are plain values: frozen, hashable, compared by content; objects are kept sorted by
cell so two scenes with the same objects are equal whatever order they were listed in.

A :class:`WorldConfig` names the shapes, the palette (name → RGB), the sizes (name → fraction of the largest size that
fits a cell), the grid, the image size and the background. It checks at construction that every (shape, size) renders
to a different set of pixels at its image size, so the detector can invert every render exactly.

Example:
    >>> cfg = WorldConfig()
    >>> scene = Scene(objects=(ShapeObject(shape="circle", colour="red", size="small", cell=4),))
    >>> cfg.validate_scene(scene)
    >>> Scene.from_dict(scene.to_dict()) == scene
    True
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .geometry import SHAPE_PREDICATES, CellLayout, check_distinct, shape_stamps

__all__ = ["ShapeObject", "Scene", "WorldConfig", "DEFAULT_PALETTE", "DEFAULT_SIZES", "DEFAULT_SHAPES"]

RGB = tuple[int, int, int]

DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# Six saturated colours, pairwise >= 95 apart in RGB and >= 225 from the white background, so a per-pixel nearest
# colour vote survives Gaussian noise of std 0.1 (25 / 255).
DEFAULT_PALETTE: dict[str, RGB] = {
    "red": (220, 20, 40),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 230, 30),
    "purple": (140, 50, 190),
    "orange": (245, 140, 0),
}
DEFAULT_SIZES: dict[str, float] = {"small": 0.5, "large": 1.0}
_NAME = re.compile(r"^[a-z]+( [a-z]+)*$")


@dataclass(frozen=True, kw_only=True)
class ShapeObject:
    """One object: a shape of a colour and size, centred in a grid cell (row-major, 0 = top left)."""

    shape: str
    colour: str
    size: str
    cell: int

    def replace(self, **changes: Any) -> ShapeObject:
        """A copy with some attributes changed, e.g. ``obj.replace(colour="blue")``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "cell": self.cell}


@dataclass(frozen=True, kw_only=True)
class Scene:
    """Objects on a plain background, at most one per cell; ``objects`` is kept sorted by cell."""

    objects: tuple[ShapeObject, ...] = ()

    def __post_init__(self) -> None:
        objs = tuple(sorted(self.objects, key=lambda o: o.cell))
        for a, b in zip(objs, objs[1:]):
            if a.cell == b.cell:
                raise ValueError(f"Scene: two objects share cell {a.cell}: {a} and {b}")
        object.__setattr__(self, "objects", objs)

    def __len__(self) -> int:
        return len(self.objects)

    def __iter__(self) -> Iterator[ShapeObject]:
        return iter(self.objects)

    @property
    def cells(self) -> frozenset[int]:
        return frozenset(o.cell for o in self.objects)

    def object_at(self, cell: int) -> ShapeObject | None:
        """The object in ``cell``, or None."""
        for o in self.objects:
            if o.cell == cell:
                return o
        return None

    def with_object(self, obj: ShapeObject) -> Scene:
        """This scene plus ``obj`` (its cell must be empty)."""
        return Scene(objects=(*self.objects, obj))

    def without(self, cell: int) -> Scene:
        """This scene minus the object in ``cell`` (which must exist)."""
        if self.object_at(cell) is None:
            raise ValueError(f"Scene.without: no object in cell {cell} of {self}")
        return Scene(objects=tuple(o for o in self.objects if o.cell != cell))

    def replace_object(self, cell: int, new: ShapeObject) -> Scene:
        """This scene with the object in ``cell`` replaced by ``new`` (which may sit in another, empty cell)."""
        return self.without(cell).with_object(new)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for ``Turn.meta`` ground truth)."""
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scene:
        try:
            return cls(objects=tuple(ShapeObject(**dict(o)) for o in data["objects"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"Scene.from_dict: malformed scene {data!r}: {e}") from e


@dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """Vocabulary and pixel geometry of a ShapesChat world.

    Attributes:
        shapes: shape names, a subset of :data:`~chatumm_kit.data.shapes.geometry.SHAPE_PREDICATES`.
        palette: colour name → RGB (0–255); names are lowercase words.
        sizes: size name → half-extent as a fraction of the largest that fits a cell, e.g. small 0.5, large 1.0.
        grid: cells per side.
        image_size: image side in pixels (square images).
        background: background RGB.
        min_objects, max_objects: how many objects a generated scene holds.
    """

    shapes: tuple[str, ...] = DEFAULT_SHAPES
    palette: Mapping[str, RGB] = field(default_factory=lambda: dict(DEFAULT_PALETTE))
    sizes: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    grid: int = 3
    image_size: int = 32
    background: RGB = (255, 255, 255)
    min_objects: int = 1
    max_objects: int = 2

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
        set_("shapes", tuple(self.shapes))
        set_("palette", {str(k): _rgb(v, f"WorldConfig.palette[{k!r}]") for k, v in dict(self.palette).items()})
        set_("sizes", {str(k): float(v) for k, v in dict(self.sizes).items()})
        set_("background", _rgb(self.background, "WorldConfig.background"))
        vocab = {"shape": self.shapes, "colour": tuple(self.palette), "size": tuple(self.sizes)}
        seen: dict[str, str] = {}
        for kind, names in vocab.items():
            if not names:
                raise ValueError(f"WorldConfig: needs at least one {kind}")
            for n in names:
                if not _NAME.match(n):
                    raise ValueError(f"WorldConfig: {kind} name {n!r} must be lowercase words")
                if n in seen:
                    raise ValueError(f"WorldConfig: name {n!r} is used as both {seen[n]} and {kind}")
                seen[n] = kind
        unknown = [s for s in self.shapes if s not in SHAPE_PREDICATES]
        if unknown:
            raise ValueError(f"WorldConfig.shapes: unknown {unknown}; known: {sorted(SHAPE_PREDICATES)}")
        rgbs = [*self.palette.values(), self.background]
        if len(set(rgbs)) != len(rgbs):
            raise ValueError(f"WorldConfig: palette colours and background must all differ, got {rgbs}")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid * self.grid:
            raise ValueError(
                f"WorldConfig: need 1 <= min_objects ({self.min_objects}) <= max_objects ({self.max_objects}) "
                f"<= cells ({self.grid * self.grid})"
            )
        layout = CellLayout(image_size=self.image_size, grid=self.grid)
        extents = self.half_extents
        if len(set(extents)) != len(extents):
            raise ValueError(
                f"WorldConfig.sizes {dict(self.sizes)} give half-extents {extents} at image_size={self.image_size}; "
                "sizes must differ in pixels"
            )
        stamps = shape_stamps(cell_px=layout.cell_px, shapes=self.shapes, half_extents=extents)
        check_distinct(
            stamps, shapes=self.shapes, sizes=tuple(self.sizes), where=f"WorldConfig(image_size={self.image_size})"
        )

    # Dict fields: compare and hash their ordered items (order fixes colour/size indices) so configs key caches.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorldConfig) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple:
        return (
            self.shapes,
            tuple(self.palette.items()),
            tuple(self.sizes.items()),
            self.grid,
            self.image_size,
            self.background,
            self.min_objects,
            self.max_objects,
        )

    @property
    def colours(self) -> tuple[str, ...]:
        return tuple(self.palette)

    @property
    def size_names(self) -> tuple[str, ...]:
        return tuple(self.sizes)

    @property
    def num_cells(self) -> int:
        return self.grid * self.grid

    @property
    def layout(self) -> CellLayout:
        return CellLayout(image_size=self.image_size, grid=self.grid)

    @property
    def half_extents(self) -> tuple[int, ...]:
        """Half-extent in pixels of each size, in ``sizes`` order."""
        layout = self.layout
        return tuple(layout.half_extent(f) for f in self.sizes.values())

    def cell_rc(self, cell: int) -> tuple[int, int]:
        """(row, column) of a row-major cell index."""
        return divmod(cell, self.grid)

    def validate_scene(self, scene: Scene) -> None:
        """Raise ``ValueError`` naming the first object whose shape, colour, size or cell this world lacks."""
        for i, o in enumerate(scene.objects):
            for attr, allowed in (("shape", self.shapes), ("colour", self.palette), ("size", self.sizes)):
                if getattr(o, attr) not in allowed:
                    raise ValueError(
                        f"scene object {i} ({o}): unknown {attr} {getattr(o, attr)!r}; allowed: {list(allowed)}"
                    )
            if not (isinstance(o.cell, int) and 0 <= o.cell < self.num_cells):
                raise ValueError(
                    f"scene object {i} ({o}): cell must be an int in [0, {self.num_cells}), got {o.cell!r}"
                )


def _rgb(value: Any, where: str) -> RGB:
    vals = tuple(int(x) for x in value)
    if len(vals) != 3 or any(not 0 <= x <= 255 for x in vals):
        raise ValueError(f"{where}: expected 3 ints in [0, 255], got {value!r}")
    return vals  # type: ignore[return-value]
