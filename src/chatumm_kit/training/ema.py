"""Exponential moving average (EMA) of model weights that stays shard-local under FSDP2, plus its Lightning callback.

BAGEL releases EMA weights (SPEC §5, ``ema.safetensors``). Lightning's own weight averaging keeps a full copy of the
model and does not support sharded models, so this module keeps one shadow tensor per trainable parameter **with
the parameter's own layout**: a plain tensor under DDP or on one device, a ``DTensor`` with the same mesh and
placements under FSDP2. The update ``ema ← decay·ema + (1 − decay)·param`` (``ema.lerp_(param, 1 − decay)``) then
runs on each rank's local shard only — no gathers, and memory per rank is the sharded parameter size.

Checkpoints (how a resume restores the EMA exactly):

* plain tensors (DDP, one device): the shadow travels in the callback's ``state_dict`` (rank 0 writes it; every
  rank reads it);
* ``DTensor`` shadows with ``ModelParallelStrategy(save_distributed_checkpoint=True)``: the callback adds its shards
  to the checkpoint's ``"state_dict"`` under :data:`EMA_KEY_PREFIX` during ``on_save_checkpoint``, so
  ``torch.distributed.checkpoint`` writes them shard by shard beside the model; on resume they are read back from
  the checkpoint folder (``trainer.ckpt_path``) into the freshly created shadows;
* ``DTensor`` shadows with a full (single-file) checkpoint: gathered into the callback state like the model
  itself, and re-sharded on load.

Only trainable floating-point parameters are averaged; buffers and frozen weights are taken from the model when
exporting (:func:`chatumm_kit.training.checkpoints.export_safetensors` with ``use_ema=True``).

Example:
    >>> net = torch.nn.Linear(2, 1, bias=False)
    >>> w0 = net.weight.detach().clone()
    >>> ema = EMAWeights(module=net, decay=0.5)
    >>> with torch.no_grad():
    ...     _ = net.weight.fill_(1.0)
    >>> ema.update(net)  # 0.5·w0 + 0.5·1
    >>> with ema.swapped(net):
    ...     torch.allclose(net.weight, 0.5 * w0 + 0.5)
    True
    >>> net.weight.tolist()
    [[1.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["EMA_CALLBACK_MARKER", "EMA_KEY_PREFIX", "EMACallback", "EMAWeights", "state_key_of"]

EMA_KEY_PREFIX = "_ema."
"""Prefix of EMA entries inside a sharded checkpoint's ``"state_dict"`` (``_ema.<parameter name>``)."""

EMA_CALLBACK_MARKER = "chatumm_kit.training.ema/1"
"""Value of ``"format"`` in :class:`EMACallback` state, so exporters can find it among other callbacks' states."""

# Wrapper fragments that appear in named_parameters() but not in state-dict keys (activation-checkpoint wrappers,
# torch.compile, FSDP1); dropping them makes EMA names equal to the model's state-dict keys.
_WRAPPER_FRAGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def state_key_of(name: str) -> str:
    """``named_parameters()`` name → state-dict key (wrapper fragments removed).

    Example:
        >>> state_key_of("layers.0._checkpoint_wrapped_module.fc.weight")
        'layers.0.fc.weight'
    """
    for fragment in _WRAPPER_FRAGMENTS:
        name = name.replace(fragment, "")
    return name


def _local(t: torch.Tensor) -> torch.Tensor:
    # Under no_grad, DTensor.to_local() is the shard itself, so in-place ops on it update the DTensor.
    return t.to_local() if isinstance(t, DTensor) else t


def _tracked(module: nn.Module) -> dict[str, torch.Tensor]:
    return {state_key_of(n): p for n, p in module.named_parameters() if p.requires_grad and torch.is_floating_point(p)}


