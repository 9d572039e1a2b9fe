"""The dialogue schema: what a conversation is before it becomes a token stream (SPEC §2).

A :class:`Dialogue` is an ordered list of :class:`Turn` s. A turn belongs to the user, the assistant or the system and
holds an ordered list of segments: :class:`TextSegment` or :class:`ImageSegment`. Images are referenced by key; the pixels
travel beside the JSON (in a shard, ``{key}.png``) and meet the dialogue again in a :class:`DialogueSample`.

An image's role follows from its turn: in a user turn it is an *input* (clean VAE + ViT views); in an assistant
turn it is a *generated target* (noised VAE for the loss, then clean VAE + ViT) when the turn is ``trainable``, and
plain clean context otherwise (a history replayed at inference).

A **system** turn holds text only (instructions such as BAGEL's think prompt, SPEC §4.1). It enters the stream like
any text segment (``im_s`` … ``im_e``, no role prefix), as BAGEL enters its system prompt before the request, and is
never a training target. It may stand anywhere before a user turn (not directly before an assistant turn); the first
turn that is not a system turn is a user turn.

A text segment of an assistant turn may be **think** text (``TextSegment(think=True)``): the reasoning BAGEL's think
mode decodes inside ``<think> … </think>`` before an image. In the stream it is an ordinary text segment (trained
like any assistant text); at inference it enters the full context only, never a CFG context (SPEC §4.1).

Example:
    >>> d = Dialogue(id="d0", turns=[
    ...     Turn(role=Role.USER, segments=[TextSegment(text="Draw a red circle.")]),
    ...     Turn(role=Role.ASSISTANT, segments=[ImageSegment(image="img0")]),
    ... ])
    >>> d.validate(image_keys={"img0"})
    >>> Dialogue.from_json(d.to_json()) == d
    True
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

__all__ = [
    "DialogueError",
    "Role",
    "TextSegment",
    "ImageSegment",
    "IMAGE_VIEWS",
    "Segment",
    "Turn",
    "Dialogue",
    "DialogueSample",
]


class DialogueError(ValueError):
    """A dialogue that breaks the schema; the message names the dialogue, turn and segment."""


class Role(str, Enum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"


_ROLE_NAMES = "'user', 'assistant' or 'system'"


@dataclass(frozen=True)
class TextSegment:
    """A text segment. ``droppable`` marks it for CFG condition dropout during training (SPEC §4); ``think`` marks an
    assistant's reasoning (think mode, SPEC §4.1: at inference it is in the full context only, never in a CFG
    context)."""

    text: str
    droppable: bool = False
    think: bool = False


@dataclass(frozen=True)
class ImageSegment:
    """A reference to an image by key. ``droppable`` marks it for CFG condition dropout during training.

    ``views``: which views the image enters the stream as (:data:`IMAGE_VIEWS`): ``"vae+vit"`` (clean VAE then ViT,
    SPEC §2, the default) or ``"vit"`` (the ViT view only — how BAGEL's understanding mode reads an image, SPEC §4.1).
    Only a user image may be ``"vit"``: an assistant image is generated, or re-enters, as VAE + ViT.
    """

    image: str
    droppable: bool = False
    views: str = "vae+vit"


Segment = TextSegment | ImageSegment

IMAGE_VIEWS = ("vae+vit", "vit")
"""The view sets an image segment may enter as (:attr:`ImageSegment.views`)."""


@dataclass(frozen=True)
class Turn:
    """One turn of the conversation.

    Attributes:
        role: who speaks.
        segments: ordered text and image segments.
        trainable: for assistant turns, whether the turn is supervised (CE on its text and intents, MSE on its
            images). An untrained assistant turn is context only. Ignored for user and system turns, which are never
            supervised.
        meta: JSON-able extras (taxonomy tags, ground truth for evaluation); not used by the packer.
    """

    role: Role
    segments: list[Segment]
    trainable: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:  # lists make the frozen dataclass unhashable; compare by value
        if not isinstance(other, Turn):
            return NotImplemented
        return (self.role, self.segments, self.trainable, self.meta) == (
            other.role,
            other.segments,
            other.trainable,
            other.meta,
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def image_keys(self) -> list[str]:
        return [s.image for s in self.segments if isinstance(s, ImageSegment)]

    @property
    def text(self) -> str:
        """All text segments joined with a space (handy for tests and printing)."""
        return " ".join(s.text for s in self.segments if isinstance(s, TextSegment))


@dataclass
class Dialogue:
    """A multi-turn conversation. ``meta`` holds JSON-able extras (source, taxonomy, seeds)."""

    id: str
    turns: list[Turn]
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- validation
    def validate(self, *, image_keys: Iterable[str] | None = None) -> None:
        """Raise :class:`DialogueError` naming the first problem found.

        Args:
            image_keys: the keys of the images available for this dialogue; when given, every image reference
                must resolve to one of them.
        """
        where = f"dialogue {self.id!r}"
        if not self.turns:
            raise DialogueError(f"{where}: has no turns")
        available = set(image_keys) if image_keys is not None else None
        for i, turn in enumerate(self.turns):
            at = f"{where} turn {i}"
            if not isinstance(turn.role, Role):
                raise DialogueError(f"{at}: unknown role {turn.role!r} (expected {_ROLE_NAMES})")
            if not turn.segments:
                raise DialogueError(f"{at} ({turn.role.value}): has no segments")
            if turn.role is Role.ASSISTANT and i > 0 and self.turns[i - 1].role is Role.SYSTEM:
                raise DialogueError(
                    f"{at}: an assistant turn cannot follow a system turn (a user turn must come first)"
                )
            for j, seg in enumerate(turn.segments):
                if isinstance(seg, TextSegment):
                    if not seg.text:
                        raise DialogueError(f"{at} segment {j}: empty text")
                    if seg.think and turn.role is not Role.ASSISTANT:
                        raise DialogueError(f"{at} segment {j}: think text belongs to assistant turns only")
                elif isinstance(seg, ImageSegment):
                    if turn.role is Role.SYSTEM:
                        raise DialogueError(f"{at} segment {j}: a system turn holds text only, not an image")
                    if seg.views not in IMAGE_VIEWS:
                        raise DialogueError(f"{at} segment {j}: views must be one of {IMAGE_VIEWS}, got {seg.views!r}")
                    if seg.views != "vae+vit" and turn.role is not Role.USER:
                        raise DialogueError(f"{at} segment {j}: an {turn.role.value} image enters as 'vae+vit' only")
                    if available is not None and seg.image not in available:
                        raise DialogueError(
                            f"{at} segment {j}: image {seg.image!r} does not resolve (have {sorted(available)})"
                        )
                else:
                    raise DialogueError(f"{at} segment {j}: not a segment: {seg!r}")
        first = next((i for i, t in enumerate(self.turns) if t.role is not Role.SYSTEM), None)
        if first is not None and self.turns[first].role is not Role.USER:
            raise DialogueError(
                f"{where} turn {first}: a dialogue must start with a user turn (after any system turns)"
            )

    @property
    def image_keys(self) -> list[str]:
        """Every referenced image key, in order of first appearance."""
        seen: dict[str, None] = {}
        for turn in self.turns:
            for key in turn.image_keys:
                seen.setdefault(key, None)
        return list(seen)

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        turns = []
        for t in self.turns:
            segs = []
            for s in t.segments:
                if isinstance(s, TextSegment):
                    d: dict[str, Any] = {"type": "text", "text": s.text}
                    if s.think:
                        d["think"] = True
                else:
                    d = {"type": "image", "image": s.image}
                    if s.views != "vae+vit":
                        d["views"] = s.views
                if s.droppable:
                    d["droppable"] = True
                segs.append(d)
            row: dict[str, Any] = {"role": t.role.value, "segments": segs}
            if not t.trainable:
                row["trainable"] = False
            if t.meta:
                row["meta"] = t.meta
            turns.append(row)
        out: dict[str, Any] = {"id": self.id, "turns": turns}
        if self.meta:
            out["meta"] = self.meta
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Dialogue:
        """Parse a dict; raises :class:`DialogueError` naming the turn and segment of any problem."""
        if not isinstance(data, dict):
            raise DialogueError(f"dialogue must be a JSON object, got {type(data).__name__}")
        did = data.get("id")
        if not isinstance(did, str) or not did:
            raise DialogueError("dialogue: missing or empty 'id'")
        raw_turns = data.get("turns")
        if not isinstance(raw_turns, list):
            raise DialogueError(f"dialogue {did!r}: 'turns' must be a list")
        turns = []
        for i, rt in enumerate(raw_turns):
            at = f"dialogue {did!r} turn {i}"
            if not isinstance(rt, dict):
                raise DialogueError(f"{at}: must be an object")
            try:
                role = Role(rt.get("role"))
            except (ValueError, TypeError):
                raise DialogueError(f"{at}: unknown role {rt.get('role')!r} (expected {_ROLE_NAMES})") from None
            raw_segments = rt.get("segments")
            if not isinstance(raw_segments, list):
                raise DialogueError(f"{at}: 'segments' must be a list, got {type(raw_segments).__name__}")
            segs: list[Segment] = []
            for j, rs in enumerate(raw_segments):
                kind = rs.get("type") if isinstance(rs, dict) else None
                if kind == "text" and isinstance(rs.get("text"), str):
                    where = f"{at} segment {j}"
                    segs.append(
                        TextSegment(
                            text=rs["text"],
                            droppable=_flag(rs, "droppable", False, where),
                            think=_flag(rs, "think", False, where),
                        )
                    )
                elif kind == "image" and isinstance(rs.get("image"), str):
                    views = rs.get("views", "vae+vit")
                    if views not in IMAGE_VIEWS:
                        raise DialogueError(f"{at} segment {j}: 'views' must be one of {IMAGE_VIEWS}, got {views!r}")
                    droppable = _flag(rs, "droppable", False, f"{at} segment {j}")
                    segs.append(ImageSegment(image=rs["image"], droppable=droppable, views=views))
                else:
                    raise DialogueError(f"{at} segment {j}: expected a text or image segment, got {rs!r}")
            turns.append(
                Turn(
                    role=role,
                    segments=segs,
                    trainable=_flag(rt, "trainable", True, at),
                    meta=_meta(rt, at),
                )
            )
        dialogue = cls(id=did, turns=turns, meta=_meta(data, f"dialogue {did!r}"))
        dialogue.validate()
        return dialogue

    @classmethod
    def from_json(cls, text: str | bytes) -> Dialogue:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DialogueError(f"malformed dialogue JSON: {e}") from None
        return cls.from_dict(data)


def _flag(node: dict[str, Any], name: str, default: bool, where: str) -> bool:
    """A boolean field: JSON ``true``/``false`` only ("no", "false", 0 are errors, not truthy values)."""
    value = node.get(name, default)
    if not isinstance(value, bool):
        raise DialogueError(f"{where}: {name!r} must be true or false, got {value!r}")
    return value


def _meta(node: dict[str, Any], where: str) -> dict[str, Any]:
    value = node.get("meta", {})
    if not isinstance(value, dict):
        raise DialogueError(f"{where}: 'meta' must be an object, got {type(value).__name__}")
    return dict(value)


@dataclass
class DialogueSample:
    """A dialogue with its pixels: what the packer consumes.

    Attributes:
        dialogue: the conversation.
        images: key → ``uint8`` tensor ``[3, H, W]``; every key the dialogue references must be present.
        key: the sample's key in its source (shard name + sample key), for error messages and counting.
    """

    dialogue: Dialogue
    images: dict[str, torch.Tensor]
    key: str = ""

    def validate(self) -> None:
        self.dialogue.validate(image_keys=self.images.keys())
        for k, img in self.images.items():
            if img.dim() != 3 or img.shape[0] != 3:
                raise DialogueError(
                    f"sample {self.key or self.dialogue.id!r} image {k!r}: expected [3, H, W], got {tuple(img.shape)}"
                )
