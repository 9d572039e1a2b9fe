"""WorldConfig, geometry and the scene generator of the ShapesChat world."""

import random
from collections import Counter

import pytest
import torch

from chatumm_kit.data.shapes import (
    DEFAULT_PALETTE,
    Scene,
    SceneGenerator,
    ShapeObject,
    WorldConfig,
    sample_scene,
)
from chatumm_kit.data.shapes.geometry import CellLayout, shape_stamps


def obj(shape="circle", colour="red", size="small", cell=0):
    return ShapeObject(shape=shape, colour=colour, size=size, cell=cell)


def test_scene_sorts_objects_by_cell_and_rejects_shared_cells():
    a, b = obj(cell=7), obj(shape="square", cell=2)
    assert Scene(objects=(a, b)) == Scene(objects=(b, a))
    assert Scene(objects=(a, b)).objects == (b, a)
    assert hash(Scene(objects=(a, b))) == hash(Scene(objects=(b, a)))
    with pytest.raises(ValueError, match="share cell 2"):
        Scene(objects=(b, obj(cell=2)))


def test_scene_edits_and_dict_round_trip():
    s = Scene(objects=(obj(cell=0), obj(shape="cross", colour="blue", size="large", cell=4)))
    assert s.without(0) == Scene(objects=(obj(shape="cross", colour="blue", size="large", cell=4),))
    moved = s.replace_object(0, obj(cell=8))
    assert moved.cells == frozenset({4, 8}) and moved.object_at(8) == obj(cell=8) and moved.object_at(0) is None
    assert Scene.from_dict(s.to_dict()) == s
    assert s.to_dict()["objects"][1] == {"shape": "cross", "colour": "blue", "size": "large", "cell": 4}
    with pytest.raises(ValueError, match="no object in cell 5"):
        s.without(5)
    with pytest.raises(ValueError, match="malformed scene"):
        Scene.from_dict({"objects": [{"shape": "circle"}]})


def test_config_defaults_hash_and_equality():
    cfg = WorldConfig()
    assert cfg.shapes == ("circle", "square", "triangle", "diamond", "cross")
    assert cfg.palette == DEFAULT_PALETTE and cfg.num_cells == 9 and cfg.image_size == 32
    assert cfg.half_extents == (2, 4)  # small 5 px, large 9 px in 10-px cells
    assert cfg == WorldConfig() and hash(cfg) == hash(WorldConfig())
    assert cfg != WorldConfig(image_size=64)
    # omegaconf/YAML-style inputs are normalised: lists become tuples, palette values tuples of ints
    cfg2 = WorldConfig(shapes=["circle", "square"], palette={"red": [220, 20, 40], "blue": [30, 70, 220]})
    assert cfg2.shapes == ("circle", "square") and cfg2.palette["red"] == (220, 20, 40)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"shapes": ("circle", "hexagon")}, "unknown ['hexagon']"),
        ({"palette": {"red": (255, 0, 0), "Blue": (0, 0, 255)}}, "'Blue' must be lowercase words"),
        ({"palette": {"red": (255, 0, 0), "crimson": (255, 0, 0)}}, "must all differ"),
        ({"palette": {"red": (255, 0, 300)}}, "palette['red']: expected 3 ints in [0, 255]"),
        ({"sizes": {"small": 0.5, "circle": 1.0}}, "'circle' is used as both shape and size"),
        ({"image_size": 16}, "sizes must differ in pixels"),
        ({"image_size": 20}, "small circle and small square render to the same pixels"),
        ({"image_size": 8}, "2-pixel cells"),
        ({"max_objects": 10}, "max_objects (10)"),
    ],
)
def test_config_errors_name_the_problem(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        WorldConfig(**kwargs)
    assert fragment in str(e.value)


def test_validate_scene_names_bad_attribute():
    cfg = WorldConfig()
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        cfg.validate_scene(Scene(objects=(obj(colour="pink"),)))
    with pytest.raises(ValueError, match=r"cell must be an int in \[0, 9\), got 9"):
        cfg.validate_scene(Scene(objects=(obj(cell=9),)))


def test_layout_keeps_a_background_gap_between_neighbouring_large_objects():
    for size in (24, 32, 48, 64, 96):
        lay = CellLayout(image_size=size, grid=3)
        lo, hi = lay.anchor - lay.max_half_extent, lay.anchor + lay.max_half_extent
        assert lo >= 0 and hi <= lay.cell_px - 1
        assert lo + (lay.cell_px - 1 - hi) >= 1, size  # gap pixels between two neighbours


def test_stamp_pixel_counts_and_shapes():
    st = shape_stamps(cell_px=10, shapes=("circle", "square", "triangle", "diamond", "cross"), half_extents=(2, 4))
    counts = st.sum((-1, -2)).to(torch.int64).tolist()
    assert counts == [[21, 69], [25, 81], [13, 41], [13, 41], [9, 45]]
    small_triangle = st[2, 0, 2:7, 2:7].to(torch.int64).tolist()  # anchor 4, half-extent 2 → rows/cols 2..6
    assert small_triangle == [[0, 0, 1, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # symmetric shapes are symmetric about the anchor pixel (row/col 4)
    for i in (0, 1, 3, 4):
        core = st[i, 1, :9, :9]
        assert torch.equal(core, core.flip(0)) and torch.equal(core, core.flip(1)) and torch.equal(core, core.T)
    aa = shape_stamps(cell_px=10, shapes=("circle",), half_extents=(4,), supersample=4)
    assert ((aa > 0) & (aa < 1)).any() and aa[0, 0, 4, 4] == 1.0 and aa[0, 0, 9, 9] == 0.0


def test_generator_is_seeded_and_valid():
    cfg = WorldConfig()
    a = SceneGenerator(config=cfg, seed=11).take(300)
    b = SceneGenerator(config=cfg, seed=11).take(300)
    c = SceneGenerator(config=cfg, seed=12).take(300)
    assert a == b and a != c
    assert a == [sample_scene(r, cfg) for r in [random.Random(11)] for _ in range(300)]
    counts = Counter(len(s) for s in a)
    assert set(counts) == {1, 2} and min(counts.values()) > 100
    for s in a:
        cfg.validate_scene(s)
    attrs = Counter(o.shape for s in a for o in s)
    assert set(attrs) == set(cfg.shapes)
    assert {len(s) for s in SceneGenerator(config=cfg, seed=0).take(20, num_objects=2)} == {2}
