"""Flow-matching sampler: shifted Euler integration from noise to data (SPEC §4), and the settings of one image.

Conventions (``chatumm_kit.flow``): ``x_t = (1 − t)·x0 + t·ε``, the model predicts ``v = ε − x0 = dx/dt``, ``t = 1``
is pure noise. Sampling walks a grid ``1 = t_0 > t_1 > … > t_N = 0`` and takes Euler steps

    ``x ← x + (t_{i+1} − t_i)·v(x, t_i)``   (``t_{i+1} − t_i < 0``: the SPEC's ``x ← x − v·Δt`` with ``Δt > 0``).

**Step-count convention** (``SamplerConfig.step_convention``). ``"euler_steps"`` (the default): ``num_steps = N`` means
``N`` model evaluations, on the grid ``shift_timesteps(linspace(1, 0, N + 1), shift)`` whose last step lands exactly on
``t = 0``. ``"bagel_timesteps"``: ``num_steps = N`` means BAGEL's ``num_timesteps = N`` (SPEC §4.1), a grid of ``N``
points ``shift_timesteps(linspace(1, 0, N), shift)``, i.e. ``N − 1`` evaluations — so kit ``num_steps=49`` equals BAGEL
``num_timesteps=50``, and ``SamplerConfig(num_steps=50, step_convention="bagel_timesteps")`` is the same sampler. This is diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s)`` fed the unshifted sigmas
``linspace(1, 0, N + 1)[:-1]`` (the tests check grid and steps against it). diffusers' *default* grid differs only
in where the linspace stops: it ends at the shifted ``1/1000`` and then appends 0, so its last step is nearly empty.

The velocity comes from the caller: one context's model output, or the classifier-free guidance of three contexts
(``inference/guidance.py``). :class:`SamplerConfig` holds the settings of both (grid and guidance), one per image.

Example:
    >>> x0 = torch.randn(4, 8); eps = torch.randn(4, 8)
    >>> out = euler_sample(lambda x, t: eps - x0, eps, SamplerConfig(num_steps=3))
    >>> torch.allclose(out, x0, atol=1e-6)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from chatumm_kit.flow import shift_timesteps

__all__ = [
    "CFG_SKIP_RULES",
    "RENORM_MODES",
    "STEP_CONVENTIONS",
    "EulerIntegrator",
    "SamplerConfig",
    "VelocityFn",
    "euler_sample",
    "timestep_grid",
]

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
"""``(x_t [N, C], t) -> v [N, C]``: the velocity of one context at time ``t``."""

RenormMode = Literal["none", "global", "channel", "text_channel", "token"]
RENORM_MODES = ("none", "global", "channel", "text_channel", "token")
"""How guidance renormalises the guided velocity (``inference/guidance.py``, :func:`renorm_velocity`, SPEC §4.1):
``"global"`` one factor over all tokens and channels of the final velocity, ``"channel"`` one factor per token of the
final velocity (``"token"`` is the older name of the same thing), ``"text_channel"`` one factor per token of the
text-CFG stage only, before the image CFG (BAGEL's edit default)."""

STEP_CONVENTIONS = ("euler_steps", "bagel_timesteps")
"""What ``SamplerConfig.num_steps`` counts: Euler evaluations, or BAGEL's grid points (evaluations + 1)."""

CFG_SKIP_RULES = ("kit", "bagel")
"""When a guidance stage runs: ``"kit"`` — a stage runs when its scale is not 1; ``"bagel"`` — no guidance at all
unless the text scale is > 1, and the image stage only when the image scale is > 1 (BAGEL's inferencer)."""


@dataclass(frozen=True)
class SamplerConfig:
    """Settings of one image generation (SPEC §4 defaults: 50 steps, shift 3, s_txt 4, s_img 1.5, CFG on t ∈ (0.4, 1]).

    Attributes:
        num_steps: Euler steps (model evaluations per context).
        shift: timestep shift ``s`` of the grid (``s > 1`` spends more steps at high noise).
        cfg_text_scale: ``s_txt``; 1 disables text guidance (the text-unconditional context is then not run).
        cfg_image_scale: ``s_img``; 1 disables image guidance (the image-unconditional context is then not run).
            Editing usually wants 2.0 and ``cfg_interval=(0.0, 1.0)``.
        cfg_interval: guidance is applied while ``lo < t ≤ hi``; outside it only the full context runs.
        cfg_renorm: one of :data:`RENORM_MODES`: ``"none"``, ``"global"`` (one factor for all tokens), ``"channel"``
            (= ``"token"``, one factor per token) or ``"text_channel"`` (per token, text stage only; SPEC §4.1).
        renorm_min: lower clamp of the renorm factor (0 allows any shrinking); BAGEL's ``cfg_renorm_min``.
        step_convention: what ``num_steps`` counts (:data:`STEP_CONVENTIONS`; see the module docstring).
        cfg_skip_rule: when guidance stages run (:data:`CFG_SKIP_RULES`); ``"bagel"`` skips all guidance at text
            scale 1. ``inference/sampler_presets.py`` holds BAGEL's published settings.
        seed: seed of the session's random draws for one reply (image noise, sampled text); ``None`` = random.

    Example:
        >>> SamplerConfig(num_steps=4, cfg_interval=(0.0, 1.0)).cfg_renorm
        'global'
    """

    num_steps: int = 50
    shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_image_scale: float = 1.5
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm: RenormMode = "global"
    renorm_min: float = 0.0
    seed: int | None = None
    step_convention: Literal["euler_steps", "bagel_timesteps"] = "euler_steps"
    cfg_skip_rule: Literal["kit", "bagel"] = "kit"

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"SamplerConfig.num_steps must be an integer >= 1, got {self.num_steps!r}")
        for name in ("shift", "cfg_text_scale", "cfg_image_scale", "renorm_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SamplerConfig.{name} must be a finite number, got {value!r}")
        if self.cfg_text_scale < 0 or self.cfg_image_scale < 0:
            raise ValueError(
                f"SamplerConfig: guidance scales must be >= 0 (1 = no guidance), got text {self.cfg_text_scale}, "
                f"image {self.cfg_image_scale}"
            )
        if self.shift <= 0:
            raise ValueError(f"SamplerConfig.shift must be > 0, got {self.shift}")
        lo, hi = (float(v) for v in self.cfg_interval)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"SamplerConfig.cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}")
        if self.cfg_renorm not in RENORM_MODES:
            raise ValueError(f"SamplerConfig.cfg_renorm must be one of {RENORM_MODES}, got {self.cfg_renorm!r}")
        if not 0.0 <= self.renorm_min <= 1.0:
            raise ValueError(f"SamplerConfig.renorm_min must be in [0, 1], got {self.renorm_min}")
        if self.step_convention not in STEP_CONVENTIONS:
            raise ValueError(
                f"SamplerConfig.step_convention must be one of {STEP_CONVENTIONS}, got {self.step_convention!r}"
            )
        if self.step_convention == "bagel_timesteps" and self.num_steps < 2:
            raise ValueError(
                f"SamplerConfig.num_steps must be >= 2 with step_convention='bagel_timesteps' (N grid points = N − 1 "
                f"steps), got {self.num_steps}"
            )
        if self.cfg_skip_rule not in CFG_SKIP_RULES:
            raise ValueError(f"SamplerConfig.cfg_skip_rule must be one of {CFG_SKIP_RULES}, got {self.cfg_skip_rule!r}")

    @property
    def num_evaluations(self) -> int:
        """Euler steps (model evaluations per context) this config makes: ``num_steps``, or ``num_steps − 1`` under
        ``step_convention="bagel_timesteps"``.

        Example:
            >>> SamplerConfig(num_steps=50, step_convention="bagel_timesteps").num_evaluations
            49
        """
        return self.num_steps - 1 if self.step_convention == "bagel_timesteps" else self.num_steps


