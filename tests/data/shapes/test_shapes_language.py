"""Positions, canonical captions and their parser, referring expressions."""

import random

import pytest

from chatumm_kit.data.shapes import (
    ObjectQuery,
    Scene,
    SceneGenerator,
    ShapeObject,
    WorldConfig,
    describe,
    distinguishing_query,
    parse_caption,
    parse_position,
    position_name,
    refer_to,
    resolve_reference,
)

CFG = WorldConfig()


def o(shape="circle", colour="red", size="small", cell=0):
    return ShapeObject(shape=shape, colour=colour, size=size, cell=cell)


def test_position_names_and_variants():
    names = [position_name(c) for c in range(9)]
    assert names == [
        "top left",
        "top center",
        "top right",
        "middle left",
        "center",
        "middle right",
        "bottom left",
        "bottom center",
        "bottom right",
    ]
    assert [parse_position(n) for n in names] == list(range(9))
    variants = {
        "upper left": 0,
        "Top-Left": 0,
        "top middle": 1,
        "top": 1,
        "centre": 4,
        "middle": 4,
        "center left": 3,
        "left": 3,
        "right": 5,
        "lower right": 8,
        "bottom": 7,
        "row 3 column 1": 6,
    }
    assert {k: parse_position(k) for k in variants} == variants
    for bad in ("top bottom", "left right", "middle center", "somewhere", "row 4 column 1", "top left corner"):
        assert parse_position(bad) is None, bad
    assert position_name(5, grid=4) == "row 2 column 2" and parse_position("row 2 column 2", grid=4) == 5
    with pytest.raises(ValueError, match="cell 9 outside a 3x3 grid"):
        position_name(9)


def test_describe_is_canonical():
    s = Scene(objects=(o("square", "blue", "large", 4), o("circle", "orange", "small", 0)))
    assert describe(s) == "A small orange circle in the top left and a large blue square in the center."
    assert describe(Scene()) == "An empty picture."
    three = Scene(objects=(o(cell=0), o(cell=1), o(cell=2)))
    assert describe(three).count(", ") == 1 and " and a small red circle in the top right." in describe(three)


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,
        WorldConfig(grid=4, image_size=48, max_objects=5),
        WorldConfig(palette={"dark green": (0, 100, 0), "red": (220, 20, 40)}, sizes={"tiny": 0.4, "huge": 1.0}),
    ],
)
def test_describe_parse_round_trip(cfg):
    scenes = SceneGenerator(config=cfg, seed=0).take(1000)
    assert [parse_caption(describe(s, cfg), cfg) for s in scenes] == scenes
    assert parse_caption(describe(Scene(), cfg), cfg) == Scene()


def test_parse_caption_reads_free_text_and_rejects_incomplete_or_conflicting():
    assert parse_caption(
        "Sure! I drew A Small Red Circle at the upper left, and one large blue cross on the right."
    ) == (Scene(objects=(o(cell=0), o("cross", "blue", "large", 5))))
    assert parse_caption("hello there") is None
    assert parse_caption("a red circle in the top left") is None  # no size
    assert parse_caption("a small red circle in the top left and a large blue square in the upper left") is None
    assert parse_caption("a small pink circle in the top left") is None  # not in the palette


def test_object_query_phrases_and_selection():
    s = Scene(objects=(o(cell=0), o(size="large", cell=4)))
    assert ObjectQuery(colour="red", shape="circle").select(s) == list(s.objects)
    assert ObjectQuery(size="large", colour="red", shape="circle").phrase() == "the large red circle"
    assert ObjectQuery(colour="red", cell=4).phrase() == "the red object in the center"
    assert distinguishing_query(s.objects[0], s) == ObjectQuery(size="small", colour="red", shape="circle")
    twins = Scene(objects=(o(cell=0), o(cell=8)))
    assert distinguishing_query(twins.objects[1], twins) == ObjectQuery(colour="red", shape="circle", cell=8)
    assert distinguishing_query(twins.objects[1], twins, candidates=[("colour", "shape")]) is None


def test_refer_to_prefers_short_references():
    a = Scene(objects=(o(cell=0), o("square", "blue", "large", 4)))
    b = Scene(objects=(o(size="large", cell=2),))
    assert refer_to(a, [b]) == "the picture with the blue square"
    assert refer_to(b, [a]) == "the picture with the large red circle"
    c = Scene(objects=(o(cell=0),))
    assert refer_to(c, [a]) == "the picture with only a small red circle in the top left"
    with pytest.raises(ValueError, match="appears in among"):
        refer_to(a, [b, a])
    phrases = {refer_to(a, [b], rng=random.Random(i)) for i in range(40)}
    assert len(phrases) >= 4 and all(p.endswith("the blue square") for p in phrases)


def test_refer_to_always_resolves_to_its_scene_only():
    gen = SceneGenerator(config=CFG, seed=9)
    rng = random.Random(0)
    kinds = set()
    for _ in range(300):
        history = gen.take(rng.randint(2, 8))
        if len(set(history)) != len(history):
            continue
        i = rng.randrange(len(history))
        phrase = refer_to(history[i], history[:i] + history[i + 1 :], rng=rng)
        assert resolve_reference(phrase, history) == [i], (phrase, history)
        kinds.add("only" if " only " in phrase else "in the" if " in the " in phrase else "plain")
    assert kinds >= {"plain", "in the"}


def test_resolve_reference_reads_free_text():
    a = Scene(objects=(o(cell=0),))
    b = Scene(objects=(o("square", "red", "small", 0),))
    c = Scene(objects=(o(cell=8),))
    assert resolve_reference("go back to the red circle picture and make it blue", [a, b, c]) == [0, 2]
    assert resolve_reference("the picture with the red circle in the bottom right", [a, b, c]) == [2]
    assert resolve_reference("the red object", [a, b, c]) == [0, 1, 2]
    assert resolve_reference("the first picture", [a, b, c]) == []
