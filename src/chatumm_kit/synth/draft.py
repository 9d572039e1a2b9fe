"""The working form of a dialogue during synthesis, and the metadata schema it leaves in the output.

Stages edit a :class:`DialogueDraft`: a list of :class:`Exchange` s (one user turn + the assistant's reply, with the
structure spelled out: task, uploaded images, the earlier image it acts on, ground truth) and the pictures by
dialogue-local key (``img0``, ``img1``, ...). :meth:`DialogueDraft.finalize` turns it into the kit's
:class:`~chatumm_kit.data.dialogue.DialogueSample` and computes the taxonomy tags from positions, so inserting turns
never leaves a stale distance behind.

Metadata schema (what the evaluation benchmark reads; every class has ``to_dict``/``from_dict``):

* ``Dialogue.meta`` = :class:`DialogueMeta`: ``index`` and ``seed`` of the candidate, ``stages`` run, ``distractors``
  inserted, ``interleaved`` (final reply is image + text), ``images``: key → :class:`ImageMeta` (``origin`` exchange,
  ``role`` uploaded/generated, ``record`` id, ``description`` text when known, ``truth`` — the ShapesChat scene as
  JSON, or None for real data).
* user ``Turn.meta`` = ``{"exchange": i, "tags": TurnTags}``.
* assistant ``Turn.meta`` = :class:`ExchangeMeta`: ``exchange`` index, ``tags`` (:class:`~.taxonomy.TurnTags`:
  task, input, output, dependency, distance), ``record`` id, ``distractor`` flag, ``refers_to``
  (:class:`ImageLink`: the earlier ``image`` key this turn acts on without re-uploading it, the ``origin`` exchange
  that produced it, and ``distance``, the unrelated exchanges in between), ``truth`` (:class:`ExchangeTruth`: expected
  text ``answer``, expected output ``image`` key, the dataset's ``instruction``/``question``, and ``world``: the
  record's world-specific ground truth, e.g. a ShapesChat task as JSON)
  and ``ops`` (the operations that wrote the texts).

Example:
    >>> import torch
    >>> d = DialogueDraft(id="d0", index=0, seed=0)
    >>> k = d.add_image(ImageRef.from_tensor(torch.zeros(3, 8, 8, dtype=torch.uint8)), origin_role="generated")
    >>> d.exchanges.append(Exchange(task=Task.GENERATE, query="Draw a black square.", reply_image=k))
    >>> sample = d.finalize()
    >>> sample.dialogue.turns[1].meta["tags"]["output"]
    'image'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, Segment, TextSegment, Turn
from chatumm_kit.data.droppable import DroppablePolicy, mark_droppable
from chatumm_kit.synth.records import ImageRef
from chatumm_kit.synth.taxonomy import InputModality, OutputModality, Task, TurnTags

__all__ = [
    "DropDialogue",
    "ImageLink",
    "ExchangeTruth",
    "ExchangeMeta",
    "ImageMeta",
    "DialogueMeta",
    "Exchange",
    "ImageEntry",
    "DialogueDraft",
]


class DropDialogue(Exception):
    """Raised by a stage to drop the current dialogue; ``reason`` is recorded in the report."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class ImageLink:
    image: str
    origin: int
    distance: int

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "origin": self.origin, "distance": self.distance}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageLink:
        return cls(image=str(d["image"]), origin=int(d["origin"]), distance=int(d["distance"]))


