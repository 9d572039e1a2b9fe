"""Rectified-flow (flow-matching) conventions shared by training and sampling (SPEC §4).

``x_t = (1 − t)·x0 + t·ε`` with ``ε ~ N(0, I)``; the model predicts the velocity ``v = ε − x0``; ``t = 1`` is pure
noise and sampling integrates from ``t = 1`` to ``t = 0`` with Euler steps ``x ← x − v·Δt`` (the convention of
diffusers' ``FlowMatchEulerDiscreteScheduler``). Training draws ``t = sigmoid(n)``, ``n ~ N(0, 1)``, then applies the
timestep shift ``t ← s·t / (1 + (s − 1)·t)``.

Example:
    >>> t = sample_train_timesteps(4, shift=1.0, generator=torch.Generator().manual_seed(0))
    >>> bool(((t > 0) & (t < 1)).all())
    True
"""

from __future__ import annotations

import torch

__all__ = ["shift_timesteps", "sample_train_timesteps", "noise_latents", "velocity_target"]


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``s·t / (1 + (s − 1)·t)``: with ``s > 1`` more time is spent at high noise. Identity for ``s = 1``."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_train_timesteps(
    n: int, *, shift: float = 1.0, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[n]`` training timesteps: logit-normal ``sigmoid(N(0, 1))``, then shifted."""
    normal = torch.randn(n, generator=generator, device="cpu").to(device)
    return shift_timesteps(torch.sigmoid(normal), shift)


def noise_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − t)·x0 + t·ε``; ``t`` broadcasts over the trailing (channel) dimension: ``[N]`` for ``[N, C]``."""
    t = t.to(x0.dtype).unsqueeze(-1)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ``v = ε − x0``."""
    return noise - x0
