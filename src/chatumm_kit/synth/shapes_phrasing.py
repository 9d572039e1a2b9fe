"""Sentence templates for synthesized ShapesChat dialogues, split into training and held-out phrasings.

Every template family (the world's own — drawing requests, edit and question sentences, scene references — plus the
synthesis ones: context wrappers, long-range rewrites, distractors) is partitioned once, by ``seed``, into a
training part and a held-out part (``heldout_fraction`` of each family with at least two templates). Training
recipes use ``split="train"``; the evaluation benchmark uses ``split="heldout"`` to test on sentences the model has
never seen. ``split="all"`` uses both.

Example:
    >>> import random
    >>> train, held = ShapesPhrasing(split="train"), ShapesPhrasing(split="heldout")
    >>> set(train.templates("t2i")).isdisjoint(held.templates("t2i"))
    True
    >>> train.pick(random.Random(0), "t2i").format(desc="a red circle in the center") != ""
    True
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

from chatumm_kit.data.shapes import VQA, Edit, EditOp, QuestionKind, WorldConfig
from chatumm_kit.data.shapes import phrasing as world
from chatumm_kit.data.shapes.language import distinguishing_query, position_name

__all__ = ["ShapesPhrasing", "FAMILIES", "DISTRACTORS", "lower_first"]

# Distractor questions with their exact answers, computed from two numbers a > b and a word.
DISTRACTORS: dict[str, Callable[[int, int, str], str]] = {
    "What is {a} plus {b}?": lambda a, b, w: str(a + b),
    "What is {a} minus {b}?": lambda a, b, w: str(a - b),
    "What is {a} times {b}?": lambda a, b, w: str(a * b),
    "Which number is larger, {b} or {a}?": lambda a, b, w: str(a),
    "How many letters does the word '{w}' have?": lambda a, b, w: str(len(w)),
    "Spell the word '{w}' backwards.": lambda a, b, w: w[::-1],
    "What is the first letter of the word '{w}'?": lambda a, b, w: w[0],
    "What number comes after {a}?": lambda a, b, w: str(a + 1),
}
DISTRACTOR_WORDS: tuple[str, ...] = (
    "apple",
    "river",
    "planet",
    "guitar",
    "window",
    "garden",
    "rocket",
    "pencil",
    "bridge",
    "candle",
    "forest",
    "letter",
)

FAMILIES: dict[str, tuple[str, ...]] = {
    "t2i": world.TEXT_TO_IMAGE,
    "caption": world.CAPTION,
    "caption.previous": (
        "Describe the picture you just made.",
        "What is in your last picture?",
        "Write a caption for that image.",
        "Can you describe what you drew?",
    ),
    **{f"edit.{op}": t for op, t in world.EDIT.items()},
    **{f"vqa.{k}": t for k, t in world.VQA.items()},
    # image2qa needs questions that end with '?'
    **{f"qa.{k}": tuple(x for x in t if x.endswith("?")) for k, t in world.VQA.items()},
    "refer": world.REFER,
    "ctx.edit.previous": ("{text}", "Now {lc}", "Next, {lc}", "Great, now {lc}", "Then {lc}"),
    "ctx.edit.uploaded": (
        "{text}",
        "Here is a picture. {text}",
        "Look at this image. {text}",
        "For this picture: {lc}",
    ),
    "ctx.ask.previous": (
        "{text}",
        "In that picture, {lc}",
        "About the picture you just made: {lc}",
        "Looking at your last image, {lc}",
    ),
    "ctx.ask.uploaded": (
        "{text}",
        "Here is a picture. {text}",
        "Look at this image. {text}",
        "About this picture: {lc}",
    ),
    "dep.edit": (
        "Go back to {ref} and {lc}",
        "Take {ref} from earlier and {lc}",
        "Remember {ref}? {text}",
        "Returning to {ref}: {lc}",
        "Let's revisit {ref}. {text}",
    ),
    "dep.understand": (
        "Looking back at {ref}, {lc}",
        "About {ref} from before: {lc}",
        "Remember {ref}? {text}",
        "In {ref} from earlier, {lc}",
    ),
    "dep.caption": (
        "Describe {ref} again.",
        "Can you describe {ref} from earlier?",
        "What was in {ref}? Describe it.",
        "Write a caption for {ref} from before.",
    ),
    "distractor": tuple(DISTRACTORS),
}


def lower_first(text: str) -> str:
    """Lower-case the first letter unless it starts the pronoun 'I' ('I'd like' stays)."""
    if not text or text.startswith(("I ", "I'")):
        return text
    return text[0].lower() + text[1:]


class ShapesPhrasing:
    """Template families split into train / held-out phrasings.

    Args:
        split: ``"train"``, ``"heldout"`` or ``"all"``.
        seed: fixes the partition (the training and evaluation recipes must use the same one).
        heldout_fraction: share of each family held out (rounded, at least one template when a family has two+).
    """

    def __init__(
        self, *, split: Literal["train", "heldout", "all"] = "train", seed: int = 0, heldout_fraction: float = 0.25
    ) -> None:
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"ShapesPhrasing.split must be 'train', 'heldout' or 'all', got {split!r}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"ShapesPhrasing.heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.split = split
        self.seed = seed
        self.heldout_fraction = heldout_fraction
        self._parts = {name: self._partition(name, t) for name, t in FAMILIES.items()}

    def _partition(self, name: str, templates: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        n = len(templates)
        if n < 2:
            return templates, templates
        n_held = min(n - 1, max(1, round(n * self.heldout_fraction)))
        order = list(range(n))
        random.Random(f"{self.seed}:{name}").shuffle(order)
        held = set(order[:n_held])
        train = tuple(t for i, t in enumerate(templates) if i not in held)
        return train, tuple(t for i, t in enumerate(templates) if i in held)

    def templates(self, family: str) -> tuple[str, ...]:
        if family not in self._parts:
            raise KeyError(f"ShapesPhrasing: unknown template family {family!r}; known: {sorted(self._parts)}")
        train, held = self._parts[family]
        return train if self.split == "train" else held if self.split == "heldout" else FAMILIES[family]

    def pick(self, rng: random.Random, family: str) -> str:
        return rng.choice(self.templates(family))

    def wrap(self, rng: random.Random, family: str, text: str, **extra: str) -> str:
        """Fill a wrapper template around ``text`` (``{text}`` as is, ``{lc}`` with a lower-case first letter)."""
        return self.pick(rng, family).format(text=text, lc=lower_first(text), **extra)

    # ------------------------------------------------------------------ world sentences
    def edit_text(self, edit: Edit, rng: random.Random, config: WorldConfig) -> str:
        """The instruction of an edit, phrased with this split's templates."""
        t = self.pick(rng, f"edit.{edit.operation.value}")
        if edit.operation is EditOp.ADD:
            new = edit.result
            assert new is not None
            return t.format(
                new=f"{world.article(new.size)} {new.size} {new.colour} {new.shape}",
                pos=position_name(new.cell, config.grid),
            )
        assert edit.subject is not None
        q = distinguishing_query(edit.subject, edit.source)
        assert q is not None  # the cell always singles an object out
        res = edit.result
        fields = {}
        if res is not None:
            fields = {
                "colour": res.colour,
                "size": res.size,
                "pos": position_name(res.cell, config.grid),
                "a_shape": f"{world.article(res.shape)} {res.shape}",
            }
        return t.format(obj=q.phrase(config), **fields)

    def question_text(self, vqa: VQA, rng: random.Random, config: WorldConfig, *, family: str = "vqa") -> str:
        """The question of a VQA task, phrased with this split's templates (``family="qa"``: only '?' forms)."""
        t = self.pick(rng, f"{family}.{vqa.kind.value}")
        if vqa.kind is QuestionKind.COUNT:
            s = vqa.subject
            what = f"{s.colour} objects" if s.colour else world.plural(s.shape) if s.shape else "objects"
            return t.format(what=what)
        return t.format(obj=vqa.subject.phrase(config))

    def refer(self, rng: random.Random, np: str) -> str:
        return self.pick(rng, "refer").format(np=np)

    def distractor(self, rng: random.Random) -> tuple[str, str]:
        """A verifiable small-talk question and its answer."""
        t = self.pick(rng, "distractor")
        b = rng.randint(2, 9)
        a = rng.randint(b + 1, 19)
        w = rng.choice(DISTRACTOR_WORDS)
        return t.format(a=a, b=b, w=w), DISTRACTORS[t](a, b, w)
