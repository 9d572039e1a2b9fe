"""The global gradient norm of a model whose parameters may be FSDP2-sharded ``DTensor``\\ s.

Lightning's ``grad_norm`` reads ``p.grad.data`` and builds a plain tensor from per-parameter norms, which fails on
FSDP2's sharded gradients (``RuntimeError: ... data is not allocated yet``) and, were it to run, would add up each
rank's *shard* norm as if it were the whole. :func:`global_grad_norm` uses ``torch.nn.utils.get_total_norm``,
which understands ``DTensor`` (the norm of sharded gradients is a partial ``DTensor`` whose ``full_tensor()``
reduces over the mesh), so the result is the norm of the whole gradient on every rank: the same number a DDP or
one-process run reports, and the one ``gradient_clip_val`` clips against.

``full_tensor()`` is a collective: call :func:`global_grad_norm` on every rank (Lightning's
``on_before_optimizer_step`` runs on all of them).

Example:
    >>> net = torch.nn.Linear(3, 1, bias=False)
    >>> net.weight.grad = torch.tensor([[3.0, 0.0, 4.0]])
    >>> float(global_grad_norm(net.parameters()))
    5.0
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["global_grad_norm"]


def global_grad_norm(parameters: Iterable[torch.Tensor], *, norm_type: float = 2.0) -> torch.Tensor | None:
    """The ``norm_type``-norm of all gradients together (a 0-d plain tensor), or ``None`` when none has a gradient.

    Works for plain tensors (one process, DDP: gradients are already all-reduced) and FSDP2 ``DTensor`` shards.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.detach()
