"""Where a model loses its ShapesChat edits: each edited picture split into what it changed and what it kept.

An edit turn asks for one change to a picture the conversation holds (ShapesChat's six operations: recolour, move,
resize, reshape, add, remove). The benchmark scores the reply against the target scene; when it is wrong, that
score does not say *why*. This module reads a benchmark report (``eval_report.json``, whose turns record the scene
detected in each reply) beside the held-out dialogues it was run on (their synthesis metadata record each edit's
source scene, subject, result and operation) and classifies every teacher-forced edit reply:

* ``picture`` — the reply holds a picture whose scene the detector reads;
* ``exact`` — it is the target scene;
* ``applied`` — the change is made: the cells the edit touches (the subject's and the result's) hold what the target
  holds there (the result object; for ``remove``, nothing);
* ``kept`` — the rest of the source is untouched: every other cell holds what the source holds there;
* ``copied`` — the picture is the source scene itself (the change ignored, everything kept);
* ``other_picture`` — the picture is closer (attribute accuracy, :func:`~chatumm_kit.data.shapes.score`) to another
  picture of the conversation than to both the source and the target: the model edited, or copied, the wrong one.

``exact`` is ``applied and kept``. Each rate comes with its count and a Wilson 95 % interval (edits of one dialogue
are few and act on different pictures, so turns are taken as independent).

Example:
    >>> diagnosis = diagnose_report(report, samples, model="multi_turn")   # doctest: +SKIP
    >>> print(diagnosis.table())                                           # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from chatumm_kit.data.dialogue import DialogueSample, Role
from chatumm_kit.data.shapes import Scene, ShapeObject, WorldConfig, parse_caption, score
from chatumm_kit.eval.intervals import Interval, wilson

__all__ = ["EditTruth", "EditCase", "EditDiagnosis", "edit_truths", "diagnose_edit", "diagnose_report", "RATES"]

RATES = ("picture", "exact", "applied", "kept", "copied", "other_picture")
"""The per-case booleans a diagnosis reports as rates, in table order."""


@dataclass(frozen=True, kw_only=True)
class EditTruth:
    """What one edit turn asked for (from the synthesis metadata of its assistant turn).

    Attributes:
        dialogue_id, index: the dialogue and the exchange (0 = first assistant turn), as in the report's turns.
        operation: ``recolour`` / ``move`` / ``resize`` / ``reshape`` / ``add`` / ``remove``.
        distance: the turn's history distance (None: the picture comes with the user turn).
        source, target: the scenes before and after the edit.
        subject: the object changed (None for ``add``); result: what it becomes (None for ``remove``).
        others: the scenes of the conversation's other pictures at that point (neither source nor target).
    """

    dialogue_id: str
    index: int
    operation: str
    distance: int | None
    source: Scene
    target: Scene
    subject: ShapeObject | None
    result: ShapeObject | None
    others: tuple[Scene, ...]


@dataclass(frozen=True, kw_only=True)
class EditCase:
    """One edit reply, classified (see the module docstring for each flag)."""

    dialogue_id: str
    index: int
    operation: str
    distance: int | None
    picture: bool
    exact: bool
    applied: bool
    kept: bool
    copied: bool
    other_picture: bool


def _object(data: Mapping[str, Any] | None) -> ShapeObject | None:
    return None if data is None else ShapeObject(**{k: data[k] for k in ("shape", "colour", "size", "cell")})


def edit_truths(sample: DialogueSample) -> list[EditTruth]:
    """The edit turns of a synthesised dialogue, in order.

    Raises:
        ValueError: naming the dialogue and turn, for an edit turn whose metadata lacks the edit's world record
            (``truth.world`` with ``operation``, ``source`` and ``target``): not a ShapesChat dialogue.
    """
    d = sample.dialogue
    images: Mapping[str, Any] = d.meta.get("images") or {}
    out: list[EditTruth] = []
    exchange = -1
    for i, turn in enumerate(d.turns):
        if turn.role is not Role.ASSISTANT:
            continue
        exchange += 1
        tags = turn.meta.get("tags") or {}
        if tags.get("task") != "edit":
            continue
        world = (turn.meta.get("truth") or {}).get("world")
        if not isinstance(world, Mapping) or not {"operation", "source", "target"} <= world.keys():
            raise ValueError(
                f"dialogue {d.id!r} turn {i}: an edit turn without its world record (truth.world with operation, "
                "source and target); edits are diagnosed on dialogues synthesised from ShapesChat"
            )
        source, target = Scene.from_dict(world["source"]), Scene.from_dict(world["target"])
        others = []
        for record in images.values():
            if not isinstance(record, Mapping):
                continue
            scene, origin = (record.get("truth") or {}).get("scene"), record.get("origin")
            # shown before this exchange, or sent with its request
            seen = origin is not None and (
                origin < exchange or (origin == exchange and record.get("role") == "uploaded")
            )
            if scene is not None and seen:
                found = Scene.from_dict(scene)
                if found not in (source, target):
                    others.append(found)
        distance = tags.get("distance")
        out.append(
            EditTruth(
                dialogue_id=d.id,
                index=exchange,
                operation=str(world["operation"]),
                distance=None if distance is None else int(distance),
                source=source,
                target=target,
                subject=_object(world.get("subject")),
                result=_object(world.get("result")),
                others=tuple(others),
            )
        )
    return out


def diagnose_edit(detected: Scene | None, truth: EditTruth) -> EditCase:
    """Classify one reply's detected scene (None: no picture, or one the detector could not read) against its edit.

    Example:
        >>> red = ShapeObject(shape="circle", colour="red", size="small", cell=0)
        >>> blue = red.replace(colour="blue")
        >>> truth = EditTruth(dialogue_id="d", index=1, operation="recolour", distance=0,
        ...                   source=Scene(objects=(red,)), target=Scene(objects=(blue,)),
        ...                   subject=red, result=blue, others=())
        >>> case = diagnose_edit(Scene(objects=(red,)), truth)
        >>> (case.exact, case.applied, case.kept, case.copied)
        (False, False, True, True)
    """
    where = dict(dialogue_id=truth.dialogue_id, index=truth.index, operation=truth.operation, distance=truth.distance)
    if detected is None:
        return EditCase(**where, **dict.fromkeys(RATES, False))
    # The cells the edit touches: the subject's and the result's (one cell, or two for a move). The edit is applied
    # when the picture holds the target there, and the rest is kept when it holds the source everywhere else; so
    # ``exact`` is exactly ``applied and kept``.
    touched = {o.cell for o in (truth.subject, truth.result) if o is not None}

    def inside(scene: Scene) -> set[ShapeObject]:
        return {o for o in scene.objects if o.cell in touched}

    def outside(scene: Scene) -> set[ShapeObject]:
        return {o for o in scene.objects if o.cell not in touched}

    applied = inside(detected) == inside(truth.target)
    kept = outside(detected) == outside(truth.source)
    accuracy = score(detected, truth.source).accuracy, score(detected, truth.target).accuracy
    other = max((score(detected, s).accuracy for s in truth.others), default=-1.0)
    return EditCase(
        **where,
        picture=True,
        exact=detected == truth.target,
        applied=applied,
        kept=kept,
        copied=detected == truth.source,
        other_picture=other > max(accuracy),
    )


@dataclass(frozen=True, kw_only=True)
class EditDiagnosis:
    """The classified edit replies of one model, with their rates.

    Attributes:
        model: the model's name in the report.
        cases: one :class:`EditCase` per teacher-forced edit turn of the report.
    """

    model: str
    cases: tuple[EditCase, ...]

    def rate(self, flag: str, *, operation: str | None = None) -> tuple[int, int, Interval | None]:
        """``(cases with the flag, cases, Wilson 95 % interval)``, over all cases or one operation's."""
        if flag not in RATES:
            raise ValueError(f"EditDiagnosis.rate: unknown flag {flag!r} (one of {RATES})")
        chosen = [c for c in self.cases if operation is None or c.operation == operation]
        k = sum(getattr(c, flag) for c in chosen)
        return k, len(chosen), wilson(k, len(chosen))

    @property
    def operations(self) -> list[str]:
        return sorted({c.operation for c in self.cases})

    def to_dict(self) -> dict[str, Any]:
        """Rates (``k``, ``n``, ``rate``, ``ci95``) over all edits and per operation, JSON-able."""

        def cell(flag: str, operation: str | None) -> dict[str, Any]:
            k, n, ci = self.rate(flag, operation=operation)
            return {"k": k, "n": n, "rate": None if n == 0 else round(k / n, 6), "ci95": ci and ci.to_list()}

        return {
            "model": self.model,
            "edits": len(self.cases),
            "all": {flag: cell(flag, None) for flag in RATES},
            "by_operation": {op: {flag: cell(flag, op) for flag in RATES} for op in self.operations},
        }

    def table(self) -> str:
        """A plain-text table: one row per operation and one for all edits, each rate with its interval."""
        head = f"{'edits of ' + self.model:<24} {'n':>4} " + " ".join(f"{f:>19}" for f in RATES)
        rows = [head, "-" * len(head)]
        for op in [*self.operations, None]:
            cells = []
            for flag in RATES:
                k, n, ci = self.rate(flag, operation=op)
                cells.append(f"{k / n:.3f} [{ci.low:.2f}, {ci.high:.2f}]" if n and ci else "-")
            n = self.rate("picture", operation=op)[1]
            rows.append(f"{op or 'all':<24} {n:>4} " + " ".join(f"{c:>19}" for c in cells))
        return "\n".join(rows)


