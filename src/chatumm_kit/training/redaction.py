"""Keeping environment values out of checkpoints and logged hyper-parameters (README "Bad input").

A recipe may pass ``${oc.env:VAR}`` values into a system or data module; their hyper-parameters then hold the value.
:class:`EnvironmentRedaction` writes ``${oc.env:VAR}`` in its place wherever Lightning stores hyper-parameters — in
each checkpoint and in what the logger records (``hparams.yaml``, TensorBoard) — while the run itself keeps using
the real value. ``chatumm train`` adds it to every run.

Example:
    >>> trainer = L.Trainer(callbacks=[EnvironmentRedaction()])  # doctest: +SKIP
"""

from __future__ import annotations

import lightning as L

from chatumm_kit.config.secrets import redact

__all__ = ["EnvironmentRedaction", "HPARAM_KEYS"]

# Where Lightning puts hyper-parameters in a checkpoint (module and datamodule).
HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")


class EnvironmentRedaction(L.Callback):
    """Replace environment values read by the recipe with ``${oc.env:VAR}`` in stored and logged hyper-parameters."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning logs ``hparams_initial`` (a copy of ``_hparams_initial``) after setup; the live hparams stay.
        for owner in (pl_module, trainer.datamodule):
            if owner is not None and getattr(owner, "_hparams_initial", None) is not None:
                owner._hparams_initial = type(owner._hparams_initial)(redact(dict(owner._hparams_initial)))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        for key in HPARAM_KEYS:
            if key in checkpoint:
                checkpoint[key] = redact(checkpoint[key])
