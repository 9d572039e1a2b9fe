"""Words for ShapesChat scenes: positions, canonical captions and their parser, and referring expressions.

- :func:`position_name` / :func:`parse_position`: cell ↔ words ("top left", "center", "bottom right", …; for grids
  other than 3, "row 2 column 4").
- :func:`describe` / :func:`parse_caption`: the canonical caption of a scene and its exact inverse.
  ``parse_caption`` finds every complete object phrase ("a small red circle in the top left") anywhere in a text, so
  it also reads a text-to-image request or a model's free-form answer.
- :class:`ObjectQuery` and :func:`distinguishing_query`: the shortest description that picks one object out of a
  scene ("the red circle", "the circle in the top left").
- :func:`refer_to`: a phrase naming a whole scene distinctively among others ("the picture with the red circle"), for
  the long-range references of the synthesis pipeline (SPEC §6); :func:`resolve_reference` finds which scenes a
  phrase can mean (to validate a rewritten query, or to check which picture a model took).

Functions take ``config=None`` to mean the default :class:`WorldConfig`.

Example:
    >>> from chatumm_kit.data.shapes import Scene, ShapeObject
    >>> scene = Scene(objects=(ShapeObject(shape="circle", colour="red", size="small", cell=0),
    ...                        ShapeObject(shape="square", colour="blue", size="large", cell=4)))
    >>> describe(scene)
    'A small red circle in the top left and a large blue square in the center.'
    >>> parse_caption(describe(scene)) == scene
    True
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import phrasing
from .scene import Scene, ShapeObject, WorldConfig

__all__ = [
    "default_config",
    "position_name",
    "parse_position",
    "object_text",
    "describe_objects",
    "describe",
    "parse_caption",
    "ObjectQuery",
    "distinguishing_query",
    "refer_to",
    "resolve_reference",
    "world_words",
]

_VERTICAL = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_HORIZONTAL = {"left": 0, "right": 2}
_MIDDLE = {"center", "centre", "middle"}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")  # index = value
_NAMES_3 = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)


@functools.cache
def default_config() -> WorldConfig:
    """The default world (built once)."""
    return WorldConfig()


def _cfg(config: WorldConfig | None) -> WorldConfig:
    return default_config() if config is None else config


def position_name(cell: int, grid: int = 3) -> str:
    """Words for a cell: 3×3 → "top left" … "center" … "bottom right"; other grids → "row R column C" (1-based)."""
    if not 0 <= cell < grid * grid:
        raise ValueError(f"position_name: cell {cell} outside a {grid}x{grid} grid")
    if grid == 3:
        return _NAMES_3[cell]
    r, c = divmod(cell, grid)
    return f"row {r + 1} column {c + 1}"


def parse_position(text: str, grid: int = 3) -> int | None:
    """Cell of a position phrase, or None. Accepts the names of :func:`position_name` and, on a 3×3 grid, variants
    ("upper left", "top middle", "centre", "left", "bottom", …)."""
    words = text.lower().replace("-", " ").split()
    m = re.fullmatch(r"row (\d+),? column (\d+)", " ".join(words))
    if m:
        r, c = int(m.group(1)) - 1, int(m.group(2)) - 1
        return r * grid + c if 0 <= r < grid and 0 <= c < grid else None
    if grid != 3 or not 1 <= len(words) <= 2:
        return None
    v = h = None
    mids = 0
    for w in words:
        if w in _VERTICAL and v is None:
            v = _VERTICAL[w]
        elif w in _HORIZONTAL and h is None:
            h = _HORIZONTAL[w]
        elif w in _MIDDLE:
            mids += 1
        else:
            return None
    if len(words) == 2 and mids == 2:
        return None
    return (1 if v is None else v) * 3 + (1 if h is None else h)


@functools.cache
def _position_forms(grid: int) -> dict[str, int]:
    """Every accepted surface form of a position → cell (for the caption regex)."""
    forms = {position_name(c, grid): c for c in range(grid * grid)}
    if grid == 3:
        words = [*_VERTICAL, *_HORIZONTAL, *_MIDDLE]
        for a in words:
            for cand in (a, *(f"{a} {b}" for b in words)):
                cell = parse_position(cand, 3)
                if cell is not None:
                    forms.setdefault(cand, cell)
    return forms


def object_text(obj: ShapeObject, config: WorldConfig | None = None) -> str:
    """Canonical phrase of one object: 'a small red circle in the top left'."""
    cfg = _cfg(config)
    return (
        f"{phrasing.article(obj.size)} {obj.size} {obj.colour} {obj.shape} in the {position_name(obj.cell, cfg.grid)}"
    )


def describe_objects(scene: Scene, config: WorldConfig | None = None) -> str:
    """The scene as a lowercase clause, objects in cell order: 'a small red circle in the top left and a …'.

    An empty scene gives 'nothing'.
    """
    parts = [object_text(o, config) for o in scene.objects]
    if not parts:
        return "nothing"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: Scene, config: WorldConfig | None = None) -> str:
    """Canonical caption: 'A small red circle in the top left and a large blue square in the center.'

    An empty scene gives 'An empty picture.'. :func:`parse_caption` inverts it exactly.
    """
    if not scene.objects:
        return "An empty picture."
    clause = describe_objects(scene, config)
    return clause[0].upper() + clause[1:] + "."


def _alternation(names: Iterable[str]) -> str:
    """Regex alternation of literal names, longest first (so 'top left' wins over 'top')."""
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


@functools.cache
def _object_regex(config: WorldConfig) -> re.Pattern[str]:
    alt = _alternation
    return re.compile(
        rf"\b(?:a|an|one)\s+(?P<size>{alt(config.sizes)})\s+(?P<colour>{alt(config.palette)})\s+"
        rf"(?P<shape>{alt(config.shapes)})\s+(?:in|at|on)\s+the\s+(?P<pos>{alt(_position_forms(config.grid))})\b",
        re.IGNORECASE,
    )


def parse_caption(text: str, config: WorldConfig | None = None) -> Scene | None:
    """The scene a text describes, or None.

    Finds every complete object phrase '<a|an|one> <size> <colour> <shape> <in|at|on> the <position>' (case-insensitive,
    position variants allowed). Returns None when there is none or two phrases claim the same cell. 'An empty
    picture.' parses to the empty scene.
    """
    cfg = _cfg(config)
    if re.fullmatch(r"\s*an empty picture\.?\s*", text, re.IGNORECASE):
        return Scene()
    forms = _position_forms(cfg.grid)
    objs = []
    for m in _object_regex(cfg).finditer(text):
        objs.append(
            ShapeObject(
                shape=m.group("shape").lower(),
                colour=m.group("colour").lower(),
                size=m.group("size").lower(),
                cell=forms[" ".join(m.group("pos").lower().split())],
            )
        )
    if not objs or len({o.cell for o in objs}) != len(objs):
        return None
    return Scene(objects=tuple(objs))


@dataclass(frozen=True, kw_only=True)
class ObjectQuery:
    """A partial description of an object; None attributes are unconstrained.

    Example:
        >>> ObjectQuery(colour="red", shape="circle").phrase()
        'the red circle'
        >>> ObjectQuery(colour="red", cell=0).phrase()
        'the red object in the top left'
    """

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    cell: int | None = None

    @classmethod
    def of(cls, obj: ShapeObject, attrs: Iterable[str]) -> ObjectQuery:
        """The query fixing ``attrs`` (names among shape, colour, size, cell) to ``obj``'s values."""
        return cls(**{a: getattr(obj, a) for a in attrs})

    def matches(self, obj: ShapeObject) -> bool:
        return all(v is None or getattr(obj, k) == v for k, v in self._fixed())

    def select(self, scene: Scene) -> list[ShapeObject]:
        """The scene's objects this query matches."""
        return [o for o in scene.objects if self.matches(o)]

    def _fixed(self) -> list[tuple[str, object]]:
        return [("shape", self.shape), ("colour", self.colour), ("size", self.size), ("cell", self.cell)]

    def noun_phrase(self, config: WorldConfig | None = None) -> str:
        """Without article: 'small red circle in the top left'; 'object' stands in for an unknown shape."""
        words = [w for w in (self.size, self.colour, self.shape or "object") if w]
        text = " ".join(words)
        if self.cell is not None:
            text += f" in the {position_name(self.cell, _cfg(config).grid)}"
        return text

    def phrase(self, config: WorldConfig | None = None) -> str:
        """With the definite article: 'the small red circle in the top left'."""
        return "the " + self.noun_phrase(config)


