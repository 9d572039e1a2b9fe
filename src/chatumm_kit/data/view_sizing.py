"""How big each view of an image is: :class:`ViewRule` per view, :class:`ViewSizing` for both (SPEC §2, §4.1).

An image enters the stream as a VAE view (pixels → latent tokens, one per ``stride`` pixels) and a ViT view (one
patch per ``stride`` pixels). Each view has its own rule, applied to the image's ``(height, width)``:

1. **scale** so the long side is at most ``max_side`` (never enlarging for that), then, if the short side is below
   ``min_side``, enlarge so it reaches ``min_side`` (small images are enlarged);
2. **snap** each side to whole pixels, then to the nearest multiple of ``stride`` (at least one ``stride``); ties go
   to even, as in BAGEL's transform;
3. if the view holds more than ``max_pixels``, shrink by ``sqrt(max_pixels / pixels)`` and snap *down*;
4. if the long side still exceeds ``max_side`` (step 1 enlarged a very elongated image), scale the snapped size down
   to it and snap again — the long-side cap always wins over the short-side minimum.

``max_side`` counts in whole grid cells: the effective cap is the largest multiple of ``stride`` not above it.

Presets:

* :meth:`ViewSizing.bagel` — BAGEL's inference transform (SPEC §4.1): VAE long side ≤ 1024, short side ≥ 512,
  stride 16; ViT ≤ 980 / ≥ 224, stride 14 (980 / 14 = 70 patches, the ViT position table's side). A 1920 × 1080
  (width × height) photo gets a VAE view of (h, w) = (576, 1024) and a ViT view of (546, 980); a 100 × 37 icon is
  enlarged to (384, 1024) and (224, 602).
* :meth:`ViewSizing.capped` — the kit's original rule: both views only shrink, to one cap (``min_side`` 0, no pixel
  cap). ShapesChat uses it with 32 px (:meth:`ViewSizing.shapes`), so its 32×32 images stay 32×32.

Example:
    >>> ViewSizing.bagel().sizes(1080, 1920)
    ViewSizes(vit=(546, 980), vae=(576, 1024))
    >>> ViewRule(max_side=32, stride=8).size(32, 32)
    (32, 32)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

__all__ = ["ViewRule", "ViewSizes", "ViewSizing", "coerce_view_sizing", "resolve_view_sizing", "view_sizing_of_data"]


def _snap(n: float, stride: int, *, down: bool = False) -> int:
    """``n`` pixels to whole pixels, then to a multiple of ``stride`` (nearest, or floor with ``down``), at least one
    ``stride``. Ties go to even, as Python's ``round`` (and BAGEL's transform) does; rounding to whole pixels first
    makes ties exact, so floating-point noise in ``n`` cannot flip them."""
    pixels = round(n)
    cells = pixels // stride if down else round(pixels / stride)
    return max(1, cells) * stride


@dataclass(frozen=True)
class ViewRule:
    """Sizing rule of one view (see the module docstring for the four steps).

    Attributes:
        max_side: long side at most this many pixels (rounded down to a multiple of ``stride``).
        stride: pixels per token side (ViT patch size; VAE downsample × latent patch).
        min_side: short side at least this many pixels, enlarging small images (0: never enlarge).
        max_pixels: cap on ``height × width`` (``None``: none).

    Example:
        >>> ViewRule(min_side=512, max_side=1024, stride=16).size(37, 100)
        (384, 1024)
    """

    max_side: int
    stride: int
    min_side: int = 0
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"ViewRule.stride must be >= 1, got {self.stride}")
        if self.max_side < self.stride:
            raise ValueError(f"ViewRule.max_side={self.max_side} is smaller than one grid cell of {self.stride} pixels")
        if not 0 <= self.min_side <= self.max_side:
            raise ValueError(f"ViewRule.min_side={self.min_side} must be in [0, max_side={self.max_side}]")
        if self.max_pixels is not None and self.max_pixels < self.stride**2:
            raise ValueError(f"ViewRule.max_pixels={self.max_pixels} is smaller than one grid cell ({self.stride}²)")

    @property
    def cap(self) -> int:
        """The effective long-side cap: the largest multiple of ``stride`` not above ``max_side``."""
        return (self.max_side // self.stride) * self.stride

    @property
    def max_cells(self) -> int:
        """Most tokens along one side of a view (``cap // stride``)."""
        return self.cap // self.stride

    def size(self, height: int, width: int) -> tuple[int, int]:
        """The view's ``(h, w)`` for an image of ``height × width`` pixels."""
        if height < 1 or width < 1:
            raise ValueError(f"ViewRule.size: empty image {height}x{width}")
        long, short = max(height, width), min(height, width)
        scale = min(1.0, self.cap / long)
        if short * scale < self.min_side:
            scale = self.min_side / short
        h, w = _snap(height * scale, self.stride), _snap(width * scale, self.stride)
        if self.max_pixels is not None and h * w > self.max_pixels:
            shrink = math.sqrt(self.max_pixels / (h * w))
            h, w = _snap(h * shrink, self.stride, down=True), _snap(w * shrink, self.stride, down=True)
        if max(h, w) > self.cap:
            shrink = self.cap / max(h, w)
            h, w = min(self.cap, _snap(h * shrink, self.stride)), min(self.cap, _snap(w * shrink, self.stride))
        return h, w


class ViewSizes(NamedTuple):
    """``(h, w)`` of the ViT view and of the VAE view of one image."""

    vit: tuple[int, int]
    vae: tuple[int, int]


@dataclass(frozen=True)
class ViewSizing:
    """The sizing policy of an image's two views (SPEC §4.1).

    Attributes:
        vit: the ViT view's rule (its ``stride`` is the ViT patch size).
        vae: the VAE view's rule (its ``stride`` is VAE downsample × latent patch).

    Example:
        >>> ViewSizing.shapes().sizes(32, 32)
        ViewSizes(vit=(32, 32), vae=(32, 32))
    """

    vit: ViewRule
    vae: ViewRule

    def __post_init__(self) -> None:
        for name in ("vit", "vae"):
            rule = getattr(self, name)
            if isinstance(rule, Mapping):  # from YAML / JSON
                object.__setattr__(self, name, ViewRule(**rule))
            elif not isinstance(rule, ViewRule):
                raise TypeError(f"ViewSizing.{name} must be a ViewRule or a mapping, got {type(rule).__name__}")

    def sizes(self, height: int, width: int) -> ViewSizes:
        """Both views' sizes for an image of ``height × width`` pixels."""
        return ViewSizes(vit=self.vit.size(height, width), vae=self.vae.size(height, width))

    @property
    def square_output_size(self) -> tuple[int, int]:
        """The largest square VAE view, ``(cap, cap)``: the default size of a generated image (1024² for BAGEL,
        SPEC §4.1)."""
        return self.vae.cap, self.vae.cap

    def check_tables(self, *, vit_max_patches_per_side: int, max_latent_side: int) -> None:
        """Raise ``ValueError`` if a view could outgrow its model's position table.

        Args:
            vit_max_patches_per_side: the ViT's learned position grid side (BAGEL: 70).
            max_latent_side: the VAE latent position grid side, in tokens (BAGEL: 64).
        """
        if self.vit.max_cells > vit_max_patches_per_side:
            raise ValueError(
                f"view sizing: the ViT view may be {self.vit.max_cells} patches per side (max_side {self.vit.max_side} "
                f"/ stride {self.vit.stride}) but the ViT's position table has {vit_max_patches_per_side}; lower "
                f"vit.max_side to {vit_max_patches_per_side * self.vit.stride}"
            )
        if self.vae.max_cells > max_latent_side:
            raise ValueError(
                f"view sizing: the VAE view may be {self.vae.max_cells} tokens per side (max_side {self.vae.max_side} "
                f"/ stride {self.vae.stride}) but the latent position table has {max_latent_side}; lower "
                f"vae.max_side to {max_latent_side * self.vae.stride}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"vit": asdict(self.vit), "vae": asdict(self.vae)}

    # ------------------------------------------------------------------ presets
    @classmethod
    def bagel(cls) -> ViewSizing:
        """BAGEL's inference transform (SPEC §4.1): VAE 512–1024 / 16, ViT 224–980 / 14."""
        return cls(
            vit=ViewRule(min_side=224, max_side=980, stride=14),
            vae=ViewRule(min_side=512, max_side=1024, stride=16),
        )

    @classmethod
    def capped(cls, *, vit_patch_size: int, vae_token_stride: int, max_side: int) -> ViewSizing:
        """The kit's original rule: both views shrink (never enlarge) to one cap, no pixel cap."""
        return cls(
            vit=ViewRule(max_side=max_side, stride=vit_patch_size),
            vae=ViewRule(max_side=max_side, stride=vae_token_stride),
        )

    @classmethod
    def shapes(cls, *, image_size: int = 32, vit_patch_size: int = 8, vae_token_stride: int = 8) -> ViewSizing:
        """ShapesChat's sizing: :meth:`capped` at the world's image size (32 px, ``chatumm_tiny``'s strides)."""
        return cls.capped(vit_patch_size=vit_patch_size, vae_token_stride=vae_token_stride, max_side=image_size)


def _without_component(node: Any, name: str, where: str) -> Any:
    if not isinstance(node, Mapping) or "_component_" not in node:
        return node
    if node["_component_"] != f"{__name__}.{name}":
        raise ValueError(f"{where}: _component_ {node['_component_']!r} is not {__name__}.{name}")
    return {k: v for k, v in node.items() if k != "_component_"}


def coerce_view_sizing(value: ViewSizing | Mapping[str, Any] | str, *, where: str = "view_sizing") -> ViewSizing:
    """A :class:`ViewSizing` from itself, a mapping ``{vit: {...}, vae: {...}}`` or a preset name (``bagel``)."""
    if isinstance(value, ViewSizing):
        return value
    if isinstance(value, str):
        presets = {"bagel": ViewSizing.bagel, "shapes": ViewSizing.shapes}
        if value not in presets:
            raise ValueError(f"{where}: unknown preset {value!r} (expected one of {sorted(presets)})")
        return presets[value]()
    if isinstance(value, Mapping):  # YAML / JSON, also a recipe node not yet built (``_component_`` keys dropped)
        preset = {f"{__name__}.ViewSizing.{n}": getattr(ViewSizing, n) for n in ("bagel", "capped", "shapes")}
        if value.get("_component_") in preset:
            return preset[value["_component_"]](**{k: v for k, v in value.items() if k != "_component_"})
        value = _without_component(value, "ViewSizing", where)
        if set(value) != {"vit", "vae"}:
            raise ValueError(f"{where}: expected keys 'vit' and 'vae', got {sorted(value)}")
        rules = {k: _without_component(v, "ViewRule", f"{where}.{k}") for k, v in value.items()}
        return ViewSizing(vit=rules["vit"], vae=rules["vae"])
    raise TypeError(f"{where}: expected a ViewSizing, a mapping or a preset name, got {type(value).__name__}")


def resolve_view_sizing(
    view_sizing: ViewSizing | Mapping[str, Any] | str | None,
    *,
    vit_patch_size: int | None,
    vae_token_stride: int | None,
    max_image_side: int,
    where: str,
) -> ViewSizing:
    """The sizing a packer (or session) uses: ``view_sizing`` if given (strides given beside it must agree), else
    :meth:`ViewSizing.capped` from the shorthand ``vit_patch_size`` / ``vae_token_stride`` (default 14 / 16) and
    ``max_image_side`` — the kit's original behaviour."""
    if view_sizing is None:
        vit = 14 if vit_patch_size is None else int(vit_patch_size)
        vae = 16 if vae_token_stride is None else int(vae_token_stride)
        for name, v in (("vit_patch_size", vit), ("vae_token_stride", vae)):
            if v < 1:
                raise ValueError(f"{where}({name}={v}): must be >= 1")
            if max_image_side < v:
                raise ValueError(f"{where}(max_image_side={max_image_side}) is smaller than {name}={v}")
        return ViewSizing.capped(vit_patch_size=vit, vae_token_stride=vae, max_side=int(max_image_side))
    sizing = coerce_view_sizing(view_sizing, where=f"{where}.view_sizing")
    for name, given, stride in (
        ("vit_patch_size", vit_patch_size, sizing.vit.stride),
        ("vae_token_stride", vae_token_stride, sizing.vae.stride),
    ):
        if given is not None and int(given) != stride:
            raise ValueError(f"{where}: {name}={given} disagrees with view_sizing's stride {stride}")
    return sizing


def view_sizing_of_data(data: Mapping[str, Any]) -> ViewSizing:
    """The sizing a recipe's ``data`` node (a :class:`~chatumm_kit.data.datamodule.DialogueDataModule`) trained
    with: its ``view_sizing``, or the capped rule from ``vit_patch_size`` / ``vae_token_stride`` /
    ``max_image_side`` (the datamodule's defaults where absent) — what chat and evaluation size images by.

    Example:
        >>> view_sizing_of_data({"view_sizing": "bagel"}).vae.min_side
        512
        >>> view_sizing_of_data({"vit_patch_size": 8, "vae_token_stride": 8, "max_image_side": 32}).vit
        ViewRule(max_side=32, stride=8, min_side=0, max_pixels=None)
    """
    return resolve_view_sizing(
        data.get("view_sizing"),
        vit_patch_size=data.get("vit_patch_size"),
        vae_token_stride=data.get("vae_token_stride"),
        max_image_side=int(data.get("max_image_side", 980)),
        where="data",
    )
