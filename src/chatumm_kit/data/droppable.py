"""Which segments CFG condition dropout may remove: :class:`DroppablePolicy` (SPEC §4 "CFG training dropout").

The packer drops a segment only if it is marked ``droppable`` (text 10 %, ViT view 30 %, clean VAE view 30 % of the
time, :class:`~chatumm_kit.data.packing.CFGDropRates`). The mark is data: it travels in the dialogue JSON. This module
holds the rule that decides it for dialogues that do not say — the synthesis pipeline and ``chatumm data import``
both call it.

Policies:

* ``image-replies`` (the default): every segment of a user turn that is answered by a *generated image* (the next
  turn is a trainable assistant turn holding an image) is droppable. Why: classifier-free guidance at inference runs
  the image reply under two extra contexts — without the trailing user text (text-unconditional) and without the
  trailing user turn's images (image-unconditional), SPEC §4 — so the model must have seen its image targets under
  exactly those missing conditions. Earlier turns and generated images are never dropped for the current target, so
  the chat's contexts keep them (``inference/session.py`` builds exactly these contexts). A turn answered with text only is left whole: dropping the question of a text answer teaches
  the language model to answer questions it never saw, which is noise for cross-entropy.
* ``user-turns``: every segment of every user turn (more dropout, also for text answers).
* ``none``: mark nothing.

A policy only *adds* marks: a segment already marked droppable (the kit's own schema can say so) stays droppable.

Example:
    >>> from chatumm_kit.data.dialogue import Dialogue, ImageSegment, Role, TextSegment, Turn
    >>> d = Dialogue(id="d", turns=[
    ...     Turn(role=Role.USER, segments=[TextSegment(text="Draw a cat.")]),
    ...     Turn(role=Role.ASSISTANT, segments=[ImageSegment(image="img0")]),
    ...     Turn(role=Role.USER, segments=[TextSegment(text="What colour is it?")]),
    ...     Turn(role=Role.ASSISTANT, segments=[TextSegment(text="Grey.")]),
    ... ])
    >>> [s.droppable for t in mark_droppable(d, DroppablePolicy.IMAGE_REPLIES).turns for s in t.segments]
    [True, False, False, False]
"""

from __future__ import annotations

import dataclasses
from enum import Enum

from chatumm_kit.data.dialogue import Dialogue, ImageSegment, Role, Turn

__all__ = ["DroppablePolicy", "mark_droppable", "answered_with_image"]


class DroppablePolicy(str, Enum):
    """Which user segments are marked droppable (see the module docstring)."""

    IMAGE_REPLIES = "image-replies"
    USER_TURNS = "user-turns"
    NONE = "none"


def answered_with_image(turns: list[Turn], index: int) -> bool:
    """Whether turn ``index`` is followed by a trainable assistant turn that holds an image (a generation target)."""
    if index + 1 >= len(turns):
        return False
    reply = turns[index + 1]
    return reply.role is Role.ASSISTANT and reply.trainable and any(isinstance(s, ImageSegment) for s in reply.segments)


def mark_droppable(dialogue: Dialogue, policy: DroppablePolicy | str) -> Dialogue:
    """A copy of ``dialogue`` with the user segments ``policy`` selects marked droppable (existing marks kept)."""
    policy = DroppablePolicy(policy)
    turns = []
    for i, turn in enumerate(dialogue.turns):
        chosen = turn.role is Role.USER and (
            policy is DroppablePolicy.USER_TURNS
            or (policy is DroppablePolicy.IMAGE_REPLIES and answered_with_image(dialogue.turns, i))
        )
        if chosen:
            segments = [s if s.droppable else dataclasses.replace(s, droppable=True) for s in turn.segments]
            turn = dataclasses.replace(turn, segments=segments)
        turns.append(turn)
    return dataclasses.replace(dialogue, turns=turns)
