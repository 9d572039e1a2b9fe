"""ShapesChat dialogues from the rule backend are exactly verifiable against the world's renderer and detector."""

from __future__ import annotations

import random
import re

import pytest

from chatumm_kit.data.shapes import (
    Scene,
    ShapeObject,
    WorldConfig,
    answer_question,
    describe,
    detect,
    normalise_answer,
    position_name,
)
from chatumm_kit.data.shapes.language import ObjectQuery
from chatumm_kit.data.shards import read_samples
from chatumm_kit.synth import (
    ChainStage,
    DistractorStage,
    InterleaveStage,
    ShapesPhrasing,
    ShapesPool,
    ShapesRuleBackend,
    SynthPipeline,
)
from chatumm_kit.synth.ops import content_words
from chatumm_kit.synth.shapes_phrasing import DISTRACTORS, FAMILIES

CFG = WorldConfig()


def run(out, *, phrasing=None, seeds=(0, 1_000_000), n=120, k=(0, 1, 2, 4, 8)):
    phrasing = phrasing or ShapesPhrasing()
    return SynthPipeline(
        pool=ShapesPool(world=CFG, phrasing=phrasing, seeds=seeds),
        backend=ShapesRuleBackend(world=CFG, phrasing=phrasing),
        stages=[ChainStage(turns=[2, 4]), DistractorStage(k=list(k)), InterleaveStage(p=0.7)],
        output_dir=out,
        num_dialogues=n,
        shard_size=40,
        use_cache=False,
        report_png=False,
        progress=False,
    ).run()


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "out"
    report = run(out)
    return report, list(read_samples(out))


def _obj(d):
    return ShapeObject(**d) if d else None


def _apply(truth: dict) -> Scene:
    """The edit's effect, recomputed from its parts (not copied from its target)."""
    src = Scene.from_dict(truth["source"])
    subject, result = _obj(truth["subject"]), _obj(truth["result"])
    if subject is None:
        return src.with_object(result)
    return src.without(subject.cell) if result is None else src.replace_object(subject.cell, result)


def test_every_dependent_turn_agrees_with_renderer_and_detector(dialogues):
    report, samples = dialogues
    assert len(samples) == 120 and report.written == 120
    checked = {"edit": 0, "understand": 0, "caption": 0}
    distances = set()
    for s in samples:
        meta = s.dialogue.meta
        scenes = {}
        for key, img in s.images.items():  # every picture is the render of the scene it claims
            scenes[key] = Scene.from_dict(meta["images"][key]["truth"]["scene"])
            assert detect(img, CFG) == scenes[key]
        turns = s.dialogue.turns
        shown: list[set[str]] = []  # image keys each exchange touches
        for j, (u, a) in enumerate(zip(turns[::2], turns[1::2])):
            ref = a.meta.get("refers_to")
            touched = set(u.image_keys) | set(a.image_keys) | ({ref["image"]} if ref else set())
            shown.append(touched)
            if not ref:
                continue
            task, key = a.meta["tags"]["task"], ref["image"]
            seen = detect(s.images[key], CFG)  # what the picture in the history really shows
            world = a.meta["truth"]["world"]
            # distance = exchanges since the picture was last touched, and those are all distractors
            last = max(i for i in range(j) if key in shown[i])
            assert ref["distance"] == j - last - 1 == a.meta["tags"]["distance"]
            assert all(turns[2 * i + 1].meta["distractor"] for i in range(last + 1, j))
            distances.add(ref["distance"])
            if task == "edit":
                assert Scene.from_dict(world["source"]) == seen
                out = detect(s.images[a.image_keys[0]], CFG)
                assert out == Scene.from_dict(world["target"]) == _apply(world)
            elif task == "understand":
                subject = ObjectQuery(**world["subject"])
                assert answer_question(seen, kind=world["kind"], subject=subject, config=CFG) == a.text
            else:
                assert task == "caption" and describe(seen, CFG) == a.text
            checked[task] += 1
            if ref["distance"] > 0:  # the rewritten query names the picture: a word of it no other picture has
                others = [scenes[k] for k in set().union(*shown[:j]) if k != key]
                own = content_words(describe(seen, CFG)) - set().union(*(content_words(describe(o)) for o in others))
                assert not own or content_words(u.text) & own, (u.text, describe(seen), own)
    assert min(checked.values()) > 0, checked
    assert distances == {0, 1, 2, 4, 8}


