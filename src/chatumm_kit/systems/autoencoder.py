"""`AutoencoderSystem`: fits the autoencoder of a :class:`~chatumm_kit.components.vae.VAELatentHead` on its own.

The head holds the architecture and the objective (:meth:`~chatumm_kit.components.vae.VAELatentHead.autoencoder_loss`);
this system holds the training settings — the loss's reconstruction kind and KL weight, and the optimizer over the
autoencoder's parameters (the LLM-facing layers are trained with the unified model, not here). It stores the head's
arguments, not a built head, and builds it in :meth:`configure_model` (ARCHITECTURE "Recipes").

Example (YAML, ``recipes/shapes/vae.yaml``):

.. code-block:: yaml

    system:
      _component_: chatumm_kit.systems.autoencoder.AutoencoderSystem
      head: {hidden: 64, autoencoder_kwargs: {...}}
      reconstruction_loss: mse
      kl_weight: 1.0e-5
      optimizer: {lr: 2.0e-3}
      schedule: {_component_: chatumm_kit.training.schedules.CosineSchedule, total_steps: 900, min_ratio: 0.05}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import lightning as L
import torch

from chatumm_kit.components.vae import ReconstructionLoss, VAELatentHead
from chatumm_kit.training.optim import OPTIMIZERS, OptimizerSpec

__all__ = ["AutoencoderSystem"]


def _count(batch: torch.Tensor | Sequence[torch.Tensor]) -> int:
    return batch.shape[0] if isinstance(batch, torch.Tensor) else len(batch)


class AutoencoderSystem(L.LightningModule):
    """Fits a VAE latent head's autoencoder: reconstruction + ``kl_weight`` · KL, optimised with ``optimizer``.

    Args:
        head: :class:`~chatumm_kit.components.vae.VAELatentHead` keyword arguments (with ``autoencoder_kwargs``).
        reconstruction_loss: ``"l1"`` or ``"mse"``.
        kl_weight: weight of the mean-per-latent-element KL.
        optimizer: :class:`~chatumm_kit.training.optim.OptimizerSpec` arguments (``lr``, ``weight_decay``, ...),
            applied to the autoencoder's parameters.
        schedule: a ``_component_`` node building a :class:`~chatumm_kit.training.schedules.ScheduleSpec`; ``None``
            keeps the peak rate throughout.

    Logs ``vae/loss``, ``vae/reconstruction``, ``vae/kl`` (training) and ``vae/val_reconstruction`` (validation).
    """

    # Handed over unbuilt by the recipe engine and built in configure_optimizers (as ChatUMMSystem does).
    config_arguments: ClassVar[frozenset[str]] = frozenset({"schedule"})

    def __init__(
        self,
        *,
        head: Mapping[str, Any],
        reconstruction_loss: ReconstructionLoss = "l1",
        kl_weight: float = 1e-4,
        optimizer: Mapping[str, Any],
        schedule: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from chatumm_kit.training.schedules import schedule_node

        schedule = schedule_node(schedule)  # None: constant, no warm-up
        if reconstruction_loss not in ("l1", "mse"):
            raise ValueError(
                f"AutoencoderSystem: reconstruction_loss must be 'l1' or 'mse', got {reconstruction_loss!r}"
            )
        OptimizerSpec(**optimizer)  # fail at construction, naming the bad setting
        self.save_hyperparameters()
        self.head: VAELatentHead | None = None

    def configure_model(self) -> None:
        """Build the head once, its autoencoder trainable."""
        if self.head is not None:
            return
        self.head = VAELatentHead(**self.hparams.head)
        self.head.set_autoencoder_frozen(False)

    def training_step(self, batch: torch.Tensor | Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """``batch``: ``[B, 3, H, W]`` or a list of ``[3, H, W]`` images in ``[-1, 1]``."""
        loss = self.head.autoencoder_loss(
            batch, reconstruction=self.hparams.reconstruction_loss, kl_weight=self.hparams.kl_weight
        )
        self.log_dict(
            {"vae/loss": loss.total, "vae/reconstruction": loss.reconstruction, "vae/kl": loss.kl},
            prog_bar=True,
            batch_size=_count(batch),
        )
        return loss.total

    def validation_step(self, batch: torch.Tensor | Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """:meth:`~chatumm_kit.components.vae.VAELatentHead.reconstruction_error`, logged as ``vae/val_reconstruction``."""
        err = self.head.reconstruction_error(batch)
        self.log("vae/val_reconstruction", err, prog_bar=True, batch_size=_count(batch))
        return err

    def configure_optimizers(self) -> dict[str, Any]:
        from chatumm_kit.config import instantiate

        spec = OptimizerSpec(**self.hparams.optimizer)
        # One group over the autoencoder's parameters (weight decay, if any, on every tensor), as the shapes VAE has
        # always been fitted.
        opt = OPTIMIZERS[spec.name](
            self.head.autoencoder.parameters(),
            lr=spec.lr,
            weight_decay=spec.weight_decay,
            betas=spec.betas,
            eps=spec.eps,
        )
        schedule = instantiate(self.hparams.schedule, path="system.schedule")  # a ScheduleSpec
        return {"optimizer": opt, "lr_scheduler": schedule.lightning_config(opt)}
