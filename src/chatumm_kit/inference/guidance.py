"""Classifier-free guidance over three contexts (SPEC §4): the guided velocity that the Euler sampler integrates.

Classifier-free guidance over three velocities (SPEC §4), applied only while ``lo < t ≤ hi`` (``cfg_interval``):

    ``v_txt = v_txt_uncond + s_txt·(v_full − v_txt_uncond)``
    ``v     = v_img_uncond + s_img·(v_txt − v_img_uncond)``

with the renorm of SPEC §4.1, ``u ← u·clamp(‖v_full‖ / ‖u‖, renorm_min, 1)``, applied to

- ``"global"``: the final ``v``, one norm over all tokens and channels;
- ``"channel"`` (older name ``"token"``): the final ``v``, one norm per token (over channels);
- ``"text_channel"``: ``v_txt`` only, per token, before the image stage (the final ``v`` is not renormed);
- ``"none"``: nothing.

Which stages run follows ``SamplerConfig.cfg_skip_rule``: ``"kit"`` runs a stage whose scale is not 1; ``"bagel"``
(BAGEL's inferencer) runs no guidance at all unless ``s_txt > 1`` and the image stage only when ``s_img > 1``.

A chat keeps the three contexts (full, text- and image-unconditional) up to date turn by turn in
``inference/cfg_contexts.py``; the Euler integration itself is ``inference/sampler.py``.

Example:
    >>> f, t, i = torch.ones(1, 2), torch.zeros(1, 2), torch.zeros(1, 2)
    >>> cfg_combine(f, t, i, text_scale=4.0, image_scale=1.5).tolist()   # 0 + 1.5·(0 + 4·(1 − 0) − 0)
    [[6.0, 6.0]]
"""

from __future__ import annotations

from typing import Literal

import torch

from chatumm_kit.inference.sampler import RENORM_MODES, RenormMode, SamplerConfig, VelocityFn

__all__ = ["active_unconditional", "cfg_combine", "guided_velocity", "in_cfg_interval", "renorm_velocity"]


def in_cfg_interval(t: float, interval: tuple[float, float]) -> bool:
    """Whether guidance applies at time ``t``: ``lo < t ≤ hi`` (so ``(0, 1)`` means every step)."""
    lo, hi = interval
    return lo < t <= hi


def renorm_velocity(
    v: torch.Tensor,
    reference: torch.Tensor,
    *,
    mode: Literal["none", "global", "channel", "token"],
    min_scale: float = 0.0,
) -> torch.Tensor:
    """Shrink ``v`` so its norm does not exceed ``reference``'s (``[N, C]`` each); never enlarges it.

    ``"global"``: one L2 norm over all ``N·C`` values; ``"channel"`` / ``"token"``: per row (the last dimension).
    The factor ``‖reference‖ / ‖v‖`` is clamped to ``[min_scale, 1]``.
    """
    if mode == "none":
        return v
    if mode == "global":
        num, den = reference.norm(), v.norm()
    elif mode in ("channel", "token"):
        num, den = reference.norm(dim=-1, keepdim=True), v.norm(dim=-1, keepdim=True)
    else:
        raise ValueError(f"renorm_velocity: mode must be one of {RENORM_MODES}, got {mode!r}")
    scale = (num / den.clamp_min(torch.finfo(v.dtype).tiny)).clamp(min=min_scale, max=1.0)
    return v * scale


def cfg_combine(
    v_full: torch.Tensor,
    v_text_uncond: torch.Tensor,
    v_image_uncond: torch.Tensor,
    *,
    text_scale: float,
    image_scale: float,
    renorm: RenormMode = "none",
    renorm_min: float = 0.0,
) -> torch.Tensor:
    """Three-context guidance (SPEC §4) with the renorm of SPEC §4.1 against ``v_full``. All tensors ``[N, C]``.

    ``renorm="text_channel"`` renorms ``v_txt`` per token before the image stage; ``"global"`` / ``"channel"``
    renorm the final velocity (see the module docstring).

    Example:
        >>> f, t, i = torch.ones(1, 2), torch.zeros(1, 2), torch.zeros(1, 2)
        >>> cfg_combine(f, t, i, text_scale=4.0, image_scale=1.5).tolist()   # 0 + 1.5·(0 + 4·(1 − 0) − 0)
        [[6.0, 6.0]]
    """
    if renorm not in RENORM_MODES:
        raise ValueError(f"cfg_combine: renorm must be one of {RENORM_MODES}, got {renorm!r}")
    v_text = v_text_uncond + text_scale * (v_full - v_text_uncond)
    if renorm == "text_channel":
        v_text = renorm_velocity(v_text, v_full, mode="channel", min_scale=renorm_min)
        return v_image_uncond + image_scale * (v_text - v_image_uncond)
    v = v_image_uncond + image_scale * (v_text - v_image_uncond)
    return renorm_velocity(v, v_full, mode=renorm, min_scale=renorm_min)