def test_interleaved_answers_and_distractor_answers_are_true(dialogues):
    _, samples = dialogues
    interleaved = 0
    for s in samples:
        turns = s.dialogue.turns
        final = turns[-1]
        if s.dialogue.meta["interleaved"]:
            interleaved += 1
            assert [type(x).__name__ for x in final.segments] == ["ImageSegment", "TextSegment"]
            scene = detect(s.images[final.image_keys[0]], CFG)
            q, a = final.meta["truth"]["question"], final.meta["truth"]["answer"]
            assert turns[-2].text.endswith(q) and q.endswith("?") and final.text == a
            values = {str(len(scene)), *(str(n) for n in range(len(scene) + 1))}
            for o in scene.objects:
                values |= {o.colour, o.shape, position_name(o.cell, CFG.grid)}
            assert normalise_answer(a) in values
        for u, a in zip(turns[::2], turns[1::2]):
            if a.meta["distractor"] and a.meta["tags"]["task"] == "chat":
                for template, answer in DISTRACTORS.items():
                    pattern = re.escape(template).replace(r"\{a\}", r"(?P<a>\d+)").replace(r"\{b\}", r"(?P<b>\d+)")
                    m = re.fullmatch(pattern.replace(r"\{w\}", r"(?P<w>[a-z]+)"), u.text)
                    if m:
                        g = m.groupdict()
                        assert a.text == answer(int(g.get("a") or 0), int(g.get("b") or 0), g.get("w") or "")
                        break
                else:
                    raise AssertionError(f"unknown distractor {u.text!r}")
    assert interleaved > 5


def test_phrasing_split_is_disjoint_and_held_out_runs_use_only_held_out_templates(tmp_path):
    train, held = ShapesPhrasing(split="train"), ShapesPhrasing(split="heldout")
    for fam, templates in FAMILIES.items():
        if len(templates) >= 2:
            assert set(train.templates(fam)).isdisjoint(held.templates(fam)), fam
            assert set(train.templates(fam)) | set(held.templates(fam)) == set(templates), fam
    assert ShapesPhrasing(split="train", seed=1).templates("t2i") != train.templates("t2i")  # the seed moves the split
    run(tmp_path / "held", phrasing=held, seeds=(2_000_000, 2_000_500), n=20, k=(0, 2))

    def rx(t):
        return "^" + re.escape(t).replace(r"\{desc\}", ".+") + "$"

    train_only = [rx(t) for t in train.templates("t2i")]
    held_rx = [rx(t) for t in held.templates("t2i")]
    generations = 0
    for s in read_samples(tmp_path / "held"):
        for u, a in zip(s.dialogue.turns[::2], s.dialogue.turns[1::2]):
            if a.meta["tags"]["task"] != "generate":
                continue
            assert 2_000_000 <= int(a.meta["record"].split("/")[-1]) < 2_000_500  # the held-out seed range
            q = a.meta["truth"].get("question")
            text = u.text[: -len(q) - 1] if q else u.text  # an interleaved final turn appends its question
            assert any(re.match(p, text) for p in held_rx), text
            assert not any(re.match(p, text) for p in train_only), text
            generations += 1
    assert generations > 0


def test_pool_seeds_and_follow_ups(tmp_path):
    pool = ShapesPool(seeds=[500, 510])
    rng = random.Random(0)
    recs = [pool.fresh("vqa", rng) for _ in range(20)]
    assert {int(r.id.split("/")[-1]) for r in recs} <= set(range(500, 510))
    t2i = pool.fresh("t2i", rng)
    edit = pool.follow_up("edit", t2i.image, rng)
    assert edit.source is t2i.image and Scene.from_dict(edit.meta["source"]) == Scene.from_dict(t2i.meta["target"])
    assert detect(edit.target.tensor(), CFG) == Scene.from_dict(edit.meta["target"])
    assert pool.fresh("chat", rng) is None
    with pytest.raises(ValueError, match="seeds"):
        ShapesPool(seeds=[5, 5])


def test_cfg_dropout_marks_follow_the_image_replies_policy(dialogues):
    """A user turn is droppable exactly when a generated image answers it (SPEC §4; data/droppable.py)."""
    from chatumm_kit.data.dialogue import Role
    from chatumm_kit.data.droppable import answered_with_image

    _, samples = dialogues
    seen = set()
    for s in samples:
        turns = s.dialogue.turns
        for i, t in enumerate(turns):
            if t.role is Role.USER:
                want = answered_with_image(turns, i)
                seen.add(want)
                assert [seg.droppable for seg in t.segments] == [want] * len(t.segments), (s.dialogue.id, i)
            else:
                assert not any(seg.droppable for seg in t.segments)
    assert seen == {True, False}
