"""Seeded random scenes of the ShapesChat world.

:func:`sample_scene` draws from a caller's ``random.Random`` (so task samplers can share one stream);
:class:`SceneGenerator` owns its own seeded stream. The number of objects is uniform in
``[config.min_objects, config.max_objects]``; each object's shape, colour and size are uniform and independent; cells
are distinct and uniform.

Example:
    >>> from chatumm_kit.data.shapes import WorldConfig
    >>> gen = SceneGenerator(config=WorldConfig(), seed=0)
    >>> a = gen.sample()
    >>> a == SceneGenerator(config=WorldConfig(), seed=0).sample()
    True
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from .scene import Scene, ShapeObject, WorldConfig

__all__ = ["sample_scene", "sample_object", "SceneGenerator"]


def sample_object(rng: random.Random, config: WorldConfig, *, cell: int) -> ShapeObject:
    """A uniformly random object in ``cell``."""
    return ShapeObject(
        shape=rng.choice(config.shapes),
        colour=rng.choice(config.colours),
        size=rng.choice(config.size_names),
        cell=cell,
    )


def sample_scene(rng: random.Random, config: WorldConfig, *, num_objects: int | None = None) -> Scene:
    """A random scene drawn from ``rng``.

    Args:
        rng: the random stream (advanced by this call).
        config: the world.
        num_objects: fixed object count, or None for uniform in ``[min_objects, max_objects]``.
    """
    n = rng.randint(config.min_objects, config.max_objects) if num_objects is None else num_objects
    if not 0 <= n <= config.num_cells:
        raise ValueError(f"sample_scene: num_objects={n} does not fit {config.num_cells} cells")
    cells = rng.sample(range(config.num_cells), n)
    return Scene(objects=tuple(sample_object(rng, config, cell=c) for c in cells))


class SceneGenerator:
    """An endless, seeded stream of scenes.

    Args:
        config: the world.
        seed: seeds the generator's own ``random.Random``; the same seed gives the same scenes.

    Example:
        >>> gen = SceneGenerator(config=WorldConfig(), seed=3)
        >>> scenes = gen.take(4)
        >>> len(scenes), all(1 <= len(s) <= 2 for s in scenes)
        (4, True)
    """

    def __init__(self, *, config: WorldConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self.rng = random.Random(seed)

    def sample(self, *, num_objects: int | None = None) -> Scene:
        """The next scene (see :func:`sample_scene`)."""
        return sample_scene(self.rng, self.config, num_objects=num_objects)

    def take(self, n: int, *, num_objects: int | None = None) -> list[Scene]:
        """The next ``n`` scenes."""
        return [self.sample(num_objects=num_objects) for _ in range(n)]

    def __iter__(self) -> Iterator[Scene]:
        while True:
            yield self.sample()
