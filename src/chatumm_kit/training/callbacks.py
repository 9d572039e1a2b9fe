"""Lightning callbacks of the kit that are not tied to one system."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

__all__ = ["ExportAutoencoder", "DataHealthLogger", "FinalWeightsInLast", "GenerationPreview", "RecipeInCheckpoint"]


class RecipeInCheckpoint(L.Callback):
    """Store the resolved recipe (YAML text) in every checkpoint under ``"recipe"``: a checkpoint says how it was made.

    ``chatumm train`` adds it to every run.
    """

    def __init__(self, *, recipe: str) -> None:
        self.recipe = recipe

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["recipe"] = self.recipe


class FinalWeightsInLast(L.Callback):
    """Make ``last.ckpt`` hold the weights training ended with.

    Lightning's ``ModelCheckpoint(save_last=True, every_n_train_steps=N)`` refreshes ``last`` only when it saves a
    step checkpoint, so a run whose ``max_steps`` is not a multiple of ``N`` ends with ``last`` at the last multiple
    (e.g. 1 000 of 1 800 steps) and the final steps are lost to ``chat``, ``eval`` and export. At the end of
    training this saves the final state to ``last`` when the newest checkpoint is older than the final step. It runs
    on every rank (saving is collective under DDP and FSDP2). ``chatumm train`` adds it to every run.

    Example:
        >>> trainer = L.Trainer(callbacks=[ModelCheckpoint(save_last=True, every_n_train_steps=4),
        ...                                FinalWeightsInLast()], max_steps=6)  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.saved_step: int | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_step = int(checkpoint.get("global_step", trainer.global_step))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cb = trainer.checkpoint_callback
        # No last written yet: ModelCheckpoint's own on_train_end (it runs after this callback) writes it now.
        if cb is None or not cb.save_last or not cb.last_model_path or trainer.global_step == 0:
            return
        if self.saved_step != trainer.global_step:
            trainer.save_checkpoint(cb.last_model_path)


class ExportAutoencoder(L.Callback):
    """At the end of fitting a :class:`~chatumm_kit.components.vae.VAELatentHead` (the ``head`` of an
    :class:`~chatumm_kit.systems.autoencoder.AutoencoderSystem`), write its autoencoder to ``path`` (safetensors)
    with the latent normalisation fitted on validation images.

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
        head = pl_module.head
        scale, shift = head.latent_stats(images) if images else (1.0, 0.0)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in head.autoencoder.state_dict().items()}
        tmp = self.path.with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"scaling_factor": repr(scale), "shift_factor": repr(shift)})
        tmp.replace(self.path)  # atomic: a killed run never leaves a half-written VAE that looks complete
        print(f"autoencoder: {self.path} (scaling_factor={scale:.4f}, shift_factor={shift:.4f})")


class DataHealthLogger(L.Callback):
    """Log the datamodule's skip counts (``data/samples_ok``, ``data/skipped``, ``data/skip/<reason>``) every N steps.

    Works with any datamodule that has ``health(stage) -> DataHealth`` (``DialogueDataModule`` does).
    """

    def __init__(self, *, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        health = getattr(trainer.datamodule, "health", None)
        if not callable(health) or trainer.global_step % self.every_n_steps:
            return
        for key, value in health("train").metrics().items():
            pl_module.log(key, value, on_step=True, batch_size=1)


class GenerationPreview(L.Callback):
    """Every N steps, answer fixed prompts with the model being trained and log the images as one grid.

    Uses :class:`~chatumm_kit.inference.session.ChatSession`, so the preview goes through exactly the chat path
    (intent prediction included: a prompt the model answers with text gets a grey tile). The tokenizer is the one
    named by the system's model spec (``system.model.tokenizer``).

    Args:
        prompts: user messages, one per tile.
        every_n_steps: how often (also at the last step).
        image_size: ``(H, W)`` of generated images.
        num_steps: Euler steps per image (few: this is a preview).
        seed: sampler seed, fixed so previews are comparable across steps.
    """

    def __init__(
        self,
        *,
        prompts: list[str],
        every_n_steps: int = 200,
        image_size: tuple[int, int] = (32, 32),
        num_steps: int = 10,
        seed: int = 0,
    ) -> None:
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.image_size = tuple(image_size)
        self.num_steps = num_steps
        self.seed = seed
        self._tokenizer = None

    def _tokenizer_of(self, pl_module: L.LightningModule):
        from chatumm_kit.components.tokenizer import ChatTokenizer

        if self._tokenizer is None:
            path = (getattr(pl_module.hparams, "model", None) or {}).get("tokenizer")
            self._tokenizer = ChatTokenizer.from_file(path) if path else None
        return self._tokenizer

    @torch.no_grad()
    def render(self, model: torch.nn.Module, tokenizer) -> torch.Tensor:
        """``[len(prompts), 3, H, W]`` uint8: the first image of each reply, grey when the model answered in text."""
        from chatumm_kit.inference.sampler import SamplerConfig
        from chatumm_kit.inference.session import ChatSession, SessionConfig

        was_training = model.training
        model.eval()
        tiles = []
        try:
            config = SessionConfig.for_model(model, image_size=self.image_size)
            sampler = SamplerConfig(num_steps=self.num_steps, seed=self.seed)
            for prompt in self.prompts:
                session = ChatSession(model=model, tokenizer=tokenizer, config=config)
                session.add_user(text=prompt)
                reply = session.respond(sampler=sampler, max_new_tokens=16, max_segments=2)
                tile = reply.images[0] if reply.images else torch.full((3, *self.image_size), 128, dtype=torch.uint8)
                tiles.append(tile.cpu())
        finally:
            model.train(was_training)
        return torch.stack(tiles)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        last = trainer.max_steps is not None and step >= trainer.max_steps
        if trainer.global_rank != 0 or (step % self.every_n_steps and not last):
            return
        experiment = getattr(trainer.logger, "experiment", None)
        tokenizer = self._tokenizer_of(pl_module)
        if experiment is None or not hasattr(experiment, "add_image") or tokenizer is None:
            return
        from torchvision.utils import make_grid

        grid = make_grid(self.render(pl_module.model, tokenizer), nrow=len(self.prompts), padding=1, pad_value=0)
        experiment.add_image("preview/generated", grid, step)
