"""Optimizer construction: weight decay only where it regularises, and a typed spec buildable from YAML.

Weight decay pulls a weight towards zero. That is a sensible prior for the matrices of linear maps, but not for
norm gains (whose neutral value is one), biases, embedding tables (rows of rare tokens would decay towards zero
between their rare updates) or learned position tables. :func:`no_weight_decay_names` decides per parameter:

* owned directly by an embedding or a norm module (``nn.Embedding``, ``nn.EmbeddingBag``, ``nn.LayerNorm``,
  ``nn.RMSNorm``, ``nn.GroupNorm``, batch/instance norms, :class:`chatumm_kit.components.layers.RMSNorm`) — a tied
  ``lm_head`` that shares the embedding's tensor is therefore not decayed either;
* fewer than two dimensions (biases, gains, scalars);
* a name ending in ``pos_embed`` (learned position tables; fixed sin-cos tables are buffers and never optimised).

Only trainable parameters (``requires_grad``) are placed in groups. Shapes are read from ``param.ndim``, which is
the global shape for FSDP2's ``DTensor`` parameters, so the split is identical on every rank and with or without
sharding.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> sorted(no_weight_decay_names(net))
    ['0.weight', '1.bias', '2.bias', '2.weight']
    >>> opt = OptimizerSpec(lr=1e-3, weight_decay=0.1).build(net)
    >>> [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
    [(1, 0.1), (4, 0.0)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chatumm_kit.components.layers import RMSNorm

__all__ = [
    "NO_DECAY_MODULE_TYPES",
    "OPTIMIZERS",
    "OptimizerSpec",
    "build_optimizer",
    "no_weight_decay_names",
    "param_groups",
]

NO_DECAY_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    RMSNorm,
)

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Names (as in ``module.named_parameters()``) of the trainable parameters that must not be decayed."""
    exempt_ids = {
        id(p) for m in module.modules() if isinstance(m, NO_DECAY_MODULE_TYPES) for p in m.parameters(recurse=False)
    }
    return {
        name
        for name, p in module.named_parameters()
        if p.requires_grad and (id(p) in exempt_ids or p.ndim < 2 or name.endswith("pos_embed"))
    }


def param_groups(module: nn.Module, *, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: ``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}]``.

    Both groups are always returned (either may be empty) so group indices are stable across models — schedules
    and checkpoints address groups by position.

    Example:
        >>> groups = param_groups(torch.nn.Linear(3, 2), weight_decay=0.05)
        >>> [[tuple(p.shape) for p in g["params"]] for g in groups]
        [[(2, 3)], [(2,)]]
    """
    exempt = no_weight_decay_names(module)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if name in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything needed to build an optimizer over a module that does not exist yet (systems build models lazily).

    Args:
        name: one of :data:`OPTIMIZERS` (``"adamw"``, ``"adam"``).
        lr: peak learning rate (schedules multiply it, see :mod:`chatumm_kit.training.schedules`).
        weight_decay: applied to the decayed group of :func:`param_groups` only.
        betas, eps: Adam moments' coefficients and denominator epsilon.

    Example:
        >>> OptimizerSpec(lr=3e-4, weight_decay=0.01, betas=(0.9, 0.95)).build(torch.nn.Linear(2, 2)).defaults["lr"]
        0.0003
    """

    lr: float
    name: str = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerSpec.name: unknown optimizer {self.name!r}; known: {sorted(OPTIMIZERS)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ValueError(f"OptimizerSpec: need lr > 0, weight_decay >= 0, eps > 0; got {self}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimizerSpec.betas: need two values in [0, 1), got {self.betas}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))  # YAML gives lists

    def build(self, module: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over ``module``'s trainable parameters, split by :func:`param_groups`."""
        groups = param_groups(module, weight_decay=self.weight_decay)
        if not any(g["params"] for g in groups):
            raise ValueError(f"OptimizerSpec.build: {type(module).__name__} has no trainable parameters")
        return OPTIMIZERS[self.name](groups, lr=self.lr, betas=self.betas, eps=self.eps)


def build_optimizer(
    module: nn.Module,
    *,
    lr: float,
    name: str = "adamw",
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Functional form of :class:`OptimizerSpec` ``(...).build(module)``.

    Example:
        >>> type(build_optimizer(torch.nn.Linear(2, 2), lr=1e-3)).__name__
        'AdamW'
    """
    return OptimizerSpec(lr=lr, name=name, weight_decay=weight_decay, betas=betas, eps=eps).build(module)
