"""The ShapesChat record pool: single-turn world tasks made on demand, with exact ground truth.

:class:`ShapesPool` is a :class:`~.sources.RecordPool` over the ShapesChat world (:mod:`chatumm_kit.data.shapes`):

* ``fresh(kind, rng)`` draws a task seed from ``seeds = [lo, hi)`` (train and evaluation use disjoint ranges) and
  samples a text-to-image, edit, VQA or caption task from it;
* ``follow_up(kind, image, rng)`` samples a task acting on the scene of ``image`` — so an edit of the assistant's
  last picture or a question about it is always available, and its ground truth is exact.

Images are rendered lazily from scenes; each :class:`~.records.ImageRef` carries ``truth = {"scene": ...}``. Each
record's ``meta`` is its task's ``to_dict()`` (scenes, edit operation / subject / result, question kind / subject),
with the instruction or question re-phrased by the pool's :class:`~.shapes_phrasing.ShapesPhrasing` split.

Example:
    >>> import random
    >>> pool = ShapesPool(seeds=[0, 1000])
    >>> rec = pool.fresh("t2i", random.Random(0))
    >>> rec.image.tensor().shape
    torch.Size([3, 32, 32])
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence

from chatumm_kit.data.shapes import (
    Scene,
    WorldConfig,
    describe,
    render,
    sample_caption,
    sample_edit,
    sample_text_to_image,
    sample_vqa,
)
from chatumm_kit.synth.records import CaptionRecord, EditRecord, ImageRef, Record, TextToImageRecord, VQARecord
from chatumm_kit.synth.shapes_phrasing import ShapesPhrasing

__all__ = ["ShapesPool", "scene_of"]

_KINDS = ("t2i", "edit", "vqa", "caption")


def scene_of(image: ImageRef) -> Scene:
    """The ground-truth scene an image carries (raises ``ValueError`` for an image without one)."""
    if not image.truth or "scene" not in image.truth:
        raise ValueError(f"image {image.key!r} carries no ShapesChat scene (truth={image.truth!r})")
    return Scene.from_dict(image.truth["scene"])


class ShapesPool:
    """Records of the ShapesChat world.

    Args:
        world: the world (vocabulary, image size); default :class:`WorldConfig`.
        phrasing: template split for instructions and questions; default the training split.
        seeds: ``[lo, hi)`` range of task seeds for fresh records (keep evaluation ranges disjoint from training).
        kinds: record kinds offered fresh (subset of ``t2i``, ``edit``, ``vqa``, ``caption``).
        antialias: render with anti-aliased edges (the detector then reads them approximately).
    """

    def __init__(
        self,
        *,
        world: WorldConfig | None = None,
        phrasing: ShapesPhrasing | None = None,
        seeds: Sequence[int] = (0, 1_000_000),
        kinds: Sequence[str] = _KINDS,
        antialias: bool = False,
    ) -> None:
        if len(seeds) != 2 or not 0 <= int(seeds[0]) < int(seeds[1]):
            raise ValueError(f"ShapesPool.seeds must be [lo, hi) with 0 <= lo < hi, got {list(seeds)}")
        bad = sorted(set(kinds) - set(_KINDS))
        if bad or not kinds:
            raise ValueError(f"ShapesPool.kinds: unknown {bad}; choose from {list(_KINDS)}")
        self.world = world or WorldConfig()
        self.phrasing = phrasing or ShapesPhrasing()
        self.seeds = (int(seeds[0]), int(seeds[1]))
        self.kinds = frozenset(kinds)
        self.antialias = antialias

    def image(self, scene: Scene) -> ImageRef:
        """A lazily rendered picture of ``scene``, keyed by its content."""
        data = scene.to_dict()
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]
        world, aa = self.world, self.antialias
        return ImageRef.lazy(
            f"scene:{world.image_size}:{digest}", lambda: render(scene, world, antialias=aa), truth={"scene": data}
        )

    # ------------------------------------------------------------------ RecordPool
    def fresh_kinds(self) -> frozenset[str]:
        return self.kinds

    def fresh(self, kind: str, rng: random.Random) -> Record | None:
        if kind not in self.kinds:
            return None
        seed = rng.randrange(*self.seeds)
        return self._make(kind, random.Random(seed), f"shapes/{kind}/{seed}", source=None)

    def follow_up(self, kind: str, image: ImageRef, rng: random.Random) -> Record | None:
        if kind not in ("edit", "vqa", "caption") or not image.truth:
            return None
        return self._make(kind, rng, f"shapes/{kind}/on:{image.key}", source=image)

    def describe(self, image: ImageRef) -> str | None:
        return describe(scene_of(image), self.world) if image.truth else None

    # ------------------------------------------------------------------ records
    def _make(self, kind: str, rng: random.Random, rid: str, *, source: ImageRef | None) -> Record:
        cfg = self.world
        scene = scene_of(source) if source is not None else None
        if kind == "t2i":
            t2i = sample_text_to_image(rng, config=cfg)
            return TextToImageRecord(
                id=rid, caption=t2i.caption, image=self.image(t2i.target), meta=_without_prompt(t2i.to_dict())
            )
        if kind == "edit":
            edit = sample_edit(rng, config=cfg, source=scene)
            text = self.phrasing.edit_text(edit, rng, cfg)
            return EditRecord(
                id=rid,
                source=source or self.image(edit.source),
                instruction=text,
                target=self.image(edit.target),
                meta={**edit.to_dict(), "instruction": text},
            )
        if kind == "vqa":
            vqa = sample_vqa(rng, config=cfg, scene=scene)
            q = self.phrasing.question_text(vqa, rng, cfg)
            return VQARecord(
                id=rid,
                image=source or self.image(vqa.scene),
                question=q,
                answer=vqa.answer,
                meta={**vqa.to_dict(), "question": q},
            )
        cap = sample_caption(rng, config=cfg, scene=scene)
        return CaptionRecord(
            id=rid, image=source or self.image(cap.scene), caption=cap.caption, meta=_without_prompt(cap.to_dict())
        )


def _without_prompt(meta: dict) -> dict:
    """Task ground truth minus the world's own request sentence (the pipeline writes the user's text itself)."""
    return {k: v for k, v in meta.items() if k != "prompt"}
