"""Memory plan of a training run: per-device bytes of weights, gradients, optimizer state and activations.

:func:`plan_training` takes a built model (on the meta device: nothing is allocated) whose trainable parameters are
marked (``requires_grad``, as a training system leaves them after freezing — or after adding adapters such as LoRA,
which then count as trainable and the frozen base as frozen) and a :class:`RunShape` (strategy, device count,
precision, tokens per step, activation checkpointing), and returns a :class:`MemoryPlan`.

The arithmetic, per device (``W`` = number of data-parallel devices):

* **weights** — each parameter's bytes in its dtype (the master dtype: fp32 under the BAGEL recipes). FSDP2 shards
  dim 0 of every parameter into ``ceil(rows / W)`` rows per rank (the largest shard, padding included); DDP
  replicates. FSDP2 also holds the **gathered** copy, in the compute dtype, of the unit being computed and of the one
  prefetched (2 × the largest unit's parameters × 2 bytes under bf16): ``gathered_bytes``.
* **gradients** — one per trainable parameter, in the parameter's dtype, sharded like the weights under FSDP2.
  DDP also keeps its all-reduce buckets, one more gradient-sized buffer (``ddp_bucket_bytes``).
* **optimizer state** — AdamW: ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype, plus a 4-byte ``step``
  tensor, per trainable parameter (sharded under FSDP2). Frozen parameters have no state.
* **activations** — an estimate for the decoder over ``tokens`` packed tokens (each token goes through one expert,
  so a MoT layer costs what a dense layer costs): per token and layer ``8·h + 4·m`` elements of the compute dtype
  (norm inputs and outputs, q/k/v, attention output, residuals, the three SwiGLU tensors; SDPA/flex attention keeps
  no ``L×L`` scores), plus the fp32 logits of the CE positions (``ce_fraction`` of the tokens, 4 + 2 bytes per
  vocabulary entry for logits and their gradient). With activation checkpointing each layer keeps only its input
  (``h`` elements per token) and one layer is recomputed at a time. ViT and VAE activations are not counted.

Example:
    >>> from chatumm_kit.presets import chatumm_bagel_7b
    >>> with torch.device("meta"):
    ...     model = chatumm_bagel_7b()
    >>> plan = plan_training(model, RunShape(strategy="fsdp2", devices=8, tokens=32768, compute_dtype="bfloat16",
    ...                                      activation_checkpointing=True))
    >>> round(plan.total_params / 1e9, 1), plan.total_gib > 0
    (14.7, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["MemoryPlan", "RunShape", "plan_training", "format_plan", "GIB"]

GIB = 1024**3
Strategy = Literal["single", "ddp", "fsdp2"]
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class RunShape:
    """How the run is laid out.

    Attributes:
        strategy: ``single`` (one device), ``ddp`` (replicated) or ``fsdp2`` (sharded over ``devices``).
        devices: data-parallel devices in all (devices per node × nodes).
        tokens: tokens per packed step on one device (the data module's ``token_budget``).
        compute_dtype: dtype of activations (``bfloat16`` under mixed precision, else ``float32``).
        activation_checkpointing: recompute each layer's activations in backward.
        ce_fraction: share of the tokens that are CE positions (logits are materialised only there).
        optimizer_states: tensors of optimizer state per trainable parameter element (AdamW: 2).
    """

    strategy: Strategy = "single"
    devices: int = 1
    tokens: int = 4096
    compute_dtype: str = "float32"
    activation_checkpointing: bool = False
    ce_fraction: float = 0.25
    optimizer_states: int = 2

    def __post_init__(self) -> None:
        if self.strategy not in ("single", "ddp", "fsdp2"):
            raise ValueError(f"RunShape.strategy: expected single, ddp or fsdp2, got {self.strategy!r}")
        if self.devices < 1 or (self.strategy == "single" and self.devices != 1):
            raise ValueError(f"RunShape.devices: {self.devices} does not fit strategy {self.strategy!r}")
        if self.compute_dtype not in _DTYPE_BYTES:
            raise ValueError(f"RunShape.compute_dtype: one of {', '.join(_DTYPE_BYTES)}, got {self.compute_dtype!r}")


@dataclass(frozen=True)
class MemoryPlan:
    """Parameter counts and per-device bytes (see the module docstring for each term)."""

    run: RunShape
    total_params: int
    trainable_params: int
    frozen_params: int
    weight_bytes: int
    gathered_bytes: int
    grad_bytes: int
    ddp_bucket_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return (
            self.weight_bytes
            + self.gathered_bytes
            + self.grad_bytes
            + self.ddp_bucket_bytes
            + self.optimizer_bytes
            + self.activation_bytes
        )

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes, "total_gib": self.total_gib}


def _shard_numel(p: torch.Tensor, world: int) -> int:
    """Elements of the largest FSDP2 shard of ``p`` (dim 0 split in ``ceil(rows / world)`` rows; 0-d: whole)."""
    if p.dim() == 0 or world == 1:
        return p.numel()
    rows = p.shape[0]
    return math.ceil(rows / world) * (p.numel() // rows if rows else 0)


def _decoder_sizes(model: nn.Module) -> tuple[int, int, int, int]:
    """``(hidden, intermediate, layers, vocab)`` of a model with a MoT backbone (``model.backbone.config``)."""
    cfg = model.backbone.config
    return cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size


def _largest_unit_params(model: nn.Module, unit_names: tuple[str, ...]) -> int:
    """Parameters of the largest FSDP unit (an element of a ``ModuleList`` named in ``unit_names``)."""
    largest = 0
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in unit_names and parts[-1].isdigit():
            largest = max(largest, sum(p.numel() for p in module.parameters()))
    return largest


def plan_training(model: nn.Module, run: RunShape, *, unit_names: tuple[str, ...] = ("layers", "blocks")) -> MemoryPlan:
    """The :class:`MemoryPlan` of training ``model`` (built on any device, meta included) under ``run``."""
    world = run.devices if run.strategy == "fsdp2" else 1
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]

    def nbytes(p: torch.Tensor) -> int:
        return _shard_numel(p, world) * p.element_size()

    weight = sum(nbytes(p) for p in params)
    grad = sum(nbytes(p) for p in trainable)
    opt = sum(run.optimizer_states * nbytes(p) + 4 for p in trainable)
    act_bytes = _DTYPE_BYTES[run.compute_dtype]
    gathered = 0
    if run.strategy == "fsdp2":  # current + prefetched unit, unsharded in the compute dtype (also on one device)
        gathered = 2 * _largest_unit_params(model, unit_names) * act_bytes
    bucket = grad if run.strategy == "ddp" else 0
    h, m, layers, vocab = _decoder_sizes(model)
    per_layer = run.tokens * (8 * h + 4 * m) * act_bytes
    if run.activation_checkpointing:
        layer_acts = layers * run.tokens * h * act_bytes + per_layer
    else:
        layer_acts = layers * per_layer
    logits = int(run.tokens * run.ce_fraction) * vocab * (4 + 2)
    return MemoryPlan(
        run=run,
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in trainable),
        frozen_params=sum(p.numel() for p in params if not p.requires_grad),
        weight_bytes=weight,
        gathered_bytes=gathered,
        grad_bytes=grad,
        ddp_bucket_bytes=bucket,
        optimizer_bytes=opt,
        activation_bytes=layer_acts + logits,
    )


def format_plan(plan: MemoryPlan, *, title: str) -> str:
    """A readable table of ``plan``."""
    r = plan.run
    rows = [
        ("parameters", f"{plan.total_params:,} ({plan.trainable_params:,} trainable, {plan.frozen_params:,} frozen)"),
        (
            "layout",
            f"{r.strategy} on {r.devices} device(s), {r.tokens:,} tokens/step, compute {r.compute_dtype}, "
            f"activation checkpointing {'on' if r.activation_checkpointing else 'off'}",
        ),  # fmt: skip
        ("weights", _gib(plan.weight_bytes)),
        ("gathered units (FSDP2)", _gib(plan.gathered_bytes)),
        ("gradients", _gib(plan.grad_bytes)),
        ("DDP buckets", _gib(plan.ddp_bucket_bytes)),
        ("optimizer state", _gib(plan.optimizer_bytes)),
        ("activations (estimate)", _gib(plan.activation_bytes)),
        ("total per device", _gib(plan.total_bytes)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def _gib(n: int) -> str:
    return f"{n / GIB:9.2f} GiB"
