"""View sizing policies: the BAGEL preset equals BAGEL's transform rule (SPEC §4.1, re-derived here independently),
the capped rule keeps the kit's original numbers, the position tables are checked, and the packer and datamodule
use the policy."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.packing import Packer
from chatumm_kit.data.view_sizing import ViewRule, ViewSizing, coerce_view_sizing


def bagel_rule(height: int, width: int, *, min_side: int, max_side: int, stride: int) -> tuple[int, int]:
    """SPEC §4.1 in words: one scale factor (aspect kept) so the long side is at most ``max_side`` and the short side
    at least ``min_side`` (small images enlarged); sides to whole pixels, then to multiples of ``stride`` (BAGEL rounds
    with Python's ``round``: ties to even); the long-side limit wins, re-applied to the snapped size. Exact arithmetic
    with fractions, so no floating-point luck is involved."""

    def snap(n: Fraction) -> int:
        return max(1, round(Fraction(round(n), stride))) * stride

    long, short = max(height, width), min(height, width)
    scale = min(Fraction(1), Fraction(max_side, long))
    scale = max(scale, Fraction(min_side, short))
    h, w = snap(height * scale), snap(width * scale)
    if max(h, w) > max_side:
        again = Fraction(max_side, max(h, w))
        h, w = snap(h * again), snap(w * again)
    return h, w


# (width, height) as people say it -> (h, w) of the VAE view and of the ViT view, worked by hand from SPEC §4.1
TABLE = {
    (100, 37): ((384, 1024), (224, 602)),
    (1920, 1080): ((576, 1024), (546, 980)),
    (2000, 300): ((160, 1024), (140, 980)),
    (600, 800): ((800, 608), (798, 602)),
    (1024, 1024): ((1024, 1024), (980, 980)),
    (1000, 250): ((256, 1024), (252, 980)),
    (1080, 1920): ((1024, 576), (980, 546)),
    (512, 512): ((512, 512), (518, 518)),
    (300, 300): ((512, 512), (294, 294)),
    (4032, 3024): ((768, 1024), (728, 980)),  # 735 / 14 = 52.5: a tie, to even
}


@pytest.mark.parametrize(("wh", "expected"), list(TABLE.items()))
def test_bagel_preset_equals_bagels_rule(wh: tuple[int, int], expected) -> None:
    width, height = wh
    sizes = ViewSizing.bagel().sizes(height, width)
    assert sizes.vae == bagel_rule(height, width, min_side=512, max_side=1024, stride=16) == expected[0]
    assert sizes.vit == bagel_rule(height, width, min_side=224, max_side=980, stride=14) == expected[1]


def test_bagel_preset_on_a_sweep_of_sizes() -> None:
    sizing = ViewSizing.bagel()
    for height in (1, 7, 37, 224, 333, 511, 512, 700, 1023, 1024, 1500, 3000, 5000):
        for width in (1, 13, 100, 299, 512, 640, 999, 1024, 1919, 4000):
            vit, vae = sizing.sizes(height, width)
            assert vae == bagel_rule(height, width, min_side=512, max_side=1024, stride=16), (height, width)
            assert vit == bagel_rule(height, width, min_side=224, max_side=980, stride=14), (height, width)
            assert max(vae) <= 1024 and max(vit) <= 980 and vae[0] % 16 == vae[1] % 16 == 0
            assert max(vit) // 14 <= 70 and max(vae) // 16 <= 64  # the position tables (SPEC §4-5)


def _old_fit_size(height: int, width: int, *, multiple: int, max_side: int) -> tuple[int, int]:
    """The kit's rule before view sizing policies (kept here verbatim as the reference)."""
    cap = (max_side // multiple) * multiple
    scale = min(1.0, cap / max(height, width))

    def side(n: int) -> int:
        cells = int(n * scale / multiple + 0.5)
        return min(cap, max(multiple, cells * multiple))

    return side(height), side(width)


def _tie(n: int, scale: float, multiple: int) -> bool:
    """Whether the side, rounded to whole pixels, lies exactly halfway between two grid sizes."""
    return (round(n * scale) / multiple) % 1 == 0.5


def test_capped_rule_keeps_the_original_numbers() -> None:
    """ShapesChat's sizing is unchanged (32 px views); the capped rule agrees with the old one everywhere but where
    the side, in whole pixels, lies halfway between two grid sizes: such ties now go to even as in BAGEL."""
    assert ViewSizing.shapes().sizes(32, 32) == ((32, 32), (32, 32))
    ties = 0
    for max_side, vit, vae in ((32, 8, 8), (64, 8, 8), (980, 14, 16), (100, 14, 16)):
        sizing = ViewSizing.capped(vit_patch_size=vit, vae_token_stride=vae, max_side=max_side)
        for height in (1, 5, 8, 12, 20, 31, 32, 33, 47, 63, 100, 250, 999, 2000):
            for width in (1, 9, 16, 20, 28, 32, 40, 64, 333, 1000):
                got = sizing.sizes(height, width)
                for (h, w), m in ((got.vit, vit), (got.vae, vae)):
                    old = _old_fit_size(height, width, multiple=m, max_side=max_side)
                    scale = min(1.0, (max_side // m) * m / max(height, width))
                    if _tie(height, scale, m) or _tie(width, scale, m):
                        ties += 1
                        assert abs(h - old[0]) <= m and abs(w - old[1]) <= m
                    else:
                        assert (h, w) == old, (height, width, m, max_side)
    assert ties > 0
    assert ViewRule(max_side=64, stride=8).size(20, 12) == (16, 16)  # 2.5 and 1.5 cells: ties to even (old: 24, 16)


def test_max_pixels_and_small_images() -> None:
    rule = ViewRule(min_side=378, max_side=980, stride=14, max_pixels=600_000)
    h, w = rule.size(1000, 1000)
    assert h * w <= 600_000 and h == w and h % 14 == 0 and h > 700
    assert ViewRule(min_side=64, max_side=256, stride=16).size(10, 20) == (64, 128)  # enlarged


def test_position_tables_are_checked() -> None:
    ViewSizing.bagel().check_tables(vit_max_patches_per_side=70, max_latent_side=64)
    too_big = ViewSizing(vit=ViewRule(max_side=1024, stride=14), vae=ViewRule(max_side=1024, stride=16))
    with pytest.raises(ValueError, match="73 patches per side .* position table has 70; lower vit.max_side to 980"):
        too_big.check_tables(vit_max_patches_per_side=70, max_latent_side=64)
    with pytest.raises(ValueError, match="latent position table has 32"):
        ViewSizing.bagel().check_tables(vit_max_patches_per_side=70, max_latent_side=32)


def test_coerce_from_yaml_forms() -> None:
    assert coerce_view_sizing("bagel") == ViewSizing.bagel()
    as_dict = ViewSizing.bagel().to_dict()
    assert coerce_view_sizing(as_dict) == ViewSizing.bagel()
    node = {"_component_": "chatumm_kit.data.view_sizing.ViewSizing",  # a recipe's node, as stored in a checkpoint
            **{k: {"_component_": "chatumm_kit.data.view_sizing.ViewRule", **v} for k, v in as_dict.items()}}  # fmt: skip
    assert coerce_view_sizing(node) == ViewSizing.bagel()
    capped = {"_component_": "chatumm_kit.data.view_sizing.ViewSizing.capped", "vit_patch_size": 4,
              "vae_token_stride": 4, "max_side": 16}  # fmt: skip
    assert coerce_view_sizing(capped) == ViewSizing.capped(vit_patch_size=4, vae_token_stride=4, max_side=16)
    with pytest.raises(ValueError, match="unknown preset 'flux'"):
        coerce_view_sizing("flux")
    with pytest.raises(ValueError, match="expected keys 'vit' and 'vae'"):
        coerce_view_sizing({"vit": as_dict["vit"]})


def test_packer_uses_the_policy() -> None:
    tok = ChatTokenizer.train(["look at this picture please"] * 4, vocab_size=280)
    d = Dialogue(
        id="d",
        turns=[
            Turn(role=Role.USER, segments=[TextSegment(text="look"), ImageSegment(image="a")]),
            Turn(role=Role.ASSISTANT, segments=[TextSegment(text="this")]),
        ],
    )
    sample = DialogueSample(dialogue=d, images={"a": torch.zeros(3, 37, 100, dtype=torch.uint8)})
    packer = Packer(tokenizer=tok, view_sizing="bagel")
    assert (packer.vit_patch_size, packer.vae_token_stride) == (14, 16)
    plan = packer.plan(sample)
    assert plan.vae_size["a"] == (384, 1024) and plan.vit_size["a"] == (224, 602)
    grids = {p.modality.name: p.grid for p in plan.pieces if p.image}
    assert grids == {"VAE_CLEAN": (24, 64), "VIT": (16, 43)}
    with pytest.raises(ValueError, match="vit_patch_size=8 disagrees with view_sizing's stride 14"):
        Packer(tokenizer=tok, view_sizing="bagel", vit_patch_size=8)