# Attribute subsets tried, in order, to name an object: short and natural first, the cell (always unique) last.
NAMING_ORDER: tuple[tuple[str, ...], ...] = (
    ("colour", "shape"),
    ("size", "colour", "shape"),
    ("colour", "shape", "cell"),
)


def distinguishing_query(
    obj: ShapeObject, scene: Scene, *, candidates: Sequence[tuple[str, ...]] = NAMING_ORDER
) -> ObjectQuery | None:
    """The first query over one of ``candidates`` (attribute subsets) that matches ``obj`` and no other object of
    ``scene``; None if none does."""
    for attrs in candidates:
        q = ObjectQuery.of(obj, attrs)
        if q.select(scene) == [obj]:
            return q
    return None


def refer_to(
    scene: Scene,
    among: Sequence[Scene] = (),
    *,
    config: WorldConfig | None = None,
    rng: random.Random | None = None,
) -> str:
    """A phrase that names ``scene`` and none of the scenes in ``among``.

    Tries, object by object, 'the picture with the red circle', then with size, then with the cell; then 'the
    picture with the red circle and the blue square'; then 'the picture with only <all its objects>'. The template
    ('the picture with …', 'the image with …', …) comes from ``rng`` (first one without).

    Raises:
        ValueError: when a scene in ``among`` equals ``scene`` (nothing can tell them apart).

    Example:
        >>> from chatumm_kit.data.shapes import Scene, ShapeObject
        >>> a = Scene(objects=(ShapeObject(shape="circle", colour="red", size="small", cell=0),))
        >>> b = Scene(objects=(ShapeObject(shape="circle", colour="red", size="large", cell=4),))
        >>> refer_to(a, [b])
        'the picture with the small red circle'
    """
    others = [s for s in among if s != scene]
    if len(others) != len(among):
        raise ValueError(f"refer_to: {scene} appears in among; no phrase can tell them apart")
    template = phrasing.pick(rng, phrasing.REFER)

    def unique(queries: Sequence[ObjectQuery]) -> bool:
        return not any(all(q.select(s) for q in queries) for s in others)

    for attrs in (*NAMING_ORDER, ("size", "colour", "shape", "cell")):
        for obj in scene.objects:
            q = ObjectQuery.of(obj, attrs)
            if unique([q]):
                return template.format(np=q.phrase(config))
    full = [ObjectQuery.of(o, ("size", "colour", "shape", "cell")) for o in scene.objects]
    if len(full) > 1 and unique(full):
        return template.format(np=" and ".join(q.phrase(config) for q in full))
    return template.format(np="only " + describe_objects(scene, config))


