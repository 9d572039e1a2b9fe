"""What one assistant turn should be (:class:`ExpectedTurn`, read from a synthesized dialogue) and what it was
(:class:`Reply`, whatever a model answered).

The ground truth comes from the metadata the synthesis pipeline leaves in every dialogue (``synth/draft.py``):
each assistant ``Turn.meta`` holds ``tags`` (task, output modality, dependency ``distance``), ``distractor`` and
``truth`` (expected ``answer`` text and/or expected output ``image`` key); ``Dialogue.meta["images"][key]["truth"]``
holds each picture's ShapesChat scene. :func:`expected_turns` turns that into one :class:`ExpectedTurn` per
exchange, with the user's parts and the true reply's parts as pixels and strings (what a responder is fed).

Example:
    >>> reply = Reply(parts=["top left"])
    >>> reply.modality, reply.text, reply.images
    ('text', 'top left', [])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from chatumm_kit.data.dialogue import DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.shapes import Scene, WorldConfig, parse_caption

__all__ = [
    "Part",
    "Reply",
    "ExpectedTurn",
    "expected_turns",
    "reference_turns",
    "modality_of",
    "OUTPUTS",
    "NO_OUTPUT",
]

Part = str | torch.Tensor
"""One segment of a turn: a text string or a ``uint8 [3, H, W]`` image."""

OUTPUTS = ("text", "image", "interleaved")
NO_OUTPUT = "none"


def modality_of(parts: Sequence[Part]) -> str:
    """Output modality of a turn's parts: ``text``, ``image``, ``interleaved`` (both) or ``none`` (empty)."""
    has_text = any(isinstance(p, str) for p in parts)
    has_image = any(isinstance(p, torch.Tensor) for p in parts)
    if has_text and has_image:
        return "interleaved"
    return "text" if has_text else "image" if has_image else NO_OUTPUT


@dataclass
class Reply:
    """An assistant reply as the benchmark sees it.

    Attributes:
        parts: the reply's segments in order: text strings and ``uint8 [3, H, W]`` images.
        finished: False when the responder stopped the turn (segment cap) rather than the model ending it.
    """

    parts: list[Part] = field(default_factory=list)
    finished: bool = True

    @property
    def modality(self) -> str:
        return modality_of(self.parts)

    @property
    def text(self) -> str:
        """The text segments joined with a space (``""`` when there is none)."""
        return " ".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> list[torch.Tensor]:
        return [p for p in self.parts if isinstance(p, torch.Tensor)]


@dataclass
class ExpectedTurn:
    """The ground truth of one exchange (a user turn and the assistant turn that answers it).

    Attributes:
        dialogue_id: the dialogue.
        index: the exchange's index in the dialogue (0 = first assistant turn): the "turn index" of the report.
        task: ``generate`` / ``edit`` / ``understand`` / ``caption`` / ``chat``.
        output: the expected output modality: ``text`` / ``image`` / ``interleaved``.
        distance: history-dependency distance: unrelated exchanges between this one and the last one that showed
            the picture it acts on (0 = the previous exchange); None when it depends on no earlier picture.
        distractor: inserted by the long-range stage (unrelated to the rest of the dialogue).
        answer: the expected text (VQA answer, canonical caption, chat answer, interleaved answer), if any.
        answer_scene: for a caption, the scene its canonical text describes (None when it does not parse).
        target: the scene of the expected output image, if the turn should produce one.
        user: the user turn's parts (images as pixels), in order.
        reply: the true assistant turn's parts, in order (what teacher forcing replays into the history).
        category: the benchmark's category of the item (per-category tables), if it has one.
        meta: benchmark-specific facts a scorer needs (an item's options, its image group), JSON-able.
        system: the texts of the system turns that stand right before this exchange's user turn (instructions such
            as a system prompt, SPEC §4.1), in order; replayed before the user turn, never replied to.
    """

    dialogue_id: str
    index: int
    task: str
    output: str
    distance: int | None
    distractor: bool
    answer: str | None
    answer_scene: Scene | None
    target: Scene | None
    user: list[Part]
    reply: list[Part]
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    system: tuple[str, ...] = ()

    @property
    def distance_key(self) -> str:
        """``"none"`` or the distance as a string (the key of the per-distance breakdown)."""
        return "none" if self.distance is None else str(self.distance)


def _parts(turn: Turn, images: Mapping[str, torch.Tensor]) -> list[Part]:
    out: list[Part] = []
    for seg in turn.segments:
        out.append(seg.text if isinstance(seg, TextSegment) else images[seg.image])
    return out


def _scene_of_image(meta: Mapping[str, Any], key: str) -> Scene | None:
    truth = ((meta.get("images") or {}).get(key) or {}).get("truth") or {}
    return Scene.from_dict(truth["scene"]) if "scene" in truth else None


@dataclass(frozen=True)
class _Exchange:
    """One user → assistant exchange of a dialogue: the system turns right before it, and both turns' indices."""

    system: tuple[str, ...]
    user: Turn
    assistant: Turn
    assistant_index: int