def active_unconditional(
    t: float, config: SamplerConfig, *, has_text_uncond: bool, has_image_uncond: bool
) -> tuple[bool, bool]:
    """Which unconditional contexts :func:`guided_velocity` runs at time ``t``: ``(text, image)``.

    A context runs only inside ``cfg_interval``, when it exists (``has_*``: it differs from the full context) and
    when its stage runs under ``config.cfg_skip_rule`` (``"kit"``: its scale is not 1; ``"bagel"``: ``s_txt > 1``
    for both, and ``s_img > 1`` for the image one). A scheduler that batches several samplers uses this to know, before the model runs,
    which contexts each one needs at this step.

    Example:
        >>> cfg = SamplerConfig(cfg_text_scale=4.0, cfg_image_scale=1.0, cfg_interval=(0.4, 1.0))
        >>> active_unconditional(0.9, cfg, has_text_uncond=True, has_image_uncond=True)
        (True, False)
        >>> active_unconditional(0.2, cfg, has_text_uncond=True, has_image_uncond=True)
        (False, False)
    """
    if not in_cfg_interval(t, config.cfg_interval):
        return False, False
    if config.cfg_skip_rule == "bagel":
        if config.cfg_text_scale <= 1.0:
            return False, False
        return has_text_uncond, has_image_uncond and config.cfg_image_scale > 1.0
    return has_text_uncond and config.cfg_text_scale != 1.0, has_image_uncond and config.cfg_image_scale != 1.0


def guided_velocity(
    *,
    full: VelocityFn,
    text_uncond: VelocityFn | None,
    image_uncond: VelocityFn | None,
    config: SamplerConfig,
) -> VelocityFn:
    """The guided velocity field of three contexts, for :func:`euler_sample`.

    ``None`` for an unconditional context means "identical to the full context" (e.g. no image anywhere in the
    dialogue): its velocity is ``v_full`` and is not recomputed. A context whose scale is 1 is not run either (its
    term cancels), and outside ``cfg_interval`` only ``full`` runs.

    The formula is applied as written: with ``image_uncond=None`` it gives ``v_full + s_img·(v_txt − v_full)``, so
    an image scale above 1 then strengthens the text guidance (text-to-image with no image in context); pass
    ``cfg_image_scale=1`` for plain text guidance there.
    """

    bagel_rule = config.cfg_skip_rule == "bagel"
    # BAGEL's rule: no guidance at all unless s_txt > 1; the image stage only when s_img > 1 (else v = v_txt).
    if bagel_rule and config.cfg_text_scale <= 1.0:
        return full
    image_scale = 1.0 if bagel_rule and config.cfg_image_scale <= 1.0 else config.cfg_image_scale

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        v_full = full(x, t)
        if not in_cfg_interval(t, config.cfg_interval):
            return v_full
        use_text, use_image = active_unconditional(
            t, config, has_text_uncond=text_uncond is not None, has_image_uncond=image_uncond is not None
        )
        # An unused context contributes v_full: exact when the context equals the full one, and irrelevant when its
        # scale is 1 (the term cancels).
        v_txt_u = text_uncond(x, t) if use_text else v_full
        v_img_u = image_uncond(x, t) if use_image else v_full
        return cfg_combine(
            v_full,
            v_txt_u,
            v_img_u,
            text_scale=config.cfg_text_scale,
            image_scale=image_scale,
            renorm=config.cfg_renorm,
            renorm_min=config.renorm_min,
        )

    return velocity
