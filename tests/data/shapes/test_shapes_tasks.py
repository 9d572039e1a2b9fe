"""Single-turn tasks: exact ground truth, valid edits, answers that agree with the detector, varied phrasing."""

import json
import random
import re
from collections import Counter

import pytest

from chatumm_kit.data.shapes import (
    VQA,
    EditOp,
    ObjectQuery,
    QuestionKind,
    Scene,
    ShapeObject,
    WorldConfig,
    answer_question,
    describe,
    detect,
    detect_batch,
    distinguishing_query,
    normalise_answer,
    parse_caption,
    phrasing,
    render,
    render_batch,
    sample_caption,
    sample_edit,
    sample_text_to_image,
    sample_vqa,
    valid_edit_ops,
)

CFG = WorldConfig()


def o(shape="circle", colour="red", size="small", cell=0):
    return ShapeObject(shape=shape, colour=colour, size=size, cell=cell)


def template_of(text, templates):
    """Index of the template that produced ``text`` (placeholders → wildcards)."""
    hits = []
    for i, t in enumerate(templates):
        pattern = "".join(".+" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{\w+\})", t))
        if re.fullmatch(pattern, text):
            hits.append(i)
    assert len(hits) == 1, (text, hits)
    return hits[0]


def test_every_task_has_at_least_four_templates():
    assert len(phrasing.TEXT_TO_IMAGE) >= 4 and len(phrasing.CAPTION) >= 4 and len(phrasing.REFER) >= 4
    assert set(phrasing.EDIT) == {op.value for op in EditOp}
    assert set(phrasing.VQA) == {k.value for k in QuestionKind}
    assert all(len(t) >= 4 for t in [*phrasing.EDIT.values(), *phrasing.VQA.values()])


def test_samplers_are_deterministic_given_the_seed():
    def draw(seed):
        rng = random.Random(seed)
        return [
            f(rng).to_dict() for _ in range(30) for f in (sample_text_to_image, sample_edit, sample_vqa, sample_caption)
        ]

    assert draw(5) == draw(5) and draw(5) != draw(6)
    json.dumps(draw(5))  # JSON-able ground truth


def test_text_to_image_prompt_parses_back_to_its_target():
    rng = random.Random(0)
    used = Counter()
    for _ in range(300):
        t = sample_text_to_image(rng)
        assert parse_caption(t.prompt) == t.target and t.caption == describe(t.target)
        used[template_of(t.prompt, phrasing.TEXT_TO_IMAGE)] += 1
    assert len(used) == len(phrasing.TEXT_TO_IMAGE)  # every phrasing occurs


def test_caption_task():
    rng = random.Random(1)
    used = set()
    for _ in range(200):
        c = sample_caption(rng)
        assert parse_caption(c.caption) == c.scene and c.prompt in phrasing.CAPTION
        used.add(c.prompt)
    assert used == set(phrasing.CAPTION)
    assert detect(render(c.scene, CFG), CFG) == c.scene


def changed(before: ShapeObject, after: ShapeObject) -> set[str]:
    return {k for k in ("shape", "colour", "size", "cell") if getattr(before, k) != getattr(after, k)}


EDITED_ATTR = {EditOp.RECOLOUR: "colour", EditOp.MOVE: "cell", EditOp.RESIZE: "size", EditOp.RESHAPE: "shape"}


@pytest.mark.parametrize("op", list(EditOp))
def test_edit_ground_truth(op):
    rng = random.Random(list(EditOp).index(op))
    edits = [sample_edit(rng, operation=op) for _ in range(200)]
    # the target is exactly what the detector reads back from its render
    assert detect_batch(render_batch([e.target for e in edits], CFG), CFG) == [e.target for e in edits]
    used = set()
    for e in edits:
        assert e.operation is op
        used.add(template_of(e.instruction, phrasing.EDIT[op.value]))
        src, tgt = e.source, e.target
        if op is EditOp.ADD:
            assert len(src) < CFG.max_objects and len(tgt) == len(src) + 1 and e.subject is None
            assert e.result.cell not in src.cells and set(src.objects) < set(tgt.objects)
            assert f"{e.result.size} {e.result.colour} {e.result.shape}" in e.instruction
            continue
        # the instruction names the subject unambiguously
        ref = distinguishing_query(e.subject, src)
        assert ref.phrase() in e.instruction and ref.select(src) == [e.subject]
        if op is EditOp.REMOVE:
            assert len(src) == 2 and tgt.objects == tuple(x for x in src.objects if x != e.subject)
            continue
        # exactly one attribute of exactly one object changed; everything else untouched
        assert len(tgt) == len(src) and changed(e.subject, e.result) == {EDITED_ATTR[op]}
        assert set(src.objects) - set(tgt.objects) == {e.subject}
        assert set(tgt.objects) - set(src.objects) == {e.result}
        if op is EditOp.MOVE:
            assert e.result.cell not in src.cells
    assert len(used) >= 4


