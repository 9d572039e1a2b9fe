"""Attribute scoring with partial credit: exact fractions on hand-made cases."""

import pytest
import torch

from chatumm_kit.data.shapes import AttributeScore, Scene, ShapeObject, WorldConfig, match_objects, render, score

CFG = WorldConfig()


def o(shape="circle", colour="red", size="small", cell=0):
    return ShapeObject(shape=shape, colour=colour, size=size, cell=cell)


def sc(*objs):
    return Scene(objects=objs)


def fields(s):
    return (s.count, s.colour, s.shape, s.size, s.position, s.accuracy, s.exact)


def test_perfect_prediction():
    t = sc(o(), o("square", "blue", "large", 4))
    assert fields(score(t, t)) == (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ("pred", "expected"),
    [
        (o(shape="square"), (1.0, 1.0, 0.0, 1.0, 1.0, 0.8, 0.0)),  # right colour, wrong shape
        (o(colour="blue"), (1.0, 0.0, 1.0, 1.0, 1.0, 0.8, 0.0)),  # wrong colour
        (o(size="large"), (1.0, 1.0, 1.0, 0.0, 1.0, 0.8, 0.0)),  # wrong size
        (o(cell=8), (1.0, 1.0, 1.0, 1.0, 0.0, 0.8, 0.0)),  # wrong place
        (o("square", "blue", "large", 8), (1.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0)),  # only the count is right
    ],
)
def test_one_object_partial_credit(pred, expected):
    assert fields(score(sc(pred), sc(o()))) == pytest.approx(expected, abs=1e-12)


def test_missing_and_extra_objects_cost_credit():
    two = sc(o(), o("square", "blue", "large", 4))
    # one of two found, perfectly: every attribute 1/2, count wrong → (0 + 4 * 0.5) / 5
    assert fields(score(sc(o()), two)) == pytest.approx((0.0, 0.5, 0.5, 0.5, 0.5, 0.4, 0.0))
    # an extra object costs the same
    assert fields(score(two, sc(o()))) == pytest.approx((0.0, 0.5, 0.5, 0.5, 0.5, 0.4, 0.0))
    # nothing predicted
    assert fields(score(Scene(), two)) == (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert fields(score(Scene(), Scene())) == (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)


def test_assignment_maximises_agreement_not_cell_order():
    target = sc(o("circle", "red", "small", 0), o("square", "blue", "large", 4))
    # the objects swapped places: pairing by cell would give colour/shape/size 0; pairing by content gives 1
    pred = sc(o("square", "blue", "large", 0), o("circle", "red", "small", 4))
    assert match_objects(pred, target) == [(1, 0), (0, 1)]
    assert fields(score(pred, target)) == pytest.approx((1.0, 1.0, 1.0, 1.0, 0.0, 0.8, 0.0))


def test_greedy_matching_for_large_scenes_is_still_exact_on_equal_scenes():
    # 9 objects → 9! assignments → greedy pairing; shape/colour pairs are all distinct
    full = Scene(objects=tuple(o(CFG.shapes[c % 5], CFG.colours[c % 6], "small", c) for c in range(9)))
    assert len(match_objects(full, full)) == 9
    assert score(full, full).accuracy == 1.0
    moved = Scene(objects=tuple(x.replace(cell=(x.cell + 1) % 9) for x in full.objects))
    s = score(moved, full)
    assert fields(s) == pytest.approx((1.0, 1.0, 1.0, 1.0, 0.0, 0.8, 0.0))


def test_score_on_images_detects_first():
    t = sc(o("triangle", "green", "large", 2))
    assert score(render(t, CFG), t, config=CFG).exact == 1.0
    wrong = render(sc(o("triangle", "yellow", "large", 2)), CFG)
    assert fields(score(wrong, t, config=CFG)) == pytest.approx((1.0, 0.0, 1.0, 1.0, 1.0, 0.8, 0.0))
    with pytest.raises(ValueError, match="needs config="):
        score(torch.zeros(3, 32, 32, dtype=torch.uint8), t)


def test_mean_and_dict():
    a = score(sc(o()), sc(o()))
    b = score(sc(o(shape="square")), sc(o()))
    m = AttributeScore.mean([a, b])
    assert m.shape == 0.5 and m.colour == 1.0 and m.accuracy == pytest.approx(0.9) and m.exact == 0.5
    assert set(m.as_dict()) == {"count", "colour", "shape", "size", "position", "accuracy", "exact"}
    with pytest.raises(ValueError, match="no scores"):
        AttributeScore.mean([])
