"""Single-turn source tasks of the ShapesChat world, each with exact ground truth (SPEC §6 inputs).

- :class:`TextToImage`: a drawing request → the target scene.
- :class:`Edit`: a source scene + an instruction (recolour, move, resize, reshape, add, remove) → the target scene.
  Only valid edits are sampled: a move goes to an empty cell, ``add`` needs fewer than ``max_objects`` objects,
  ``remove`` more than ``min_objects``; the target differs from the source in exactly the edited attribute.
- :class:`VQA`: a question about a scene (colour, shape, position, count) with an exact short answer ("red",
  "circle", "top left", "2"); the question's subject is kept as an :class:`ObjectQuery` so the answer can be recomputed
  on any scene with :func:`answer_question` (e.g. the scene detected in a generated image).
- :class:`Caption`: a scene + a request to describe it → the canonical caption (:func:`describe`).

Samplers draw everything (scene, template, edit) from a caller's ``random.Random``: the same seed gives the same task.
Each sentence comes from one of several templates (:mod:`.phrasing`).

Example:
    >>> import random
    >>> rng = random.Random(0)
    >>> edit = sample_edit(rng, operation=EditOp.RECOLOUR)
    >>> edit.target == edit.source.replace_object(edit.subject.cell, edit.result)
    True
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from . import phrasing
from .generator import sample_object, sample_scene
from .language import (
    _NUMBER_WORDS,
    NAMING_ORDER,
    ObjectQuery,
    default_config,
    describe,
    describe_objects,
    distinguishing_query,
    parse_position,
    position_name,
)
from .scene import Scene, ShapeObject, WorldConfig

__all__ = [
    "EditOp",
    "QuestionKind",
    "TextToImage",
    "Edit",
    "VQA",
    "Caption",
    "sample_text_to_image",
    "sample_edit",
    "sample_vqa",
    "sample_caption",
    "valid_edit_ops",
    "answer_question",
    "normalise_answer",
]


class EditOp(str, Enum):
    RECOLOUR = "recolour"
    MOVE = "move"
    RESIZE = "resize"
    RESHAPE = "reshape"
    ADD = "add"
    REMOVE = "remove"


class QuestionKind(str, Enum):
    COLOUR = "colour"
    SHAPE = "shape"
    POSITION = "position"
    COUNT = "count"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Scene | ShapeObject):
        return value.to_dict()
    if isinstance(value, ObjectQuery):
        return {k: v for k, v in value._fixed() if v is not None}
    if isinstance(value, Enum):
        return value.value
    return value


class _Task:
    def to_dict(self) -> dict[str, Any]:
        """JSON-able ground truth (scenes as dicts, enums as strings), e.g. for ``Turn.meta``."""
        return {"task": type(self).__name__, **{k: _jsonable(v) for k, v in vars(self).items()}}


@dataclass(frozen=True, kw_only=True)
class TextToImage(_Task):
    """Draw ``target`` from ``prompt``; ``caption`` is ``describe(target)``."""

    prompt: str
    caption: str
    target: Scene


@dataclass(frozen=True, kw_only=True)
class Edit(_Task):
    """Apply ``instruction`` to ``source`` to get ``target``.

    Attributes:
        subject: the source object the edit acts on (None for ``add``).
        result: that object after the edit (the new object for ``add``; None for ``remove``).
        target: ``source`` with ``subject`` replaced by ``result``.
    """

    source: Scene
    instruction: str
    target: Scene
    operation: EditOp
    subject: ShapeObject | None
    result: ShapeObject | None


@dataclass(frozen=True, kw_only=True)
class VQA(_Task):
    """A question about ``scene`` with its exact short ``answer``; ``subject`` selects the object(s) asked about."""

    scene: Scene
    question: str
    answer: str
    kind: QuestionKind
    subject: ObjectQuery

    def check(self, text: str) -> bool:
        """Whether a free-form answer says the same as :attr:`answer` (see :func:`normalise_answer`)."""
        return normalise_answer(text) == self.answer


@dataclass(frozen=True, kw_only=True)
class Caption(_Task):
    """Describe ``scene`` when asked with ``prompt``; ``caption`` is ``describe(scene)``."""

    scene: Scene
    prompt: str
    caption: str


def _cfg(config: WorldConfig | None) -> WorldConfig:
    return default_config() if config is None else config


def sample_text_to_image(
    rng: random.Random, *, config: WorldConfig | None = None, scene: Scene | None = None
) -> TextToImage:
    """A drawing request for ``scene`` (or a random scene)."""
    cfg = _cfg(config)
    scene = sample_scene(rng, cfg) if scene is None else scene
    prompt = phrasing.pick(rng, phrasing.TEXT_TO_IMAGE).format(desc=describe_objects(scene, cfg))
    return TextToImage(prompt=prompt, caption=describe(scene, cfg), target=scene)


def sample_caption(rng: random.Random, *, config: WorldConfig | None = None, scene: Scene | None = None) -> Caption:
    """A request to describe ``scene`` (or a random scene)."""
    cfg = _cfg(config)
    scene = sample_scene(rng, cfg) if scene is None else scene
    return Caption(scene=scene, prompt=phrasing.pick(rng, phrasing.CAPTION), caption=describe(scene, cfg))


def valid_edit_ops(scene: Scene, config: WorldConfig | None = None) -> list[EditOp]:
    """The operations that can apply to ``scene`` (in :class:`EditOp` order)."""
    cfg = _cfg(config)
    n = len(scene)
    ok = {
        EditOp.RECOLOUR: n > 0 and len(cfg.palette) > 1,
        EditOp.MOVE: 0 < n < cfg.num_cells,
        EditOp.RESIZE: n > 0 and len(cfg.sizes) > 1,
        EditOp.RESHAPE: n > 0 and len(cfg.shapes) > 1,
        EditOp.ADD: n < cfg.max_objects,
        EditOp.REMOVE: n > cfg.min_objects,
    }
    return [op for op in EditOp if ok[op]]


def sample_edit(
    rng: random.Random,
    *,
    config: WorldConfig | None = None,
    source: Scene | None = None,
    operation: EditOp | str | None = None,
) -> Edit:
    """A valid edit of ``source`` (or of a random scene that admits ``operation``).

    Args:
        rng: the random stream.
        config: the world (default world if None).
        source: the scene to edit; None samples one (with an object count that ``operation`` allows).
        operation: the edit; None picks uniformly among :func:`valid_edit_ops`.

    Raises:
        ValueError: ``operation`` cannot apply to the given ``source`` (e.g. ``add`` on a full scene).
    """
    cfg = _cfg(config)
    op = None if operation is None else EditOp(operation)
    if source is None:
        lo, hi = cfg.min_objects, cfg.max_objects
        lo, hi = (lo, hi - 1) if op is EditOp.ADD else (lo + 1, hi) if op is EditOp.REMOVE else (lo, hi)
        if lo > hi:
            raise ValueError(f"sample_edit: {op.value} impossible with {cfg.min_objects}-{cfg.max_objects} objects")
        source = sample_scene(rng, cfg, num_objects=rng.randint(lo, hi))
    valid = valid_edit_ops(source, cfg)
    if op is None:
        op = rng.choice(valid)
    elif op not in valid:
        raise ValueError(f"sample_edit: {op.value} is not valid for {source} (valid: {[v.value for v in valid]})")
    templates = phrasing.EDIT[op.value]
    empty = [c for c in range(cfg.num_cells) if c not in source.cells]

    if op is EditOp.ADD:
        new = sample_object(rng, cfg, cell=rng.choice(empty))
        text = phrasing.pick(rng, templates).format(
            new=f"{phrasing.article(new.size)} {new.size} {new.colour} {new.shape}",
            pos=position_name(new.cell, cfg.grid),
        )
        return Edit(
            source=source, instruction=text, target=source.with_object(new), operation=op, subject=None, result=new
        )

    subject = rng.choice(source.objects)
    ref = distinguishing_query(subject, source)
    assert ref is not None  # NAMING_ORDER ends with the cell, which is always unique
    obj = ref.phrase(cfg)
    result: ShapeObject | None
    if op is EditOp.REMOVE:
        result, fields = None, {}
    elif op is EditOp.RECOLOUR:
        result = subject.replace(colour=rng.choice([c for c in cfg.colours if c != subject.colour]))
        fields = {"colour": result.colour}
    elif op is EditOp.MOVE:
        result = subject.replace(cell=rng.choice(empty))
        fields = {"pos": position_name(result.cell, cfg.grid)}
    elif op is EditOp.RESIZE:
        result = subject.replace(size=rng.choice([s for s in cfg.size_names if s != subject.size]))
        fields = {"size": result.size}
    else:  # RESHAPE
        result = subject.replace(shape=rng.choice([s for s in cfg.shapes if s != subject.shape]))
        fields = {"a_shape": f"{phrasing.article(result.shape)} {result.shape}"}
    text = phrasing.pick(rng, templates).format(obj=obj, **fields)
    target = source.without(subject.cell) if result is None else source.replace_object(subject.cell, result)
    return Edit(source=source, instruction=text, target=target, operation=op, subject=subject, result=result)


# Attribute subsets that name the object a question is about, without giving away the answer.
_QUESTION_NAMING: dict[QuestionKind, tuple[tuple[str, ...], ...]] = {
    QuestionKind.COLOUR: (("shape",), ("size", "shape"), ("shape", "cell")),
    QuestionKind.SHAPE: (("colour",), ("size", "colour"), ("colour", "cell")),
    QuestionKind.POSITION: NAMING_ORDER[:2],
}


def sample_vqa(
    rng: random.Random,
    *,
    config: WorldConfig | None = None,
    scene: Scene | None = None,
    kind: QuestionKind | str | None = None,
) -> VQA:
    """A question about ``scene`` (or a random scene) with its exact answer.

    ``kind`` None picks uniformly among the kinds that can be asked unambiguously: a position question needs an
    object that colour, shape and size alone single out.

    Raises:
        ValueError: ``kind`` cannot be asked about ``scene`` (e.g. position when two objects differ only by cell).
    """
    cfg = _cfg(config)
    scene = sample_scene(rng, cfg) if scene is None else scene
    named = {
        k: [(o, q) for o in scene.objects if (q := distinguishing_query(o, scene, candidates=cands)) is not None]
        for k, cands in _QUESTION_NAMING.items()
    }
    feasible = [k for k in QuestionKind if k is QuestionKind.COUNT or named[k]]
    k = rng.choice(feasible) if kind is None else QuestionKind(kind)
    if k not in feasible:
        raise ValueError(f"sample_vqa: a {k.value} question is ambiguous for {scene}")
    templates = phrasing.VQA[k.value]
    if k is QuestionKind.COUNT:
        by = rng.choice(("all", "colour", "shape"))
        if by == "colour":
            subject = ObjectQuery(colour=rng.choice(cfg.colours))
            what = f"{subject.colour} objects"
        elif by == "shape":
            subject = ObjectQuery(shape=rng.choice(cfg.shapes))
            what = phrasing.plural(subject.shape or "")
        else:
            subject, what = ObjectQuery(), "objects"
        question = phrasing.pick(rng, templates).format(what=what)
    else:
        _, subject = rng.choice(named[k])
        question = phrasing.pick(rng, templates).format(obj=subject.phrase(cfg))
    answer = answer_question(scene, kind=k, subject=subject, config=cfg)
    assert answer is not None
    return VQA(scene=scene, question=question, answer=answer, kind=k, subject=subject)


def answer_question(
    scene: Scene, *, kind: QuestionKind | str, subject: ObjectQuery, config: WorldConfig | None = None
) -> str | None:
    """The exact answer of a question on ``scene``; None when ``subject`` does not pick out exactly one object
    (count questions always have an answer)."""
    k = QuestionKind(kind)
    hits = subject.select(scene)
    if k is QuestionKind.COUNT:
        return str(len(hits))
    if len(hits) != 1:
        return None
    (obj,) = hits
    if k is QuestionKind.COLOUR:
        return obj.colour
    if k is QuestionKind.SHAPE:
        return obj.shape
    return position_name(obj.cell, _cfg(config).grid)


_NUMBERS = {w: str(i) for i, w in enumerate(_NUMBER_WORDS)}
_LEADING = re.compile(r"^(?:(?:it is|it's|there (?:is|are)|the answer is|in the|at the|the|a|an)\s+)+")


def normalise_answer(text: str, grid: int = 3) -> str:
    """Canonical form of a short answer: lowercase, no punctuation or leading filler ('It is red.' → 'red'),
    number words → digits ('two' → '2'), position variants → :func:`position_name` ('upper left' → 'top left')."""
    t = " ".join(re.sub(r"[.,!?;:]", " ", text.lower()).split())
    t = _LEADING.sub("", t)
    words = t.split()
    if words and (words[0] in _NUMBERS or words[0].isdigit()):  # 'two red objects' → '2'
        return _NUMBERS.get(words[0], words[0])
    cell = parse_position(t, grid)
    return position_name(cell, grid) if cell is not None else t
