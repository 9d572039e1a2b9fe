"""A LightningDataModule of one-object ShapesChat renders labelled with the object's colour and shape, for training
the ViT encoder alone on an attribute probe (``shapes/vit_probe``).

Images are rendered once from seeded one-object scenes and kept in memory in ``[-1, 1]`` — the ViT normalisation the
packer uses by default (mean 0.5, std 0.5 per channel). Batches are ``(images [B, 3, H, W], colour [B], shape [B])``
with labels indexing ``WorldConfig.palette`` (in order) and ``WorldConfig.shapes``.

Example:
    >>> dm = ShapesProbeDataModule(train_size=16, val_size=8, batch_size=4)
    >>> dm.setup("fit")
    >>> images, colour, shape = next(iter(dm.train_dataloader()))
    >>> images.shape, colour.shape, int(shape.max()) < len(dm.config.shapes)
    (torch.Size([4, 3, 32, 32]), torch.Size([4]), True)
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from chatumm_kit.data.shapes.generator import SceneGenerator
from chatumm_kit.data.shapes.images import ShapesImageDataModule
from chatumm_kit.data.shapes.render import render_batch
from chatumm_kit.data.shapes.scene import WorldConfig

__all__ = ["ShapesProbeDataModule", "probe_set"]


def probe_set(n: int, *, config: WorldConfig, seed: int) -> TensorDataset:
    """``n`` one-object scenes as ``(images [n, 3, H, W] in [-1, 1], colour [n], shape [n])``."""
    scenes = SceneGenerator(config=config, seed=seed).take(n, num_objects=1)
    colours, shapes = list(config.palette), list(config.shapes)
    images = render_batch(scenes, config).float().div(127.5).sub(1.0)
    colour = torch.tensor([colours.index(s.objects[0].colour) for s in scenes])
    shape = torch.tensor([shapes.index(s.objects[0].shape) for s in scenes])
    return TensorDataset(images, colour, shape)


class ShapesProbeDataModule(ShapesImageDataModule):
    """One-object renders with their colour and shape labels (see the module docstring); the arguments are
    :class:`~chatumm_kit.data.shapes.images.ShapesImageDataModule`'s."""

    @property
    def num_colours(self) -> int:
        return len(self.config.palette)

    @property
    def num_shapes(self) -> int:
        return len(self.config.shapes)

    def make_set(self, n: int, *, seed: int) -> TensorDataset:
        return probe_set(n, config=self.config, seed=seed)
