"""The ChatUMM training objective, normalised by global token counts (SPEC §4).

``L = w_ce·CE + w_mse·MSE`` where CE is summed over every supervised text/marker position and MSE over every noised
latent token, each divided by the number of such tokens *across all ranks*. Gradient averaging in DDP/FSDP divides
by the world size, so each rank's loss is scaled by it: the resulting gradient is exactly
``Σ_ranks ∇(sum of token losses) / global count`` — every token weighs the same however the packing fell.

Example:
    >>> terms = objective(out, ce_weight=1.0, mse_weight=1.0)  # doctest: +SKIP
    >>> terms.total.backward()                                  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from chatumm_kit.model import ChatUMMOutput

__all__ = ["LossTerms", "global_counts", "objective"]


@dataclass
class LossTerms:
    """``total`` is what to backpropagate; ``ce`` and ``mse`` are the globally normalised terms (for logging)."""

    total: torch.Tensor
    ce: torch.Tensor
    mse: torch.Tensor
    ce_tokens: int
    mse_tokens: int


def global_counts(ce_count: int, mse_count: int, *, device: torch.device) -> tuple[int, int, int]:
    """``(ce_total, mse_total, world_size)`` summed over ranks when a process group is up."""
    if not (dist.is_available() and dist.is_initialized()):
        return ce_count, mse_count, 1
    counts = torch.tensor([ce_count, mse_count], dtype=torch.long, device=device)
    dist.all_reduce(counts)
    return int(counts[0]), int(counts[1]), dist.get_world_size()


def objective(out: ChatUMMOutput, *, ce_weight: float = 1.0, mse_weight: float = 1.0) -> LossTerms:
    """Weighted CE + flow-matching MSE, each normalised by its global token count."""
    ce_total, mse_total, world = global_counts(out.ce_count, out.mse_count, device=out.ce_sum.device)
    ce = out.ce_sum * (world / max(ce_total, 1))
    mse = out.mse_sum * (world / max(mse_total, 1))
    return LossTerms(
        total=ce_weight * ce + mse_weight * mse,
        ce=ce / world,
        mse=mse / world,
        ce_tokens=ce_total,
        mse_tokens=mse_total,
    )