@functools.cache
def _query_regex(config: WorldConfig) -> re.Pattern[str]:
    alt = _alternation
    return re.compile(
        rf"\bthe\s+(?:(?P<size>{alt(config.sizes)})\s+)?(?:(?P<colour>{alt(config.palette)})\s+)?"
        rf"(?P<shape>{alt(config.shapes)}|object|shape)\b"
        rf"(?:\s+(?:in|at|on)\s+the\s+(?P<pos>{alt(_position_forms(config.grid))})\b)?",
        re.IGNORECASE,
    )


def resolve_reference(text: str, scenes: Sequence[Scene], *, config: WorldConfig | None = None) -> list[int]:
    """Indices of the ``scenes`` that a reference (as written by :func:`refer_to`) can mean.

    Reads every 'the [size] [colour] <shape|object> [in the <position>]' noun phrase; a scene fits when each phrase
    selects at least one of its objects. A reference with 'only <objects>' fits the scenes equal to those objects.
    No noun phrase at all fits nothing.

    Example:
        >>> from chatumm_kit.data.shapes import Scene, ShapeObject
        >>> a = Scene(objects=(ShapeObject(shape="circle", colour="red", size="small", cell=0),))
        >>> b = Scene(objects=(ShapeObject(shape="square", colour="red", size="small", cell=0),))
        >>> resolve_reference("go back to the picture with the red circle", [a, b])
        [0]
    """
    cfg = _cfg(config)
    only = re.search(r"\bonly\s+(.*)$", text, re.IGNORECASE)
    if only:
        scene = parse_caption(only.group(1), cfg)
        return [] if scene is None else [i for i, s in enumerate(scenes) if s == scene]
    forms = _position_forms(cfg.grid)
    queries = []
    for m in _query_regex(cfg).finditer(text):
        shape = m.group("shape").lower()
        pos = m.group("pos")
        queries.append(
            ObjectQuery(
                shape=None if shape in ("object", "shape") else shape,
                colour=(m.group("colour") or "").lower() or None,
                size=(m.group("size") or "").lower() or None,
                cell=None if pos is None else forms[" ".join(pos.lower().split())],
            )
        )
    if not queries:
        return []
    return [i for i, s in enumerate(scenes) if all(q.select(s) for q in queries)]


def world_words(config: WorldConfig | None = None) -> frozenset[str]:
    """Every lowercase word that names something in the world: colours, shapes and their plurals, sizes, position
    words, numbers (digits and words) and the articles, whose definiteness tells an existing object ("the red
    circle") from a new one ("a red circle").

    What :class:`~chatumm_kit.data.word_noise.WordNoise` must never corrupt on ShapesChat: the words a request's
    meaning rests on.

    Example:
        >>> {"red", "circles", "top", "3", "the"} <= world_words()
        True
        >>> "draw" in world_words()
        False
    """
    cfg = _cfg(config)
    words = {*cfg.palette, *cfg.sizes, *_VERTICAL, *_HORIZONTAL, *_MIDDLE, "a", "an", "the", *_NUMBER_WORDS}
    words |= {*cfg.shapes, *map(phrasing.plural, cfg.shapes)}
    words |= {position_name(cell, cfg.grid) for cell in range(cfg.grid * cfg.grid)}
    words |= {str(n) for n in range(cfg.grid * cfg.grid + 1)}
    return frozenset(w for phrase in words for w in phrase.split())  # multi-word names and positions → words