def diagnose_report(
    report: Mapping[str, Any], samples: Iterable[DialogueSample], *, model: str, world: WorldConfig | None = None
) -> EditDiagnosis:
    """Classify every teacher-forced edit reply of ``model`` in a benchmark report (its ``eval_report.json``, read as
    a dict) against the dialogues it was run on (``samples``; dialogues the report did not use are ignored).

    Raises:
        KeyError: the report has no such model (the message lists those it has).
        ValueError: an edit turn of the report whose dialogue is not among ``samples``.
    """
    models = report.get("models") or {}
    if model not in models:
        raise KeyError(f"diagnose_report: the report has no model {model!r} (it has {sorted(models)})")
    turns = [t for t in models[model].get("turns") or [] if t.get("task") == "edit"]
    wanted = {t["dialogue_id"] for t in turns}
    truths = {(e.dialogue_id, e.index): e for s in samples if s.dialogue.id in wanted for e in edit_truths(s)}
    cases = []
    for t in turns:
        truth = truths.get((t["dialogue_id"], t["index"]))
        if truth is None:
            raise ValueError(
                f"diagnose_report: edit turn {t['index']} of dialogue {t['dialogue_id']!r} is not in the given "
                "dialogues (pass the shards the report was run on)"
            )
        detected = t.get("detected")
        cases.append(diagnose_edit(None if not detected else parse_caption(detected, world), truth))
    return EditDiagnosis(model=model, cases=tuple(cases))