class EMAWeights:
    """Shadow copies of ``module``'s trainable floating-point parameters and the EMA update on them.

    Args:
        module: the (possibly FSDP2-sharded) module whose parameters are averaged; create the EMA **after** sharding
            so shadows copy the sharded layout.
        decay: weight of the old average per update, in ``[0, 1]``.

    Attributes:
        shadow: ``{state-dict key: tensor}``, each tensor with its parameter's shape, dtype, device and (for
            ``DTensor``) placements.
        num_updates: how many :meth:`update` calls were applied.

    Example:
        >>> ema = EMAWeights(module=torch.nn.Linear(3, 2), decay=0.99)
        >>> sorted(ema.shadow), ema.num_updates
        (['bias', 'weight'], 0)
    """

    def __init__(self, *, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMAWeights.decay: must be in [0, 1], got {decay}")
        self.decay = float(decay)
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {k: p.detach().clone() for k, p in _tracked(module).items()}
        self.num_updates = 0

    def _params(self, module: nn.Module) -> list[torch.Tensor]:
        params = _tracked(module)
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())
            extra = sorted(params.keys() - self.shadow.keys())
            raise KeyError(
                f"EMAWeights: {type(module).__name__}'s trainable parameters changed since the EMA was created "
                f"(missing: {missing}, new: {extra})"
            )
        return [params[k] for k in self.shadow]

    @torch.no_grad()
    def update(self, module: nn.Module, *, decay: float | None = None) -> None:
        """``shadow ← decay·shadow + (1 − decay)·param`` on each local shard (no communication)."""
        d = self.decay if decay is None else float(decay)
        shadows = [_local(s) for s in self.shadow.values()]
        params = [_local(p.detach()).to(s.dtype) for p, s in zip(self._params(module), shadows)]
        if shadows:
            torch._foreach_lerp_(shadows, params, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_from(self, module: nn.Module) -> None:
        """``shadow ← param`` (used before the EMA starts, so the average begins at the current weights)."""
        shadows = [_local(s) for s in self.shadow.values()]
        if shadows:
            torch._foreach_copy_(shadows, [_local(p.detach()) for p in self._params(module)])

    @contextmanager
    def swapped(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``module`` (evaluate or export with them); restore on exit.

        Copies in place, so FSDP2's sharded storage and optimizer references stay valid. Holds one extra copy of
        the (local) trainable weights while inside.
        """
        params = [_local(p) for p in self._params(module)]
        with torch.no_grad():
            backup = [p.clone() for p in params]
            if params:
                torch._foreach_copy_(params, [_local(s).to(p.dtype) for s, p in zip(self.shadow.values(), params)])
        try:
            yield module
        finally:
            with torch.no_grad():
                if params:
                    torch._foreach_copy_(params, backup)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors as they are (``DTensor`` shards stay sharded)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into the shadows; keys must match exactly.

        Each value may be a tensor of the full (global) shape — it is re-sharded onto a ``DTensor`` shadow's
        placements — or a ``DTensor`` of the shadow's own layout.
        """
        missing, unexpected = sorted(self.shadow.keys() - state.keys()), sorted(state.keys() - self.shadow.keys())
        if missing or unexpected:
            raise KeyError(f"EMAWeights.load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for k, dst in self.shadow.items():
            src = state[k]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"EMAWeights.load_state_dict: {k}: shape {tuple(src.shape)} != {tuple(dst.shape)}")
            if isinstance(dst, DTensor) and not isinstance(src, DTensor):
                src = distribute_tensor(src.to(dst.device_mesh.device_type), dst.device_mesh, dst.placements)
            _local(dst).copy_(_local(src))


class EMACallback(L.Callback):
    """Keeps an :class:`EMAWeights` of the LightningModule, updated after optimizer steps; saved in checkpoints.

    Schedule, with ``s`` = ``trainer.global_step`` right after an optimizer step (1 for the first step):
    ``s <= start_step`` → the shadow copies the weights (the average starts from the weights at ``start_step``);
    otherwise, when ``(s - start_step) % update_every == 0`` → one EMA update with ``decay`` (the decay is per
    update, not per step). Gradient accumulation is handled: updates follow optimizer steps, not batches.

    Works with DDP, one device, and ``ModelParallelStrategy``/FSDP2 (sharded checkpoint folders included); refuses
    Lightning's FSDP1 ``FSDPStrategy`` (flat-parameter shards do not round-trip through the callback state). One
    per Trainer (Lightning refuses two callbacks with the same state key).

    Args:
        decay: EMA decay per update, in ``[0, 1]``.
        update_every: optimizer steps between updates (>= 1).
        start_step: optimizer steps during which the shadow just tracks the weights.

    Attributes:
        ema: the :class:`EMAWeights` (``None`` before ``fit`` starts); ``callback.ema.swapped(module)`` evaluates
            with EMA weights.

    Example:
        >>> trainer = L.Trainer(callbacks=[EMACallback(decay=0.999)])  # doctest: +SKIP
    """

    def __init__(self, *, decay: float = 0.999, update_every: int = 1, start_step: int = 0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMACallback.decay: must be in [0, 1], got {decay}")
        if update_every < 1 or start_step < 0:
            raise ValueError(
                f"EMACallback: need update_every >= 1 and start_step >= 0, got {update_every}, {start_step}"
            )
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.start_step = int(start_step)
        self.ema: EMAWeights | None = None
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, Any] | None = None
        self._last_step: int | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(trainer.strategy, FSDPStrategy):
            raise TypeError(
                "EMACallback: Lightning's FSDPStrategy (FSDP1) is not supported; use "
                "chatumm_kit.training.strategies.fsdp2() (ModelParallelStrategy + FSDP2) for sharded EMA"
            )
        self._trainer = trainer

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After strategy.setup: configure_model() has built (and sharded) the parameters.
        self.ema = EMAWeights(module=pl_module, decay=self.decay)
        if self._pending is not None:  # DDP/single device restore the checkpoint before setup
            self._restore(self._pending)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.ema is None or step == self._last_step:  # no optimizer step in this batch (accumulation)
            return
        self._last_step = step
        if step <= self.start_step:
            self.ema.copy_from(pl_module)
        elif (step - self.start_step) % self.update_every == 0:
            self.ema.update(pl_module)

    # --- checkpointing ---------------------------------------------------------------------------------------
    def _sharded_shadow(self) -> bool:
        return self.ema is not None and any(isinstance(t, DTensor) for t in self.ema.shadow.values())

    def _writes_sharded(self, trainer: L.Trainer) -> bool:
        return self._sharded_shadow() and bool(getattr(trainer.strategy, "_save_distributed_checkpoint", False))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": EMA_CALLBACK_MARKER,
            "decay": self.decay,
            "update_every": self.update_every,
            "start_step": self.start_step,
        }
        if self.ema is None:
            return state
        state["num_updates"] = self.ema.num_updates
        if self._trainer is not None and self._writes_sharded(self._trainer):
            state["shadow_in"] = "state_dict"  # shards written by on_save_checkpoint
        else:
            # Collective when sharded: every rank calls state_dict() while dumping a checkpoint.
            state["shadow"] = {
                k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in self.ema.shadow.items()
            }
        return state

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and self._writes_sharded(trainer):
            checkpoint["state_dict"].update({EMA_KEY_PREFIX + k: v for k, v in self.ema.shadow.items()})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != EMA_CALLBACK_MARKER:
            raise ValueError(f"EMACallback.load_state_dict: not an EMACallback state (keys {sorted(state_dict)})")
        if self.ema is None:
            self._pending = dict(state_dict)
        else:  # ModelParallelStrategy restores after setup
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.ema is not None
        self._pending = None
        if "num_updates" not in state:  # saved before fit started: nothing to restore
            return
        if "shadow" in state:
            self.ema.load_state_dict(state["shadow"])
        elif state.get("shadow_in") == "state_dict":
            self.ema.load_state_dict(self._read_sharded_shadow())
        else:
            raise ValueError("EMACallback: checkpoint state names no EMA weights")
        self.ema.num_updates = int(state["num_updates"])

    def _read_sharded_shadow(self) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        path = None if self._trainer is None else self._trainer.ckpt_path
        if path is None or not Path(path).is_dir():
            raise FileNotFoundError(
                f"EMACallback: the checkpoint keeps EMA shards in its folder, but trainer.ckpt_path={path!r} is not a "
                "folder"
            )
        assert self.ema is not None
        # Fresh DTensors of the shadow layout; dcp.load fills their local shards from the folder in place.
        target = {EMA_KEY_PREFIX + k: torch.empty_like(v) for k, v in self.ema.shadow.items()}
        dcp.load({"state_dict": target}, checkpoint_id=path)
        return {k[len(EMA_KEY_PREFIX) :]: v for k, v in target.items()}
