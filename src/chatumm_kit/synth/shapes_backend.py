"""A deterministic rule-based backend that answers every atomic operation for the ShapesChat world.

Each rule reads the operation's input — the ground truth the ShapesChat pool attaches (scenes, edits, questions) —
and writes the answer an LLM would, as the same JSON text, from :class:`~.shapes_phrasing.ShapesPhrasing`
templates. The answer then goes through the operation's own parser and validator like any LLM answer, so tests of
the pipeline exercise the real code path, and the dialogues it makes are exactly verifiable.

The template choice is seeded by (operation, input, attempt): the same call always gets the same answer, and a retry
gets a different one — for ``query2dep_q`` a retry also names the picture by its full description instead of the
shortest distinguishing phrase. A call it cannot answer truthfully (two identical pictures in the history) gets a
refusal, which the operation records and the pipeline turns into a dropped dialogue.

Add rules for your own operations with :meth:`ShapesRuleBackend.register_rule`.

Example:
    >>> from chatumm_kit.synth.ops import Caption2QueryIn
    >>> from chatumm_kit.synth.runner import OpRunner
    >>> runner = OpRunner(backend=ShapesRuleBackend())
    >>> runner.run("caption2query", Caption2QueryIn(caption="A small red circle in the top left.")).query.endswith(
    ...     ("top left.", "top left?"))
    True
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from typing import Any

from chatumm_kit.data.shapes import Scene, WorldConfig, describe_objects, parse_caption, refer_to, sample_vqa
from chatumm_kit.data.shapes import phrasing as world_phrasing
from chatumm_kit.synth.cache import canonical_json
from chatumm_kit.synth.ops import (
    BackendError,
    Caption2QueryIn,
    CaptionRequestIn,
    ChatMessage,
    Edit2QueryIn,
    Image2QAIn,
    MakeDistractorIn,
    Operation,
    Query2DepQIn,
    Vqa2QueryIn,
)
from chatumm_kit.synth.shapes_phrasing import ShapesPhrasing, lower_first

__all__ = ["ShapesRuleBackend", "Rule"]

Rule = Callable[[Any, random.Random, int], dict[str, str]]
_REFUSE = "I'm sorry, I cannot tell those pictures apart."


class ShapesRuleBackend:
    """Rule-based answers for ``caption2query``, ``edit2query``, ``vqa2query``, ``caption_request``,
    ``query2dep_q``, ``make_distractor`` and ``image2qa`` in the ShapesChat world.

    Args:
        world: the world (positions, vocabulary); default :class:`WorldConfig`.
        phrasing: the template split; default the training split.
    """

    def __init__(self, *, world: WorldConfig | None = None, phrasing: ShapesPhrasing | None = None) -> None:
        self.world = world or WorldConfig()
        self.phrasing = phrasing or ShapesPhrasing()
        self.rules: dict[str, Rule] = {
            "caption2query": self._caption2query,
            "edit2query": self._edit2query,
            "vqa2query": self._vqa2query,
            "caption_request": self._caption_request,
            "query2dep_q": self._query2dep_q,
            "make_distractor": self._make_distractor,
            "image2qa": self._image2qa,
        }

    @property
    def model_id(self) -> str:
        p = self.phrasing
        return f"shapes-rules/v1/{p.split}/{p.seed}/{p.heldout_fraction}"

    def register_rule(self, name: str, rule: Rule) -> None:
        """Answer operation ``name`` with ``rule(inputs, rng, attempt) -> dict of output fields``."""
        self.rules[name] = rule

    def answer(self, op: Operation, inputs: Any, *, attempt: int, feedback: Sequence[ChatMessage]) -> str:
        rule = self.rules.get(op.name)
        if rule is None:
            raise BackendError(f"ShapesRuleBackend has no rule for operation {op.name!r}", stop_run=False)
        rng = random.Random(f"{op.name}:{canonical_json(op.cache_inputs(inputs))}:{attempt}")
        out = rule(inputs, rng, attempt)
        return out if isinstance(out, str) else json.dumps(out)

    # ------------------------------------------------------------------ rules
    def _scene(self, data: dict | None, *, where: str) -> Scene:
        if not data:
            raise BackendError(f"ShapesRuleBackend.{where}: the input carries no ShapesChat scene", stop_run=False)
        return Scene.from_dict(data)

    def _caption2query(self, inp: Caption2QueryIn, rng: random.Random, attempt: int) -> dict[str, str]:
        truth = inp.truth or {}
        scene = Scene.from_dict(truth["target"]) if "target" in truth else parse_caption(inp.caption, self.world)
        if scene is None:
            raise BackendError(f"ShapesRuleBackend: cannot read a scene from caption {inp.caption!r}", stop_run=False)
        desc = describe_objects(scene, self.world)
        return {"query": self.phrasing.pick(rng, "t2i").format(desc=desc)}

    def _edit2query(self, inp: Edit2QueryIn, rng: random.Random, attempt: int) -> dict[str, str]:
        return {"query": self.phrasing.wrap(rng, f"ctx.edit.{inp.context}", inp.instruction)}

    def _vqa2query(self, inp: Vqa2QueryIn, rng: random.Random, attempt: int) -> dict[str, str]:
        return {"query": self.phrasing.wrap(rng, f"ctx.ask.{inp.context}", inp.question)}

    def _caption_request(self, inp: CaptionRequestIn, rng: random.Random, attempt: int) -> dict[str, str]:
        return {"query": self.phrasing.pick(rng, "caption" if inp.context == "uploaded" else "caption.previous")}

    def _query2dep_q(self, inp: Query2DepQIn, rng: random.Random, attempt: int) -> dict[str, str] | str:
        truth = inp.truth or {}
        target = self._scene((truth.get("target") or {}).get("scene"), where="query2dep_q")
        others = [Scene.from_dict(o["scene"]) for o in truth.get("others", []) if o and "scene" in o]
        if any(o == target for o in others):
            return _REFUSE
        if attempt == 0:  # the shortest distinguishing phrase, without the template (we pick our own split's)
            phrase = refer_to(target, others, config=self.world)
            head = world_phrasing.REFER[0].split("{np}")[0]
            np = phrase[len(head) :] if phrase.startswith(head) else phrase
        else:  # a retry names everything in the picture
            np = "only " + describe_objects(target, self.world) if others else describe_objects(target, self.world)
        ref = self.phrasing.refer(rng, np)
        task = truth.get("task", "edit")
        if task == "edit":
            text = truth.get("instruction") or inp.query
        elif task == "understand":
            text = truth.get("question") or inp.query
        else:
            text = inp.query
        family = {"edit": "dep.edit", "understand": "dep.understand"}.get(task, "dep.caption")
        return {"query": self.phrasing.pick(rng, family).format(ref=ref, text=text, lc=lower_first(text))}

    def _make_distractor(self, inp: MakeDistractorIn, rng: random.Random, attempt: int) -> dict[str, str]:
        q, a = self.phrasing.distractor(rng)
        return {"question": q, "answer": a}

    def _image2qa(self, inp: Image2QAIn, rng: random.Random, attempt: int) -> dict[str, str]:
        scene = self._scene((inp.truth or {}).get("scene"), where="image2qa")
        vqa = sample_vqa(rng, config=self.world, scene=scene)
        return {"question": self.phrasing.question_text(vqa, rng, self.world, family="qa"), "answer": vqa.answer}