@dataclass
class ExchangeTruth:
    """Ground truth of one exchange: the expected ``answer`` text and/or output ``image`` key; the dataset's
    ``instruction`` (edit instruction or caption) and ``question``; ``world``: the source record's world-specific
    ground truth (ShapesChat: the task's ``to_dict()`` — scenes, edit operation, question kind and subject)."""

    answer: str | None = None
    image: str | None = None
    instruction: str | None = None
    question: str | None = None
    world: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(
            {
                "answer": self.answer,
                "image": self.image,
                "instruction": self.instruction,
                "question": self.question,
                "world": self.world,
            }
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExchangeTruth:
        return cls(**{k: d.get(k) for k in ("answer", "image", "instruction", "question", "world")})


@dataclass
class ExchangeMeta:
    exchange: int
    tags: TurnTags
    record: str | None = None
    distractor: bool = False
    refers_to: ImageLink | None = None
    truth: ExchangeTruth = field(default_factory=ExchangeTruth)
    ops: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(
            {
                "exchange": self.exchange,
                "tags": self.tags.to_dict(),
                "record": self.record,
                "distractor": self.distractor,
                "refers_to": self.refers_to.to_dict() if self.refers_to else None,
                "truth": self.truth.to_dict(),
                "ops": list(self.ops),
            }
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExchangeMeta:
        return cls(
            exchange=int(d["exchange"]),
            tags=TurnTags.from_dict(d["tags"]),
            record=d.get("record"),
            distractor=bool(d.get("distractor", False)),
            refers_to=ImageLink.from_dict(d["refers_to"]) if d.get("refers_to") else None,
            truth=ExchangeTruth.from_dict(d.get("truth", {})),
            ops=list(d.get("ops", [])),
        )


@dataclass
class ImageMeta:
    origin: int
    role: Literal["uploaded", "generated"]
    record: str | None = None
    description: str | None = None
    truth: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(
            {
                "origin": self.origin,
                "role": self.role,
                "record": self.record,
                "description": self.description,
                "truth": self.truth,
            }
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageMeta:
        return cls(
            origin=int(d["origin"]),
            role=d["role"],
            record=d.get("record"),
            description=d.get("description"),
            truth=d.get("truth"),
        )


@dataclass
class DialogueMeta:
    index: int
    seed: int
    stages: list[str] = field(default_factory=list)
    distractors: int = 0
    interleaved: bool = False
    images: dict[str, ImageMeta] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "seed": self.seed,
            "stages": list(self.stages),
            "distractors": self.distractors,
            "interleaved": self.interleaved,
            "images": {k: v.to_dict() for k, v in self.images.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DialogueMeta:
        return cls(
            index=int(d["index"]),
            seed=int(d["seed"]),
            stages=list(d.get("stages", [])),
            distractors=int(d.get("distractors", 0)),
            interleaved=bool(d.get("interleaved", False)),
            images={k: ImageMeta.from_dict(v) for k, v in d.get("images", {}).items()},
        )


@dataclass
class Exchange:
    """One user turn and the assistant's reply, in structured form.

    Attributes:
        task: what the user asks for.
        query: the user's text.
        user_images: keys of images the user attaches in this turn.
        reply_text, reply_image: the assistant's text and/or image key (an interleaved reply has both: image first).
        refers_to: key of an earlier image this turn acts on without re-attaching it.
        distractor: inserted by the long-range stage, unrelated to the rest.
        record: id of the dataset record this exchange came from.
        truth: ground truth for evaluation.
        ops: names of the operations that wrote the texts (provenance).
    """

    task: Task
    query: str
    user_images: list[str] = field(default_factory=list)
    reply_text: str | None = None
    reply_image: str | None = None
    refers_to: str | None = None
    distractor: bool = False
    record: str | None = None
    truth: ExchangeTruth = field(default_factory=ExchangeTruth)
    ops: list[str] = field(default_factory=list)

    @property
    def touched(self) -> list[str]:
        """Images this exchange shows or acts on."""
        keys = [*self.user_images]
        if self.refers_to:
            keys.append(self.refers_to)
        if self.reply_image:
            keys.append(self.reply_image)
        return keys

    @property
    def focus(self) -> str | None:
        """The image a follow-up "it" would mean: the reply image, else the last image this exchange touched."""
        return self.reply_image or (self.touched[-1] if self.touched else None)

    @property
    def output(self) -> OutputModality:
        if self.reply_image and self.reply_text:
            return OutputModality.INTERLEAVED
        return OutputModality.IMAGE if self.reply_image else OutputModality.TEXT


@dataclass
class ImageEntry:
    ref: ImageRef
    role: Literal["uploaded", "generated"]
    record: str | None = None
    description: str | None = None


@dataclass
class DialogueDraft:
    """A dialogue being synthesized. ``index``/``seed`` identify the candidate; ``stages`` lists what ran."""

    id: str
    index: int
    seed: int
    exchanges: list[Exchange] = field(default_factory=list)
    images: dict[str, ImageEntry] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)
    distractors: int = 0
    interleaved: bool = False

    def add_image(
        self,
        ref: ImageRef,
        *,
        origin_role: Literal["uploaded", "generated"],
        record: str | None = None,
        description: str | None = None,
    ) -> str:
        """Register a picture; returns its dialogue-local key (``img<n>``)."""
        key = f"img{len(self.images)}"
        self.images[key] = ImageEntry(ref=ref, role=origin_role, record=record, description=description)
        return key

    # ------------------------------------------------------------------ positions
    def origin(self, key: str) -> int:
        """Index of the first exchange that shows image ``key``."""
        for i, ex in enumerate(self.exchanges):
            if key in ex.user_images or key == ex.reply_image:
                return i
        raise KeyError(f"draft {self.id!r}: image {key!r} appears in no exchange")

    def distance(self, j: int) -> int | None:
        """Exchanges between exchange ``j`` and the last earlier one touching the image it refers to."""
        ref = self.exchanges[j].refers_to
        if ref is None:
            return None
        for i in range(j - 1, -1, -1):
            if ref in self.exchanges[i].touched:
                return j - i - 1
        raise KeyError(f"draft {self.id!r}: exchange {j} refers to {ref!r}, which no earlier exchange shows")

    def tags(self, j: int) -> TurnTags:
        ex = self.exchanges[j]
        return TurnTags(
            task=ex.task,
            input=InputModality.from_count(len(ex.user_images)),
            output=ex.output,
            distance=self.distance(j),
        )

    def all_tags(self) -> list[TurnTags]:
        return [self.tags(j) for j in range(len(self.exchanges))]

    def history_keys(self, j: int) -> list[str]:
        """Image keys shown before exchange ``j``, in order of first appearance."""
        seen: dict[str, None] = {}
        for ex in self.exchanges[:j]:
            for k in ex.touched:
                seen.setdefault(k, None)
        return list(seen)

    # ------------------------------------------------------------------ output
    def finalize(self) -> DialogueSample:
        """The dialogue with its pixels and metadata (see the module docstring for the schema).

        Image keys are renumbered ``img0, img1, ...`` in order of appearance (stages may have inserted pictures).
        """
        order: dict[str, None] = {}
        for ex in self.exchanges:
            for k in [*ex.user_images, *([ex.reply_image] if ex.reply_image else [])]:
                order.setdefault(k, None)
        name = {k: f"img{i}" for i, k in enumerate(order)}
        turns: list[Turn] = []
        for j, ex in enumerate(self.exchanges):
            tags = self.tags(j)
            user: list[Segment] = [ImageSegment(image=name[k]) for k in ex.user_images]
            user.append(TextSegment(text=ex.query))
            reply: list[Segment] = []
            if ex.reply_image:
                reply.append(ImageSegment(image=name[ex.reply_image]))
            if ex.reply_text:
                reply.append(TextSegment(text=ex.reply_text))
            link = None
            if ex.refers_to is not None:
                link = ImageLink(
                    image=name[ex.refers_to], origin=self.origin(ex.refers_to), distance=tags.distance or 0
                )
            truth = dataclasses.replace(ex.truth, image=name[ex.truth.image] if ex.truth.image else None)
            meta = ExchangeMeta(
                exchange=j,
                tags=tags,
                record=ex.record,
                distractor=ex.distractor,
                refers_to=link,
                truth=truth,
                ops=list(ex.ops),
            )
            turns.append(Turn(role=Role.USER, segments=user, meta={"exchange": j, "tags": tags.to_dict()}))
            turns.append(Turn(role=Role.ASSISTANT, segments=reply, meta=meta.to_dict()))
        images_meta = {
            name[k]: ImageMeta(
                origin=self.origin(k),
                role=self.images[k].role,
                record=self.images[k].record,
                description=self.images[k].description,
                truth=self.images[k].ref.truth,
            )
            for k in order
        }
        meta = DialogueMeta(
            index=self.index,
            seed=self.seed,
            stages=list(self.stages),
            distractors=self.distractors,
            interleaved=self.interleaved,
            images=images_meta,
        )
        # CFG condition dropout only where the reply is a generated image (SPEC §4; the rule: data/droppable.py).
        dialogue = mark_droppable(Dialogue(id=self.id, turns=turns, meta=meta.to_dict()), DroppablePolicy.IMAGE_REPLIES)
        sample = DialogueSample(
            dialogue=dialogue, images={name[k]: self.images[k].ref.tensor() for k in order}, key=self.id
        )
        sample.validate()
        return sample