def timestep_grid(num_steps: int, shift: float) -> torch.Tensor:
    """``[num_steps + 1]`` float64 times from 1 to 0: ``shift_timesteps(linspace(1, 0, N + 1), shift)``.

    Example:
        >>> timestep_grid(2, 1.0).tolist()
        [1.0, 0.5, 0.0]
    """
    if num_steps < 1:
        raise ValueError(f"timestep_grid: num_steps must be >= 1, got {num_steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


class EulerIntegrator:
    """Euler integration on :func:`timestep_grid` (``config.num_evaluations`` steps), one step at a time (what :func:`euler_sample` loops over).

    A caller that evaluates velocities itself — e.g. a scheduler running the model once for several images — reads
    :attr:`x` and :attr:`t`, computes ``v`` and calls :meth:`step` until :attr:`done`. The state is kept in float32
    (or float64 if ``x_T`` is float64) whatever dtype the velocity comes in.

    Args:
        x_T: ``[N, C]`` noise at ``t = 1``.
        config: the grid (``num_steps``, ``shift``).

    Example:
        >>> euler = EulerIntegrator(torch.zeros(1, 1), SamplerConfig(num_steps=2))
        >>> while not euler.done:
        ...     euler.step(torch.ones(1, 1))
        >>> euler.x.item()
        -1.0
    """

    def __init__(self, x_T: torch.Tensor, config: SamplerConfig) -> None:
        self._grid = timestep_grid(config.num_evaluations, config.shift).tolist()
        self._index = 0
        self.x = x_T.to(torch.float64 if x_T.dtype == torch.float64 else torch.float32)

    @property
    def done(self) -> bool:
        """True once ``t = 0`` is reached (:attr:`x` is then ``x_0``)."""
        return self._index == len(self._grid) - 1

    @property
    def t(self) -> float:
        """The time of :attr:`x` (where the next velocity is evaluated)."""
        return self._grid[self._index]

    def step(self, v: torch.Tensor) -> None:
        """``x ← x + (t_next − t)·v`` with ``v [N, C]`` the velocity at (:attr:`x`, :attr:`t`)."""
        if self.done:
            raise RuntimeError("EulerIntegrator.step: already at t = 0")
        if v.shape != self.x.shape:
            raise ValueError(f"euler_sample: velocity_fn returned {tuple(v.shape)} for x of {tuple(self.x.shape)}")
        t_now, t_next = self._grid[self._index], self._grid[self._index + 1]
        self.x = self.x + (t_next - t_now) * v.to(self.x.dtype)
        self._index += 1


def euler_sample(velocity_fn: VelocityFn, x_T: torch.Tensor, config: SamplerConfig) -> torch.Tensor:
    """Integrate ``dx/dt = v`` from ``t = 1`` (``x_T``) to ``t = 0`` on :func:`timestep_grid`; returns ``x_0``.

    The state is kept in float32 (or float64 if ``x_T`` is float64) whatever dtype the velocity comes in.

    Shapes:
        ``x_T [N, C] -> [N, C]``; ``velocity_fn(x [N, C], t: float) -> [N, C]``.

    Example:
        >>> euler_sample(lambda x, t: torch.ones_like(x), torch.zeros(1, 1), SamplerConfig(num_steps=4)).item()
        -1.0
    """
    euler = EulerIntegrator(x_T, config)
    while not euler.done:
        euler.step(velocity_fn(euler.x, euler.t))
    return euler.x