def _exchanges(d) -> list[_Exchange]:
    """The dialogue as exchanges: any system turns, a user turn, an assistant turn; again and again.

    Raises:
        ValueError: naming the dialogue and its roles, when the turns are not in that pattern.
    """
    out, system, i, turns = [], [], 0, d.turns
    while i < len(turns):
        if turns[i].role is Role.SYSTEM:
            system.append(turns[i].text)
            i += 1
            continue
        if turns[i].role is not Role.USER or i + 1 >= len(turns) or turns[i + 1].role is not Role.ASSISTANT:
            raise ValueError(
                f"dialogue {d.id!r} turn {i}: the benchmark needs user/assistant exchanges (each user turn answered by "
                f"one assistant turn, system turns only before a user turn), got {[t.role.value for t in turns]}"
            )
        out.append(_Exchange(system=tuple(system), user=turns[i], assistant=turns[i + 1], assistant_index=i + 1))
        system, i = [], i + 2
    if system:
        raise ValueError(f"dialogue {d.id!r}: ends with a system turn (nothing answers it)")
    return out


def _inferred_task(user: Sequence[Part], reply: Sequence[Part]) -> str:
    """The task of an untagged exchange, from what goes in and out: a picture out is ``edit`` when one came in and
    ``generate`` otherwise; words out are ``understand`` when a picture came in and ``chat`` otherwise."""
    picture_in = any(isinstance(p, torch.Tensor) for p in user)
    if any(isinstance(p, torch.Tensor) for p in reply):
        return "edit" if picture_in else "generate"
    return "understand" if picture_in else "chat"


def reference_turns(sample: DialogueSample) -> list[ExpectedTurn]:
    """One :class:`ExpectedTurn` per exchange of **any** dialogue (your own, imported or synthesised), the reference
    being the dialogue's own assistant turn: no world, no ground-truth scenes (``target`` and ``answer_scene`` are
    None), so replies are judged (:class:`~.scoring.JudgedReplyScorer`) rather than scored exactly.

    Taxonomy tags are used when the synthesis pipeline left them (``task``, ``output``, ``distance``, ``category``);
    otherwise ``output`` is the reference turn's modality, ``task`` is inferred from what goes in and out
    (:func:`_inferred_task`) and ``distance`` is None.

    Raises:
        ValueError: naming the dialogue and turn, for a dialogue that is not a sequence of exchanges (system turns,
            a user turn, an assistant turn) or an empty assistant turn.
    """
    d = sample.dialogue
    out = []
    for j, ex in enumerate(_exchanges(d)):
        user, assistant = ex.user, ex.assistant
        user_parts, reply_parts = _parts(user, sample.images), _parts(assistant, sample.images)
        tags = assistant.meta.get("tags") if isinstance(assistant.meta.get("tags"), Mapping) else {}
        output = str(tags.get("output") or modality_of(reply_parts))
        if output not in OUTPUTS:
            raise ValueError(
                f"dialogue {d.id!r} turn {ex.assistant_index}: the reference reply is empty (nothing to judge)"
            )
        distance = tags.get("distance")
        text = " ".join(p for p in reply_parts if isinstance(p, str))
        out.append(
            ExpectedTurn(
                dialogue_id=d.id,
                index=j,
                task=str(tags.get("task") or _inferred_task(user_parts, reply_parts)),
                output=output,
                distance=None if distance is None else int(distance),
                distractor=bool(assistant.meta.get("distractor", False)),
                answer=text or None,
                answer_scene=None,
                target=None,
                user=user_parts,
                reply=reply_parts,
                category=None if tags.get("category") is None else str(tags["category"]),
                system=ex.system,
            )
        )
    return out


def expected_turns(sample: DialogueSample, world: WorldConfig) -> list[ExpectedTurn]:
    """One :class:`ExpectedTurn` per user → assistant exchange of a synthesized dialogue, in order.

    Raises:
        ValueError: naming the dialogue and turn, when the dialogue is not a sequence of exchanges or an
            assistant turn lacks the synthesis metadata (``tags``, ``truth``) the benchmark scores against.
    """
    d = sample.dialogue
    out = []
    for j, ex in enumerate(_exchanges(d)):
        user, assistant = ex.user, ex.assistant
        where = f"dialogue {d.id!r} turn {ex.assistant_index}"
        tags = assistant.meta.get("tags")
        if not isinstance(tags, Mapping) or "task" not in tags or "output" not in tags:
            raise ValueError(
                f"{where}: assistant meta has no taxonomy tags (task, output, distance); the benchmark scores "
                "dialogues written by the synthesis pipeline (chatumm synth)"
            )
        truth = assistant.meta.get("truth") or {}
        output = str(tags["output"])
        if output not in OUTPUTS:
            raise ValueError(f"{where}: unknown output modality {output!r} (expected one of {OUTPUTS})")
        target = None
        if output != "text":
            key = truth.get("image") or next((s.image for s in assistant.segments if isinstance(s, ImageSegment)), None)
            target = _scene_of_image(d.meta, key) if key else None
            if target is None and isinstance(truth.get("world"), Mapping) and "target" in truth["world"]:
                target = Scene.from_dict(truth["world"]["target"])
            if target is None:
                raise ValueError(f"{where}: an image reply is expected but no ground-truth scene is recorded for it")
        answer = truth.get("answer")
        if answer is None and output != "image":
            answer = assistant.text or None
        task = str(tags["task"])
        answer_scene = parse_caption(answer, world) if task == "caption" and answer else None
        distance = tags.get("distance")
        out.append(
            ExpectedTurn(
                dialogue_id=d.id,
                index=j,
                task=task,
                output=output,
                distance=None if distance is None else int(distance),
                distractor=bool(assistant.meta.get("distractor", False)),
                answer=answer,
                answer_scene=answer_scene,
                target=target,
                user=_parts(user, sample.images),
                reply=_parts(assistant, sample.images),
                system=ex.system,
            )
        )
    return out
