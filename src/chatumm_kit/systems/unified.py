"""`ChatUMMSystem`: the LightningModule that trains a ChatUMM model on packed dialogues.

The system stores *configs* (plain YAML values), not built modules, and builds the model in an idempotent
:meth:`configure_model` — so ``load_from_checkpoint`` works and FSDP can shard at build time (ARCHITECTURE.md).
The loss maths lives in :mod:`chatumm_kit.training.losses`; this file only wires it to Lightning.

Example (YAML):

.. code-block:: yaml

    system:
      _component_: chatumm_kit.systems.unified.ChatUMMSystem
      model: {_component_: chatumm_kit.presets.chatumm_tiny, tokenizer: data/shapes/tokenizer.json}
      optimizer: {lr: 3.0e-4, weight_decay: 0.05}
      schedule: {_component_: chatumm_kit.training.schedules.CosineSchedule, warmup_steps: 50,
                 total_steps: "${trainer.max_steps}"}
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch

from chatumm_kit.components.batch import PackedBatch
from chatumm_kit.model import ChatUMM
from chatumm_kit.training.losses import objective

__all__ = ["FreezeSpec", "ChatUMMSystem", "MASTER_DTYPES"]

MASTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_SPEC_PATH_KEYS = frozenset({"tokenizer", "vae_weights", "path"})


@dataclass(frozen=True)
class FreezeSpec:
    """Which parts get no gradient.

    Attributes:
        vit: the ViT encoder (and its connector).
        vae: the VAE autoencoder (frozen by default; the latent head's connectors stay trainable).
        understanding: the understanding expert's layer weights and final norm (SPEC §4 "freeze understanding").
        embeddings: ``embed_tokens`` and ``lm_head``, shared by both experts. Keep them trainable when the
            understanding expert is frozen: they are then the only trainable path of the CE loss on text replies
            and intent tokens (SPEC §2), which is what makes a model conversational.
    """

    vit: bool = False
    vae: bool = True
    understanding: bool = False
    embeddings: bool = False


class ChatUMMSystem(L.LightningModule):
    """Trains :class:`~chatumm_kit.model.ChatUMM` with CE + flow-matching MSE (SPEC §4).

    Args:
        model: model spec for :func:`chatumm_kit.presets.build_model`: a ``_component_`` node naming a callable that
            returns a ChatUMM (a preset such as ``chatumm_kit.presets.chatumm_tiny``) with its keyword arguments;
            an old checkpoint's ``{preset: NAME}`` spec is read as its ``_component_`` form.
        optimizer: keyword arguments of :func:`chatumm_kit.training.optim.build_optimizer`.
        schedule: a ``_component_`` node building a :class:`~chatumm_kit.training.schedules.ScheduleSpec`
            (``ConstantSchedule`` or ``CosineSchedule`` with its keyword arguments); None: constant, no warm-up.
        ce_weight: weight of the text loss.
        mse_weight: weight of the image loss.
        freeze: parts to freeze (keys of :class:`FreezeSpec`).
        adapter: a ``_component_`` node building a :class:`~chatumm_kit.training.adapters.LoraSpec`: LoRA adapters
            are injected after ``init_from`` and everything but them (and the spec's ``trainable``) is frozen.
        init_from: a safetensors file (kit layout) to initialise the model from before training.
        master_dtype: dtype every floating-point weight is cast to after building (``float32``: fp32 master
            weights and optimizer state whatever the checkpoint's dtype; ``null``: keep the built dtypes). Mixed
            precision (bf16 compute) comes from ``trainer.precision: bf16-mixed`` or FSDP2's ``mixed_precision``.
        mask_image_every_n_steps: log a picture of one batch's attention mask every N steps (0: never).
        seed: seed of the flow-matching noise; each step's draw depends only on (seed, step, rank).
    """

    # The recipe engine hands these over as nodes, unbuilt: the model is built in configure_model, the schedule in
    # configure_optimizers, and the hyperparameters store the nodes (a checkpoint rebuilds its model).
    config_arguments: ClassVar[frozenset[str]] = frozenset({"model", "schedule", "adapter"})

    def __init__(
        self,
        *,
        model: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        ce_weight: float = 1.0,
        mse_weight: float = 1.0,
        freeze: dict[str, bool] | None = None,
        adapter: dict[str, Any] | None = None,
        init_from: str | None = None,
        master_dtype: str | None = "float32",
        mask_image_every_n_steps: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from chatumm_kit.presets import check_model_spec, model_spec
        from chatumm_kit.training.schedules import schedule_node

        model = model_spec(model)  # old {preset: NAME} specs (checkpoints) become _component_ nodes
        schedule = schedule_node(schedule)  # likewise old {kind: NAME} schedules; None: constant, no warm-up
        check_model_spec(model)  # fail at construction, naming the bad key, not after data is ready
        # Files the spec names are stored as absolute paths, so a checkpoint loads from any working directory.
        model = {
            k: str(Path(v).resolve()) if k in _SPEC_PATH_KEYS and isinstance(v, str) else v for k, v in model.items()
        }
        init_from = str(Path(init_from).resolve()) if init_from else None
        self.freeze = FreezeSpec(**(freeze or {}))
        if master_dtype is not None and master_dtype not in MASTER_DTYPES:
            raise ValueError(f"master_dtype: {master_dtype!r} is not one of {', '.join(MASTER_DTYPES)} (or None)")
        self.save_hyperparameters()
        self.model: ChatUMM | None = None
        self._last_step_time: float | None = None
        self._val_sums = torch.zeros(4, dtype=torch.float64)

    @staticmethod
    def check_recipe_arguments(kwargs: dict[str, Any]) -> list[str]:
        """``chatumm validate`` hook: freeze keys, and a model spec written the old way. The model node itself is
        a ``_component_`` node, checked against its callable's signature like every other node."""
        problems = []
        model = kwargs.get("model")
        if isinstance(model, dict) and "_component_" not in model:
            problems.append(
                "model: name the model with _component_ (e.g. _component_: chatumm_kit.presets.chatumm_tiny); "
                + ("the preset: form is read only from old checkpoints" if "preset" in model else "none given")
            )
        unknown = set(kwargs.get("freeze") or {}) - set(FreezeSpec.__dataclass_fields__)
        known = ", ".join(FreezeSpec.__dataclass_fields__)
        problems += [f"freeze.{k}: unknown part (known: {known})" for k in sorted(unknown)]
        dtype = kwargs.get("master_dtype")
        if dtype is not None and dtype not in MASTER_DTYPES:
            problems.append(f"master_dtype: {dtype!r} is not one of {', '.join(MASTER_DTYPES)} (or null: keep)")
        return problems

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        """Build the model once (Lightning may call this more than once, e.g. under FSDP)."""
        if self.model is not None:
            return
        from chatumm_kit.config import instantiate
        from chatumm_kit.presets import build_model
        from chatumm_kit.training.checkpoints import load_safetensors_into

        model = build_model(self.hparams.model)
        if self.hparams.init_from:
            load_safetensors_into(model, self.hparams.init_from)
        if self.hparams.master_dtype is not None:
            # The weights the optimizer updates, whatever dtype the release was stored in (BAGEL's ema.safetensors
            # is bf16): compute precision is the trainer's autocast or FSDP2's MixedPrecisionPolicy, not this.
            model.to(MASTER_DTYPES[self.hparams.master_dtype])
        self._apply_freeze(model)
        data = self.trainer.datamodule if self._trainer is not None else None
        if callable(getattr(data, "use_model_settings", None)):  # before the first batch is packed
            data.use_model_settings(model)  # the stream settings the model fixes; a mismatch is a one-line error
        if self.hparams.get("adapter"):
            from chatumm_kit.training.adapters import apply_lora

            apply_lora(model, instantiate(self.hparams.adapter, path="system.adapter"))
        self.model = model
        shard = getattr(self.trainer.strategy, "shard_model", None) if self._trainer is not None else None
        if callable(shard):  # ModelParallelStrategy from chatumm_kit.training.strategies: FSDP2 per layer
            shard(self.model)

    def _apply_freeze(self, model: ChatUMM) -> None:
        if self.freeze.vit:
            model.vit.requires_grad_(False)
        # The flow loss can fine-tune the autoencoder's encoder too (its encode then keeps the graph).
        model.vae.set_autoencoder_frozen(self.freeze.vae)
        if self.freeze.understanding:
            model.backbone.freeze_understanding(embeddings=False)
        if self.freeze.embeddings:
            model.backbone.embed_tokens.requires_grad_(False)
            model.backbone.lm_head.requires_grad_(False)

    def configure_optimizers(self):
        from chatumm_kit.config import instantiate
        from chatumm_kit.training.optim import build_optimizer

        opt = build_optimizer(self.model, **(self.hparams.optimizer or {"lr": 3e-4}))
        schedule = instantiate(self.hparams.schedule, path="system.schedule")  # a ScheduleSpec
        return {"optimizer": opt, "lr_scheduler": schedule.lightning_config(opt)}

    # ------------------------------------------------------------------ steps
    def training_step_terms(self, batch: PackedBatch, *, generator: torch.Generator | None = None):
        """Forward + objective for one batch (the maths lives in :mod:`chatumm_kit.training.losses`)."""
        out = self.model(batch, generator=generator)
        return out, objective(out, ce_weight=self.hparams.ce_weight, mse_weight=self.hparams.mse_weight)

    def _step_generator(self, offset: int) -> torch.Generator:
        # Noise draws depend only on (seed, step, rank), so a resumed run continues exactly as if uninterrupted.
        seed = (self.hparams.seed * 1_000_003 + offset * 10_007 + self.global_rank) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        _, terms = self.training_step_terms(batch, generator=self._step_generator(self.global_step))
        # ce/mse are this rank's share of the global mean: summed over ranks they are the global mean.
        log = dict(on_step=True, on_epoch=False, sync_dist=True, reduce_fx="sum", batch_size=1)
        self.log("train/ce", terms.ce, prog_bar=True, **log)
        self.log("train/mse", terms.mse, prog_bar=True, **log)
        self.log("train/loss", self.hparams.ce_weight * terms.ce + self.hparams.mse_weight * terms.mse, **log)
        self.log("train/packing_efficiency", batch.packing_efficiency, on_step=True, batch_size=1)
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log(
                "train/tokens_per_s", batch.num_real_tokens / (now - self._last_step_time), prog_bar=True, batch_size=1
            )
        self._last_step_time = now
        every = self.hparams.mask_image_every_n_steps
        if every and self.global_step % every == 0:
            self._log_mask_image(batch)
        return terms.total

    def on_fit_start(self) -> None:
        """Refuse a data view sizing whose views outgrow the model's ViT or latent position tables (SPEC §4.1: 70
        patches, 64 latent tokens per side for BAGEL) now, not at the first large image."""
        sizing = getattr(self.trainer.datamodule, "view_sizing", None)
        if sizing is not None and self.model is not None:
            sizing.check_tables(
                vit_max_patches_per_side=self.model.vit_max_patches_per_side,
                max_latent_side=self.model.max_latent_side,
            )

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: PackedBatch, batch_idx: int) -> None:
        # Fixed noise per validation batch so validation loss is comparable across evaluations.
        out = self.model(batch, generator=self._step_generator(-1 - batch_idx))
        sums = torch.tensor([float(out.ce_sum), out.ce_count, float(out.mse_sum), out.mse_count], dtype=torch.float64)
        self._val_sums += sums.to(self._val_sums.device)

    def on_validation_epoch_end(self) -> None:
        # Token-weighted means over every validation batch of every rank (SPEC §4 normalisation).
        ce_sum, ce_n, mse_sum, mse_n = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        ce, mse = ce_sum / max(ce_n, 1.0), mse_sum / max(mse_n, 1.0)
        self.log("val/ce", ce, prog_bar=True, batch_size=1)
        self.log("val/mse", mse, prog_bar=True, batch_size=1)
        self.log("val/loss", self.hparams.ce_weight * ce + self.hparams.mse_weight * mse, batch_size=1)

    def on_before_optimizer_step(self, optimizer) -> None:
        from chatumm_kit.training.grad_norm import global_grad_norm

        # Before clipping; works on FSDP2's sharded DTensor gradients (a collective: every rank calls it).
        norm = global_grad_norm(self.model.parameters())
        if norm is not None:
            self.log("train/grad_norm", norm.float().cpu(), on_step=True, batch_size=1)

    def _log_mask_image(self, batch: PackedBatch) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or self.global_rank != 0:
            return
        image = self.model.mask_builder.mask_image(batch.splits)
        experiment.add_image("train/attention_mask", image, self.global_step)
