"""`ViTProbeSystem`: trains a :class:`~chatumm_kit.components.vit.ViTEncoder` alone on a ShapesChat attribute probe.

Each image holds one object; two linear heads over the mean of the ViT's features (after ``post_layernorm``, before
the connector) predict its colour and its shape, trained with the sum of the two cross-entropies. The encoder holds
the architecture; this system holds the probe heads and the training settings, stores the encoder's arguments and
builds it in :meth:`configure_model` (ARCHITECTURE "Recipes"). At setup it checks that the datamodule's label counts
match its heads. A ViT trained here can initialise ChatUMM's (same arguments, ``vit.`` state-dict keys).

Example (YAML, ``recipes/shapes/vit_probe.yaml``):

.. code-block:: yaml

    system:
      _component_: chatumm_kit.systems.vit_probe.ViTProbeSystem
      vit: {patch_size: 8, hidden: 64, num_layers: 2, num_heads: 4, mlp_dim: 256, max_patches_per_side: 16,
            llm_hidden: 64}
      num_colours: 6
      num_shapes: 5
      optimizer: {lr: 1.0e-3}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from chatumm_kit.components.vit import ViTEncoder, ViTPatches
from chatumm_kit.training.optim import OptimizerSpec

__all__ = ["ViTProbeSystem"]


class ViTProbeSystem(L.LightningModule):
    """Colour and shape of the one object in each image, from mean-pooled ViT features.

    Args:
        vit: :class:`~chatumm_kit.components.vit.ViTEncoder` keyword arguments.
        num_colours / num_shapes: label counts (the world's palette and shapes).
        optimizer: :class:`~chatumm_kit.training.optim.OptimizerSpec` arguments, over the encoder and the heads.

    Shapes:
        ``logits(images [B, 3, H, W]) -> (colour [B, num_colours], shape [B, num_shapes])``.

    Logs ``train/loss``, ``val/loss``, ``val/colour_accuracy`` and ``val/shape_accuracy``.
    """

    def __init__(
        self, *, vit: Mapping[str, Any], num_colours: int, num_shapes: int, optimizer: Mapping[str, Any]
    ) -> None:
        super().__init__()
        OptimizerSpec(**optimizer)  # fail at construction, naming the bad setting
        self.save_hyperparameters()
        self.vit: ViTEncoder | None = None
        self.colour_head: nn.Linear | None = None
        self.shape_head: nn.Linear | None = None

    def configure_model(self) -> None:
        """Build the encoder and the heads once."""
        if self.vit is not None:
            return
        self.vit = ViTEncoder(**self.hparams.vit)
        self.colour_head = nn.Linear(self.vit.hidden, self.hparams.num_colours)
        self.shape_head = nn.Linear(self.vit.hidden, self.hparams.num_shapes)

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        for name in ("num_colours", "num_shapes"):
            have = getattr(data, name, None)
            if have is not None and have != self.hparams[name]:
                raise ValueError(
                    f"ViTProbeSystem: the data has {have} labels for {name} but system.{name} is {self.hparams[name]}"
                )

    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Colour and shape logits of ``[B, 3, H, W]`` images (all of one size, ViT-normalised)."""
        views = ViTPatches.cat([self.vit.patchify(image) for image in images])
        feats = self.vit.features(views.patches, views.patch_rc, views.grid_hw)  # [B * n, hidden]
        pooled = feats.view(images.shape[0], -1, feats.shape[-1]).mean(dim=1)
        return self.colour_head(pooled), self.shape_head(pooled)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        images, colour, shape = batch
        colour_logits, shape_logits = self.logits(images)
        loss = F.cross_entropy(colour_logits, colour) + F.cross_entropy(shape_logits, shape)
        return loss, colour_logits.argmax(-1) == colour, shape_logits.argmax(-1) == shape

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, colour_ok, shape_ok = self._loss(batch)
        n = batch[0].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=n)
        self.log("val/colour_accuracy", colour_ok.float().mean(), batch_size=n)
        self.log("val/shape_accuracy", shape_ok.float().mean(), batch_size=n)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OptimizerSpec(**self.hparams.optimizer).build(self)
