"""The dialogue layouts ``chatumm data import`` reads, one JSON object per line, parsed to :class:`Dialogue` (SPEC §2).

Three layouts (``auto`` picks per line by its key: ``turns`` → kit, ``conversations`` → LLaVA, ``messages`` → OpenAI):

* **kit** — :meth:`Dialogue.to_dict`'s schema: ``{"id", "turns": [{"role", "segments": [{"type": "text", "text"} |
  {"type": "image", "image": REF}], "trainable"?, "meta"?}], "meta"?}``, with ``droppable`` per segment if you like.
* **llava** — ``{"id"?, "image": REF | "images": [REF, ...], "conversations": [{"from": "human"|"gpt", "value"}]}``.
  Each ``<image>`` in a ``value`` takes the next image of the list, in order, and sits where the placeholder is; an
  ``<image>`` in a ``gpt`` turn is an image the assistant generates. Placeholders and images must match in number.
* **openai** — ``{"id"?, "messages": [{"role": "user"|"assistant"|"system", "content": str | [part, ...],
  "weight"?: 0|1}]}`` with parts ``{"type": "text", "text"}`` and ``{"type": "image_url", "image_url": {"url": REF}}``
  (``"image_url": REF`` and ``{"type": "image", "image": REF}`` are accepted too). An assistant message with
  ``"weight": 0`` is context only (not trained on), as in OpenAI's fine-tuning format.

``REF`` is an image reference: a path relative to the images folder (or absolute), a ``file://`` URL, or a
``data:image/...;base64,...`` URL (:mod:`chatumm_kit.data.image_files` reads it). Roles ``human``/``user`` and
``gpt``/``assistant`` are accepted in both LLaVA and OpenAI layouts. A ``system`` message becomes a system turn
(text only, never trained on, entered like BAGEL's system prompt); it must be followed by a user message.

A parsed dialogue still holds the references in its :class:`ImageSegment` s; the importer reads the pixels and renames
them ``img0, img1, ...``. Every problem raises :class:`DialogueImportError` naming the line, the turn (its index in the
input's list) and the field.

Example:
    >>> row = {"id": "a", "image": "cat.jpg",
    ...        "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}
    >>> parsed = parse_line(row, line=1)
    >>> parsed.format.value, [t.role.value for t in parsed.dialogue.turns], parsed.dialogue.image_keys
    ('llava', ['user', 'assistant'], ['cat.jpg'])
    >>> parsed.image_fields["cat.jpg"]
    (0, 'image')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from chatumm_kit.data.dialogue import Dialogue, DialogueError, ImageSegment, Role, Segment, TextSegment, Turn

__all__ = ["ImportFormat", "DialogueImportError", "ParsedDialogue", "parse_line", "detect_format", "IMAGE_PLACEHOLDER"]

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": Role.USER, "user": Role.USER, "gpt": Role.ASSISTANT, "assistant": Role.ASSISTANT}
_TURN_IN_MESSAGE = re.compile(r"turn (\d+)")


class ImportFormat(str, Enum):
    """An input layout (see the module docstring); ``auto`` decides per line."""

    AUTO = "auto"
    KIT = "kit"
    LLAVA = "llava"
    OPENAI = "openai"


_LIST_KEY = {ImportFormat.KIT: "turns", ImportFormat.LLAVA: "conversations", ImportFormat.OPENAI: "messages"}


class DialogueImportError(DialogueError):
    """One input line that cannot be imported. ``line`` is 1-based; ``turn`` is the index in the input's turn list
    (``None`` when the problem is not in a turn); ``field`` is a JSON path such as ``conversations[2].value``."""

    def __init__(self, reason: str, *, line: int, turn: int | None = None, field: str | None = None) -> None:
        self.reason, self.line, self.turn, self.field = reason, line, turn, field
        where = [f"line {line}"]
        if turn is not None:
            where.append(f"turn {turn}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {reason}")

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "turn": self.turn, "field": self.field, "reason": self.reason}


@dataclass
class ParsedDialogue:
    """A dialogue read from one line, images still as references.

    Attributes:
        dialogue: the dialogue; each :class:`ImageSegment` ``image`` is the reference as written.
        format: the layout it was read as.
        image_fields: reference → ``(turn, field)`` of its first appearance, to name it in an image error.
        input_turns: for each dialogue turn, the index of the input turn it came from (a folded system message
            shifts them).
    """

    dialogue: Dialogue
    format: ImportFormat
    image_fields: dict[str, tuple[int, str]] = field(default_factory=dict)
    input_turns: list[int] = field(default_factory=list)

    def input_turn(self, turn: int) -> int:
        """The input index of dialogue turn ``turn``."""
        return self.input_turns[turn] if 0 <= turn < len(self.input_turns) else turn


def detect_format(data: dict[str, Any], *, line: int) -> ImportFormat:
    """The layout of one parsed line, by the key holding its turns."""
    found = [fmt for fmt, key in _LIST_KEY.items() if key in data]
    if len(found) != 1:
        keys = ", ".join(repr(k) for k in _LIST_KEY.values())
        what = "none" if not found else " and ".join(repr(_LIST_KEY[f]) for f in found)
        raise DialogueImportError(f"cannot tell the layout: expected exactly one of {keys}, found {what}", line=line)
    return found[0]


def parse_line(data: Any, *, line: int, format: ImportFormat | str = ImportFormat.AUTO) -> ParsedDialogue:
    """Parse one JSON value in ``format`` (``auto``: :func:`detect_format`); raises :class:`DialogueImportError`."""
    if not isinstance(data, dict):
        raise DialogueImportError(f"expected a JSON object, got {type(data).__name__}", line=line)
    fmt = ImportFormat(format)
    if fmt is ImportFormat.AUTO:
        fmt = detect_format(data, line=line)
    elif _LIST_KEY[fmt] not in data:
        raise DialogueImportError(f"no {_LIST_KEY[fmt]!r} key (the {fmt.value} layout's turn list)", line=line)
    parsed = {ImportFormat.KIT: _parse_kit, ImportFormat.LLAVA: _parse_llava, ImportFormat.OPENAI: _parse_openai}[fmt](
        data, line
    )
    _check_roles(parsed, line=line)
    return parsed


# --------------------------------------------------------------------------------------------- shared checks
def _check_roles(parsed: ParsedDialogue, *, line: int) -> None:
    turns = parsed.dialogue.turns
    key = _LIST_KEY[parsed.format]
    if not turns:
        raise DialogueImportError("no turns", line=line, field=key)
    if not any(t.role is Role.ASSISTANT and t.trainable for t in turns):
        raise DialogueImportError(
            "no trained assistant turn: nothing to learn from this dialogue", line=line, field=key
        )
    try:
        parsed.dialogue.validate()
    except DialogueError as e:
        m = _TURN_IN_MESSAGE.search(str(e))
        turn = parsed.input_turn(int(m.group(1))) if m else None
        raise DialogueImportError(str(e), line=line, turn=turn, field=key) from None


def _dialogue_id(data: dict[str, Any], line: int) -> str:
    raw = data.get("id")
    if raw is None or raw == "":
        return f"line-{line}"
    if isinstance(raw, (str, int)) and not isinstance(raw, bool):
        return str(raw)
    raise DialogueImportError(f"'id' must be a string or an integer, got {type(raw).__name__}", line=line, field="id")


def _role(raw: Any, *, line: int, turn: int, field_name: str) -> Role:
    """The role of one input turn."""
    if raw == "system":
        return Role.SYSTEM
    if isinstance(raw, str) and raw in _ROLES:
        return _ROLES[raw]
    expected = ", ".join(repr(k) for k in [*_ROLES, "system"])
    raise DialogueImportError(
        f"unknown role {raw!r} (expected one of {expected})", line=line, turn=turn, field=field_name
    )


class _TurnCollector:
    """Builds turns in input order; a system message becomes a system turn that a user message must follow."""

    def __init__(self, line: int) -> None:
        self.line = line
        self.turns: list[Turn] = []
        self.input_turns: list[int] = []
        self.system_turn: int | None = None  # input index of a system message still waiting for its user message
        self.image_fields: dict[str, tuple[int, str]] = {}

    def add(self, role: Role, segments: list[Segment], *, turn: int, field_name: str, trainable: bool = True):
        if role is Role.SYSTEM:
            if any(isinstance(s, ImageSegment) for s in segments):
                raise DialogueImportError(
                    "a system message cannot hold an image", line=self.line, turn=turn, field=field_name
                )
            self.system_turn = turn
        elif self.system_turn is not None:
            if role is not Role.USER:
                raise DialogueImportError(
                    "a system message must be followed by a user message", line=self.line, turn=turn, field=field_name
                )
            self.system_turn = None
        self.turns.append(Turn(role=role, segments=segments, trainable=trainable))
        self.input_turns.append(turn)

    def finish(self, fmt: ImportFormat, dialogue_id: str) -> ParsedDialogue:
        if self.system_turn is not None:
            raise DialogueImportError(
                "a system message with no user message after it", line=self.line, turn=self.system_turn
            )
        return ParsedDialogue(
            dialogue=Dialogue(id=dialogue_id, turns=self.turns),
            format=fmt,
            image_fields=self.image_fields,
            input_turns=self.input_turns,
        )

    def note_image(self, ref: str, *, turn: int, field_name: str) -> None:
        self.image_fields.setdefault(ref, (turn, field_name))


def _text(raw: Any, *, line: int, turn: int, field_name: str) -> str:
    if not isinstance(raw, str):
        raise DialogueImportError(
            f"expected a string, got {type(raw).__name__}", line=line, turn=turn, field=field_name
        )
    if not raw.strip():
        raise DialogueImportError("empty text", line=line, turn=turn, field=field_name)
    return raw


def _image_ref(raw: Any, *, line: int, turn: int | None, field_name: str) -> str:
    if not isinstance(raw, str) or not raw.strip():
        got = repr(raw) if isinstance(raw, str) else type(raw).__name__
        raise DialogueImportError(f"expected an image path or URL, got {got}", line=line, turn=turn, field=field_name)
    return raw.strip()


# --------------------------------------------------------------------------------------------- kit
def _parse_kit(data: dict[str, Any], line: int) -> ParsedDialogue:
    try:
        dialogue = Dialogue.from_dict(data)
    except DialogueError as e:
        m = _TURN_IN_MESSAGE.search(str(e))
        raise DialogueImportError(str(e), line=line, turn=int(m.group(1)) if m else None, field="turns") from None
    fields: dict[str, tuple[int, str]] = {}
    for i, turn in enumerate(dialogue.turns):
        for j, seg in enumerate(turn.segments):
            if isinstance(seg, ImageSegment):
                fields.setdefault(seg.image, (i, f"turns[{i}].segments[{j}].image"))
    return ParsedDialogue(
        dialogue=dialogue, format=ImportFormat.KIT, image_fields=fields, input_turns=list(range(len(dialogue.turns)))
    )


# --------------------------------------------------------------------------------------------- LLaVA
def _llava_images(data: dict[str, Any], line: int) -> tuple[list[str], str]:
    if "image" in data and "images" in data:
        raise DialogueImportError("give 'image' or 'images', not both", line=line, field="images")
    name = "images" if "images" in data else "image"
    raw = data.get(name)
    if raw is None:
        return [], name
    items = raw if isinstance(raw, list) else [raw]
    return [
        _image_ref(r, line=line, turn=None, field_name=f"{name}[{k}]" if isinstance(raw, list) else name)
        for k, r in enumerate(items)
    ], name


def _parse_llava(data: dict[str, Any], line: int) -> ParsedDialogue:
    images, images_field = _llava_images(data, line)
    convs = data["conversations"]
    if not isinstance(convs, list):
        raise DialogueImportError(f"expected a list, got {type(convs).__name__}", line=line, field="conversations")
    out = _TurnCollector(line)
    used = 0
    for k, turn in enumerate(convs):
        at = f"conversations[{k}]"
        if not isinstance(turn, dict):
            raise DialogueImportError(f"expected an object, got {type(turn).__name__}", line=line, turn=k, field=at)
        role = _role(turn.get("from"), line=line, turn=k, field_name=f"{at}.from")
        value = _text(turn.get("value"), line=line, turn=k, field_name=f"{at}.value")
        segments: list[Segment] = []
        pieces = value.split(IMAGE_PLACEHOLDER)
        for p, piece in enumerate(pieces):
            if piece.strip():
                segments.append(TextSegment(text=piece.strip()))
            if p == len(pieces) - 1:
                break
            if used >= len(images):
                raise DialogueImportError(
                    f"more {IMAGE_PLACEHOLDER} placeholders than images ({len(images)} in {images_field!r})",
                    line=line,
                    turn=k,
                    field=f"{at}.value",
                )
            out.note_image(
                images[used], turn=k, field_name=f"{images_field}[{used}]" if images_field == "images" else images_field
            )
            segments.append(ImageSegment(image=images[used]))
            used += 1
        if not segments:
            raise DialogueImportError("empty text", line=line, turn=k, field=f"{at}.value")
        out.add(role, segments, turn=k, field_name=at)
    if used != len(images):
        raise DialogueImportError(
            f"{len(images)} image(s) but {used} {IMAGE_PLACEHOLDER} placeholder(s) in the conversation: each image "
            f"must be placed by a placeholder",
            line=line,
            field=images_field,
        )
    return out.finish(ImportFormat.LLAVA, _dialogue_id(data, line))


# --------------------------------------------------------------------------------------------- OpenAI
def _openai_part(part: Any, *, line: int, turn: int, at: str, out: _TurnCollector) -> Segment:
    if not isinstance(part, dict):
        raise DialogueImportError(
            f"expected a content part object, got {type(part).__name__}", line=line, turn=turn, field=at
        )
    kind = part.get("type")
    if kind == "text":
        return TextSegment(text=_text(part.get("text"), line=line, turn=turn, field_name=f"{at}.text"))
    if kind == "image_url":
        raw = part.get("image_url")
        if isinstance(raw, dict):
            ref = _image_ref(raw.get("url"), line=line, turn=turn, field_name=f"{at}.image_url.url")
            where = f"{at}.image_url.url"
        else:
            ref = _image_ref(raw, line=line, turn=turn, field_name=f"{at}.image_url")
            where = f"{at}.image_url"
    elif kind == "image":
        ref = _image_ref(part.get("image"), line=line, turn=turn, field_name=f"{at}.image")
        where = f"{at}.image"
    else:
        raise DialogueImportError(
            f"unknown content part type {kind!r} (expected 'text', 'image_url' or 'image')",
            line=line,
            turn=turn,
            field=f"{at}.type",
        )
    out.note_image(ref, turn=turn, field_name=where)
    return ImageSegment(image=ref)


def _parse_openai(data: dict[str, Any], line: int) -> ParsedDialogue:
    messages = data["messages"]
    if not isinstance(messages, list):
        raise DialogueImportError(f"expected a list, got {type(messages).__name__}", line=line, field="messages")
    out = _TurnCollector(line)
    for k, msg in enumerate(messages):
        at = f"messages[{k}]"
        if not isinstance(msg, dict):
            raise DialogueImportError(f"expected an object, got {type(msg).__name__}", line=line, turn=k, field=at)
        role = _role(msg.get("role"), line=line, turn=k, field_name=f"{at}.role")
        content = msg.get("content")
        if isinstance(content, str):
            segments: list[Segment] = [TextSegment(text=_text(content, line=line, turn=k, field_name=f"{at}.content"))]
        elif isinstance(content, list) and content:
            segments = [
                _openai_part(p, line=line, turn=k, at=f"{at}.content[{j}]", out=out) for j, p in enumerate(content)
            ]
        else:
            got = "an empty list" if isinstance(content, list) else type(content).__name__
            raise DialogueImportError(
                f"expected a string or a list of content parts, got {got}", line=line, turn=k, field=f"{at}.content"
            )
        weight = msg.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise DialogueImportError(f"weight must be 0 or 1, got {weight!r}", line=line, turn=k, field=f"{at}.weight")
        if weight == 0 and role is not Role.ASSISTANT:
            raise DialogueImportError(
                "weight 0 only applies to assistant messages", line=line, turn=k, field=f"{at}.weight"
            )
        out.add(role, segments, turn=k, field_name=at, trainable=weight == 1)
    return out.finish(ImportFormat.OPENAI, _dialogue_id(data, line))
