"""Sentence templates of the ShapesChat tasks, several per task so a model cannot key on one sentence.

Templates are ``str.format`` strings. Placeholders: ``{desc}`` a scene description clause ("a small red circle in the
top left"), ``{obj}`` a referring expression ("the red circle"), ``{colour}``, ``{shape}``/``{a_shape}`` ("a circle"),
``{size}``, ``{pos}`` a position ("top left"), ``{new}`` a new object ("a large blue square"), ``{what}`` a plural
noun phrase ("red objects"), ``{np}`` a noun phrase inside a reference ("the red circle").

:func:`pick` chooses one with a caller's ``random.Random`` (deterministic given its seed), or the first without one.

Example:
    >>> import random
    >>> pick(random.Random(0), EDIT["move"]).format(obj="the red circle", pos="center")
    'Place the red circle in the center instead.'
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["TEXT_TO_IMAGE", "CAPTION", "EDIT", "VQA", "REFER", "pick", "article", "plural"]

TEXT_TO_IMAGE: tuple[str, ...] = (
    "Draw {desc}.",
    "Could you draw {desc}?",
    "Please make a picture of {desc}.",
    "Generate an image with {desc}.",
    "Show me {desc}.",
    "I'd like a picture containing {desc}.",
)

CAPTION: tuple[str, ...] = (
    "Describe this picture.",
    "What is in this image?",
    "Write a caption for this picture.",
    "Can you describe what you see?",
    "Give a short description of the image.",
)

EDIT: dict[str, tuple[str, ...]] = {
    "recolour": (
        "Make {obj} {colour}.",
        "Change the colour of {obj} to {colour}.",
        "Paint {obj} {colour}.",
        "Recolour {obj} so it is {colour}.",
        "Turn {obj} {colour}.",
    ),
    "move": (
        "Move {obj} to the {pos}.",
        "Put {obj} in the {pos}.",
        "Shift {obj} over to the {pos}.",
        "Place {obj} in the {pos} instead.",
        "Can you move {obj} to the {pos}?",
    ),
    "resize": (
        "Make {obj} {size}.",
        "Resize {obj} to be {size}.",
        "Change the size of {obj} to {size}.",
        "I'd like {obj} to be {size}.",
    ),
    "reshape": (
        "Turn {obj} into {a_shape}.",
        "Change {obj} into {a_shape}.",
        "Make {obj} {a_shape} instead.",
        "Replace {obj} with {a_shape} of the same colour and size.",
        "Reshape {obj} into {a_shape}.",
    ),
    "add": (
        "Add {new} in the {pos}.",
        "Put {new} in the {pos}.",
        "Also draw {new} in the {pos}.",
        "Can you add {new} to the {pos}?",
        "Place {new} in the {pos} as well.",
    ),
    "remove": (
        "Remove {obj}.",
        "Delete {obj}.",
        "Take out {obj}.",
        "Get rid of {obj}.",
        "Erase {obj} from the picture.",
    ),
}

VQA: dict[str, tuple[str, ...]] = {
    "colour": (
        "What colour is {obj}?",
        "Which colour does {obj} have?",
        "Tell me the colour of {obj}.",
        "What is the colour of {obj}?",
    ),
    "shape": (
        "What shape is {obj}?",
        "Which shape is {obj}?",
        "Tell me the shape of {obj}.",
        "What kind of shape is {obj}?",
    ),
    "position": (
        "Where is {obj}?",
        "In which part of the picture is {obj}?",
        "Where in the image is {obj}?",
        "Tell me where {obj} is.",
    ),
    "count": (
        "How many {what} are there?",
        "How many {what} can you see?",
        "Count the {what} in the picture.",
        "What is the number of {what} in the image?",
    ),
}

REFER: tuple[str, ...] = (
    "the picture with {np}",
    "the image with {np}",
    "the drawing with {np}",
    "the one with {np}",
    "the picture that had {np}",
)


def pick(rng: random.Random | None, templates: Sequence[str]) -> str:
    """One template: ``rng.choice`` (one draw from the stream) or, without an rng, the first."""
    if not templates:
        raise ValueError("pick: no templates")
    return templates[0] if rng is None else rng.choice(templates)


def article(word: str) -> str:
    """'a' or 'an' for the word that follows (by its first letter)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def plural(noun: str) -> str:
    """English plural of a shape noun: 'cross' → 'crosses', 'circle' → 'circles'."""
    return noun + "es" if noun.endswith(("s", "x", "sh", "ch")) else noun + "s"
