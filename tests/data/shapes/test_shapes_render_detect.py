"""Renderer and detector: pixel facts, exact round trips, robustness to noise, blur and small offsets."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from chatumm_kit.data.shapes import (
    AttributeScore,
    Scene,
    SceneGenerator,
    ShapeObject,
    WorldConfig,
    detect,
    detect_batch,
    render,
    render_batch,
    score,
)

CFG = WorldConfig()


def one(shape="square", colour="red", size="large", cell=0):
    return Scene(objects=(ShapeObject(shape=shape, colour=colour, size=size, cell=cell),))


def all_single_objects(cfg):
    return [
        one(s, c, z, k) for s, c, z, k in itertools.product(cfg.shapes, cfg.palette, cfg.sizes, range(cfg.num_cells))
    ]


def is_colour(img, rgb):
    return (img == torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1)).all(0)


def reference_render(scene, cfg):
    """Slow per-pixel renderer written from the documented geometry (margin, anchor, half-extents, predicates)."""
    cs = cfg.image_size // cfg.grid
    margin = (cfg.image_size - cfg.grid * cs) // 2
    anchor = (cs - 1) // 2
    half = dict(zip(cfg.sizes, cfg.half_extents))
    img = torch.tensor(cfg.background, dtype=torch.uint8).view(3, 1, 1).repeat(1, cfg.image_size, cfg.image_size)
    for o in scene:
        r, c = divmod(o.cell, cfg.grid)
        cy, cx = margin + r * cs + anchor, margin + c * cs + anchor
        h = half[o.size]
        for y in range(cfg.image_size):
            for x in range(cfg.image_size):
                u, v = x - cx, y - cy
                inside = {
                    "square": max(abs(u), abs(v)) <= h,
                    "circle": u * u + v * v <= h * h + h,
                    "diamond": abs(u) + abs(v) <= h,
                    "cross": max(abs(u), abs(v)) <= h and min(abs(u), abs(v)) <= h // 3,
                    "triangle": abs(v) <= h and 2 * abs(u) < v + h + 0.5,
                }[o.shape]
                if inside:
                    img[:, y, x] = torch.tensor(cfg.palette[o.colour], dtype=torch.uint8)
    return img


def test_render_known_pixels():
    img = render(one("square", "red", "large", 0), CFG)
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    red = is_colour(img, CFG.palette["red"])
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[1:10, 1:10] = True  # margin 1, 10-px cells, anchor 4, half-extent 4 → pixels 1..9
    assert torch.equal(red, expected)
    assert is_colour(img, (255, 255, 255)).sum() == 32 * 32 - 81
    img = render(one("circle", "blue", "small", 4), CFG)  # centre pixel of the board is (15, 15)
    blue = is_colour(img, CFG.palette["blue"])
    assert blue.sum() == 21 and blue[15, 15] and blue[13, 15] and not blue[13, 13]
    assert blue.nonzero().float().mean(0).tolist() == [15.0, 15.0]


def test_render_matches_slow_reference_and_is_deterministic():
    for cfg in (CFG, WorldConfig(image_size=64), WorldConfig(image_size=48, grid=4)):
        scenes = SceneGenerator(config=cfg, seed=1).take(12)
        batch = render_batch(scenes, cfg)
        for s, img in zip(scenes, batch):
            assert torch.equal(img, reference_render(s, cfg)), (cfg.image_size, s)
            assert torch.equal(render(s, cfg), img)
    assert torch.equal(render_batch(scenes, cfg), batch)


def test_clean_renders_hold_only_background_and_palette_colours():
    imgs = render_batch(SceneGenerator(config=CFG, seed=2).take(200), CFG)
    pixels = {tuple(p) for p in imgs.permute(0, 2, 3, 1).reshape(-1, 3).unique(dim=0).tolist()}
    assert pixels == {CFG.background, *CFG.palette.values()}
    aa = render_batch(SceneGenerator(config=CFG, seed=2).take(50), CFG, antialias=True)
    aa_pixels = {tuple(p) for p in aa.permute(0, 2, 3, 1).reshape(-1, 3).unique(dim=0).tolist()}
    assert len(aa_pixels) > len(pixels)  # blended edges


@pytest.mark.parametrize("image_size", [32, 64, 24])
def test_every_single_object_round_trips_exactly(image_size):
    cfg = WorldConfig(image_size=image_size)
    scenes = all_single_objects(cfg)
    assert len(scenes) == 5 * 6 * 2 * 9
    assert detect_batch(render_batch(scenes, cfg), cfg) == scenes


def test_thousands_of_random_scenes_round_trip_exactly():
    scenes = SceneGenerator(config=CFG, seed=3).take(2500)
    scenes += SceneGenerator(config=CFG, seed=4).take(1500, num_objects=2)
    assert sum(len(s) == 2 for s in scenes) > 2500
    assert detect_batch(render_batch(scenes, CFG), CFG) == scenes
    # one by one, uint8 and float inputs
    for s in scenes[:50]:
        img = render(s, CFG)
        assert detect(img, CFG) == s and detect(img.float() / 255, CFG) == s


def test_round_trip_at_other_sizes_grids_and_crowded_scenes():
    cfg = WorldConfig(image_size=64)
    scenes = SceneGenerator(config=cfg, seed=5).take(300)
    assert detect_batch(render_batch(scenes, cfg), cfg) == scenes
    crowded = WorldConfig(grid=4, image_size=48, min_objects=5, max_objects=16)
    scenes = SceneGenerator(config=crowded, seed=6).take(200)
    assert detect_batch(render_batch(scenes, crowded), crowded) == scenes


def noisy(imgs, std, seed):
    g = torch.Generator().manual_seed(seed)
    return (imgs.float() / 255 + std * torch.randn(imgs.shape, generator=g)).clamp(0, 1)


def blurred(imgs, sigma, taps=5):
    k = torch.arange(taps, dtype=torch.float32) - taps // 2
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).expand(3, 1, taps, taps)
    x = F.pad(imgs.float() / 255, (taps // 2,) * 4, mode="replicate")
    return F.conv2d(x, kernel, groups=3)


@pytest.fixture(scope="module")
def probe():
    scenes = all_single_objects(CFG) + SceneGenerator(config=CFG, seed=7).take(500, num_objects=2)
    return scenes, render_batch(scenes, CFG)


def exact_rate(pred, target):
    return sum(p == t for p, t in zip(pred, target)) / len(target)


@pytest.mark.parametrize("std", [0.05, 0.1])
def test_mild_gaussian_noise_keeps_detection_accurate(probe, std):
    scenes, imgs = probe
    pred = detect_batch(noisy(imgs, std, seed=int(std * 100)), CFG)
    assert exact_rate(pred, scenes) >= 0.99
    assert AttributeScore.mean([score(p, t) for p, t in zip(pred, scenes)]).accuracy >= 0.998


@pytest.mark.parametrize(("sigma", "min_exact"), [(0.5, 0.99), (0.7, 0.97)])
def test_mild_blur_keeps_detection_accurate(probe, sigma, min_exact):
    scenes, imgs = probe
    assert exact_rate(detect_batch(blurred(imgs, sigma), CFG), scenes) >= min_exact


def test_antialiased_and_noisy_blurred_renders_are_read_back(probe):
    scenes, _ = probe
    assert exact_rate(detect_batch(render_batch(scenes, CFG, antialias=True), CFG), scenes) >= 0.99
    _, imgs = probe
    both = (blurred(imgs, 0.5) + noisy(torch.zeros_like(imgs), 0.05, seed=9)).clamp(0, 1)
    assert exact_rate(detect_batch(both, CFG), scenes) >= 0.98


def test_objects_shifted_by_one_pixel_are_still_read(probe):
    scenes, imgs = probe
    for dy, dx in [(0, 1), (1, 0), (1, 1), (0, -1), (-1, 0)]:
        shifted = torch.roll(imgs, (dy, dx), dims=(2, 3))
        assert exact_rate(detect_batch(shifted, CFG), scenes) >= 0.99, (dy, dx)
    # without shift tolerance, centred stamps alone miss many of them
    shifted = torch.roll(imgs, (1, 1), dims=(2, 3))
    assert exact_rate(detect_batch(shifted, CFG, max_shift=0), scenes) < 0.9


def test_degrades_gracefully_with_partial_credit(probe):
    scenes, imgs = probe
    pred = detect_batch(blurred(imgs, 1.2, taps=7), CFG)  # heavy blur: small shapes become blobs
    mean = AttributeScore.mean([score(p, t) for p, t in zip(pred, scenes)])
    assert mean.exact < 0.9 and 0.5 < mean.shape < 0.95  # really degraded, in shape ...
    assert mean.count == 1.0 and min(mean.colour, mean.size, mean.position) >= 0.99  # ... but not elsewhere
    assert mean.accuracy > 0.9


def test_blank_and_garbage_images():
    blank = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    assert detect(blank, CFG) == Scene()
    assert score(blank, one(), config=CFG).as_dict() == {
        "count": 0.0,
        "colour": 0.0,
        "shape": 0.0,
        "size": 0.0,
        "position": 0.0,
        "accuracy": 0.0,
        "exact": 0.0,
    }
    # a solid red image: every cell is best explained by the stamp that fills most of it
    solid = render(one(), CFG).clone()
    solid[:] = torch.tensor(CFG.palette["red"], dtype=torch.uint8).view(3, 1, 1)
    assert detect(solid, CFG) == Scene(objects=tuple(one("square", "red", "large", c).objects[0] for c in range(9)))


def test_input_errors_are_explicit():
    with pytest.raises(ValueError, match=r"expected \[B, 3, 32, 32\] for image_size=32, got \(1, 3, 64, 64\)"):
        detect(torch.zeros(3, 64, 64, dtype=torch.uint8), CFG)
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\]"):
        detect(torch.full((3, 32, 32), 200.0), CFG)
    with pytest.raises(ValueError, match="use detect_batch"):
        detect(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), CFG)
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        render(one(shape="hexagon"), CFG)
