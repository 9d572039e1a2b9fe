"""Lightning callbacks of the kit that are not tied to one system."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

__all__ = ["ExportAutoencoder", "load_autoencoder_file"]


class ExportAutoencoder(L.Callback):
    """At the end of fitting a :class:`~chatumm_kit.components.vae.VAELatentHead`, write its autoencoder to
    ``path`` (safetensors) with the latent normalisation fitted on validation images.

    The file holds the bare ``AutoencoderKL`` state dict; ``scaling_factor`` and ``shift_factor`` (so that
    normalised latents have zero mean and unit variance, SPEC §4 ``z ← scale·(z − shift)``) travel in its metadata.
    """

    def __init__(self, *, path: str, stats_batches: int = 4) -> None:
        self.path = Path(path)
        self.stats_batches = stats_batches

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        images: list[torch.Tensor] = []
        loaders = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else []
        for i, batch in enumerate(loaders):
            if i >= self.stats_batches:
                break
            images.extend(batch.to(pl_module.device))
        scale, shift = pl_module.fit_latent_stats(images) if images else (1.0, 0.0)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in pl_module.autoencoder.state_dict().items()}
        tmp = self.path.with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"scaling_factor": repr(scale), "shift_factor": repr(shift)})
        tmp.replace(self.path)  # atomic: a killed run never leaves a half-written VAE that looks complete
        print(f"autoencoder: {self.path} (scaling_factor={scale:.4f}, shift_factor={shift:.4f})")


def load_autoencoder_file(autoencoder: torch.nn.Module, path: str | Path) -> tuple[float, float]:
    """Load an :class:`ExportAutoencoder` file into ``autoencoder``; return ``(scaling_factor, shift_factor)``.

    Raises ``ValueError`` listing missing and unexpected keys.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder weights not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    missing, unexpected = autoencoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: autoencoder keys do not match: missing {missing}, unexpected {unexpected}")
    return float(meta.get("scaling_factor", 1.0)), float(meta.get("shift_factor", 0.0))
