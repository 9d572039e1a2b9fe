"""A LightningDataModule of rendered ShapesChat images, for fitting the small VAE on the world (``shapes/vae``).

Images are rendered once from seeded scenes and kept in memory as ``float`` tensors in ``[-1, 1]``
(``[B, 3, H, W]`` batches) — the input convention of :class:`~chatumm_kit.components.vae.VAELatentHead`.

Example:
    >>> dm = ShapesImageDataModule(train_size=64, val_size=16, batch_size=8)
    >>> dm.setup("fit")
    >>> next(iter(dm.train_dataloader())).shape
    torch.Size([8, 3, 32, 32])
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from chatumm_kit.data.shapes.generator import SceneGenerator
from chatumm_kit.data.shapes.render import render_batch
from chatumm_kit.data.shapes.scene import WorldConfig

__all__ = ["ShapesImageDataModule", "render_images"]


def render_images(n: int, *, config: WorldConfig, seed: int) -> torch.Tensor:
    """``[n, 3, H, W]`` float images in ``[-1, 1]`` of ``n`` random scenes."""
    gen = SceneGenerator(config=config, seed=seed)
    scenes = [gen.sample() for _ in range(n)]
    return render_batch(scenes, config).float().div(127.5).sub(1.0)


class ShapesImageDataModule(L.LightningDataModule):
    """Random ShapesChat renders for autoencoder fitting.

    Args:
        world: keyword arguments of :class:`~chatumm_kit.data.shapes.scene.WorldConfig` (default world if omitted).
        train_size: number of training images.
        val_size: number of validation images (a disjoint seed).
        batch_size: images per batch.
        seed: base seed; validation uses ``seed + 1``.
    """

    def __init__(
        self,
        *,
        world: dict[str, Any] | None = None,
        train_size: int = 4096,
        val_size: int = 256,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.config = WorldConfig(**(world or {}))
        self.train_size, self.val_size, self.batch_size, self.seed = train_size, val_size, batch_size, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def make_set(self, n: int, *, seed: int) -> Dataset:
        """``n`` items of ``seed``'s scenes: here ``[n, 3, H, W]`` images (subclasses add labels)."""
        return render_images(n, config=self.config, seed=seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self.make_set(self.train_size, seed=self.seed)
            self.val_set = self.make_set(self.val_size, seed=self.seed + 1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
