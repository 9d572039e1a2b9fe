"""`TextLMSystem`: trains a :class:`~chatumm_kit.components.mot.MoTBackbone` alone, as a text-only language model.

The backbone holds the architecture and the objective (:meth:`~chatumm_kit.components.mot.MoTBackbone.next_token_loss`,
all tokens routed to the understanding expert); this system holds the training settings (the optimizer) and stores
the backbone's arguments, building it in :meth:`configure_model` (ARCHITECTURE "Recipes"). At setup it checks that
the datamodule's tokenizer fits the backbone's token table. A backbone trained here initialises ChatUMM's
understanding expert, as a Qwen2 checkpoint does for BAGEL (SPEC §5).

Example (YAML, ``recipes/shapes/mot_text_lm.yaml``):

.. code-block:: yaml

    system:
      _component_: chatumm_kit.systems.text_lm.TextLMSystem
      backbone: {vocab_size: 512, hidden_size: 128, num_layers: 4, num_heads: 4, num_kv_heads: 2, head_dim: 32,
                 intermediate_size: 384}
      optimizer: {lr: 1.0e-3, weight_decay: 0.05}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from chatumm_kit.components.mot import MoTBackbone
from chatumm_kit.training.optim import OptimizerSpec

__all__ = ["TextLMSystem"]


class TextLMSystem(L.LightningModule):
    """Next-token cross-entropy on ``[B, T]`` rows of token ids (e.g. from
    :class:`~chatumm_kit.data.text.TextLMDataModule`).

    Args:
        backbone: :class:`~chatumm_kit.components.mot.MoTBackbone` keyword arguments.
        optimizer: :class:`~chatumm_kit.training.optim.OptimizerSpec` arguments (``lr``, ``weight_decay``, ...).

    Logs ``train/loss`` and ``val/loss``.
    """

    def __init__(self, *, backbone: Mapping[str, Any], optimizer: Mapping[str, Any]) -> None:
        super().__init__()
        OptimizerSpec(**optimizer)  # fail at construction, naming the bad setting
        self.save_hyperparameters()
        self.backbone: MoTBackbone | None = None

    def configure_model(self) -> None:
        """Build the backbone once."""
        if self.backbone is None:
            self.backbone = MoTBackbone(**self.hparams.backbone)

    def setup(self, stage: str) -> None:
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        vocab = self.hparams.backbone["vocab_size"]
        if tokenizer is not None and tokenizer.vocab_size > vocab:
            raise ValueError(
                f"TextLMSystem: the data's tokenizer has {tokenizer.vocab_size} tokens but system.backbone.vocab_size "
                f"is {vocab}"
            )

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.backbone.next_token_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.shape[0])
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.backbone.next_token_loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OptimizerSpec(**self.hparams.optimizer).build(self.backbone)