def test_edit_validity():
    full = Scene(objects=(o(cell=0), o(cell=1)))
    single = Scene(objects=(o(cell=0),))
    assert EditOp.ADD not in valid_edit_ops(full) and EditOp.REMOVE in valid_edit_ops(full)
    assert EditOp.ADD in valid_edit_ops(single) and EditOp.REMOVE not in valid_edit_ops(single)
    with pytest.raises(ValueError, match="add is not valid"):
        sample_edit(random.Random(0), source=full, operation="add")
    with pytest.raises(ValueError, match="remove is not valid"):
        sample_edit(random.Random(0), source=single, operation=EditOp.REMOVE)
    ops = Counter(sample_edit(random.Random(i)).operation for i in range(600))
    assert set(ops) == set(EditOp)


def test_vqa_answers_agree_with_the_detected_scene():
    rng = random.Random(3)
    items = [sample_vqa(rng) for _ in range(600)]
    detected = detect_batch(render_batch([v.scene for v in items], CFG), CFG)
    kinds = Counter()
    used = {k: set() for k in QuestionKind}
    for v, seen in zip(items, detected):
        assert answer_question(seen, kind=v.kind, subject=v.subject) == v.answer
        assert v.check(v.answer) and v.check(f"It is {v.answer}.")
        kinds[v.kind] += 1
        used[v.kind].add(template_of(v.question, phrasing.VQA[v.kind.value]))
        if v.kind is not QuestionKind.COUNT:
            assert len(v.subject.select(v.scene)) == 1  # the question is unambiguous
    assert set(kinds) == set(QuestionKind) and min(kinds.values()) > 80
    assert all(len(u) == 4 for u in used.values())
    answers = {k: {v.answer for v in items if v.kind is k} for k in QuestionKind}
    assert answers[QuestionKind.COLOUR] == set(CFG.colours) and answers[QuestionKind.SHAPE] == set(CFG.shapes)
    assert answers[QuestionKind.COUNT] == {"0", "1", "2"} and "top left" in answers[QuestionKind.POSITION]


def test_vqa_examples_and_ambiguity():
    s = Scene(objects=(o(cell=0), o(size="large", cell=8)))
    v = sample_vqa(random.Random(0), scene=s, kind="position")
    assert v.question.endswith("?") or v.question.endswith(".")
    assert v.subject.size is not None and v.answer in {"top left", "bottom right"}  # size needed to tell them apart
    twins = Scene(objects=(o(cell=0), o(cell=8)))
    with pytest.raises(ValueError, match="position question is ambiguous"):
        sample_vqa(random.Random(0), scene=twins, kind=QuestionKind.POSITION)
    assert {sample_vqa(random.Random(i), scene=twins).kind for i in range(50)} == {
        QuestionKind.COLOUR,
        QuestionKind.SHAPE,
        QuestionKind.COUNT,
    }
    assert answer_question(twins, kind="colour", subject=ObjectQuery(shape="circle")) is None
    assert answer_question(twins, kind="count", subject=ObjectQuery(colour="red")) == "2"
    assert answer_question(twins, kind="position", subject=ObjectQuery(cell=8)) == "bottom right"


def test_normalise_answer():
    cases = {
        "Red.": "red",
        "It is a circle!": "circle",
        "two": "2",
        "There are 2 objects.": "2",
        "zero red shapes": "0",
        "In the upper left.": "top left",
        "centre": "center",
        "the top middle": "top center",
    }
    assert {k: normalise_answer(k) for k in cases} == cases
    v = VQA(
        scene=Scene(),
        question="How many objects are there?",
        answer="0",
        kind=QuestionKind.COUNT,
        subject=ObjectQuery(),
    )
    assert v.check("None") is False and v.check("zero") is True
