"""Next-token choice for chat decoding: greedy, temperature and nucleus (top-p) sampling over an allowed id set.

Example:
    >>> logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    >>> choose_token(logits, temperature=0.0)
    1
    >>> choose_token(logits, temperature=0.0, allowed=[0, 2, 3])
    3
    >>> choose_token(logits, temperature=1.0, top_p=0.01, generator=torch.Generator().manual_seed(0))
    1
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["choose_token"]


def choose_token(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    allowed: Sequence[int] | None = None,
    banned: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next id from ``[V]`` logits.

    Args:
        logits: ``[V]`` scores of one position.
        temperature: 0 → argmax (greedy); otherwise softmax of ``logits / temperature`` is sampled.
        top_p: keep the smallest set of most likely ids whose probability reaches ``top_p`` (1 keeps all).
        allowed: only these ids may be chosen (e.g. the intent markers after a closing marker, SPEC §2).
        banned: these ids may not be chosen (e.g. markers inside a text segment).
        generator: CPU generator of the draw (reproducible replies).
    """
    if temperature < 0:
        raise ValueError(f"choose_token: temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"choose_token: top_p must be in (0, 1], got {top_p}")
    scores = logits.detach().float().cpu().clone()
    if allowed is not None:
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[torch.as_tensor(list(allowed), dtype=torch.long)] = True
        scores[~keep] = float("-inf")
    if banned:
        scores[torch.as_tensor(list(banned), dtype=torch.long)] = float("-inf")
    if not torch.isfinite(scores).any():
        raise ValueError("choose_token: every id is excluded (allowed/banned leave nothing)")
    if temperature == 0.0:
        return int(scores.argmax())
    probs = torch.softmax(scores / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of the strictly more likely ids
        sorted_p[before >= top_p] = 0.0  # the top id always survives (before = 0 < top_p)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
