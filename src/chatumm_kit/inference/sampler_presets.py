"""Named sampler settings: BAGEL's published inference settings (SPEC §4.1), ready to pass as ``sampler=``.

Both presets drive the kit exactly as BAGEL's inferencer does: ``num_steps=50`` counted BAGEL's way
(``step_convention="bagel_timesteps"``: a 50-point grid, 49 Euler steps), BAGEL's skip rule (no guidance at text
scale 1) and its renorm. ``overrides`` replace single fields (a seed, fewer steps for a preview).

Example:
    >>> cfg = sampler_preset("bagel_edit", seed=0)
    >>> (cfg.cfg_text_scale, cfg.cfg_image_scale, cfg.cfg_interval, cfg.cfg_renorm, cfg.num_evaluations)
    (4.0, 2.0, (0.0, 1.0), 'text_channel', 49)
"""

from __future__ import annotations

import dataclasses

from chatumm_kit.inference.sampler import SamplerConfig

__all__ = ["SAMPLER_PRESETS", "sampler_preset"]

_BAGEL = {
    "shift": 3.0,
    "renorm_min": 0.0,
    "num_steps": 50,
    "step_convention": "bagel_timesteps",
    "cfg_skip_rule": "bagel",
}

SAMPLER_PRESETS: dict[str, SamplerConfig] = {
    # BAGEL text-to-image: text 4.0, image 1.0, interval [0.4, 1], global renorm, min 0, shift 3.0, 50 timesteps.
    "bagel_t2i": SamplerConfig(
        cfg_text_scale=4.0, cfg_image_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm="global", **_BAGEL
    ),
    # BAGEL editing: text 4.0, image 2.0, interval [0, 1], text_channel renorm, min 0, shift 3.0, 50 timesteps.
    "bagel_edit": SamplerConfig(
        cfg_text_scale=4.0, cfg_image_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm="text_channel", **_BAGEL
    ),
}
"""BAGEL's published settings by name (``chatumm chat --preset NAME``)."""


def sampler_preset(name: str, **overrides: object) -> SamplerConfig:
    """The preset ``name`` (a key of :data:`SAMPLER_PRESETS`) with ``overrides`` applied (checked as usual)."""
    if name not in SAMPLER_PRESETS:
        raise ValueError(f"unknown sampler preset {name!r}; choose one of {sorted(SAMPLER_PRESETS)}")
    return dataclasses.replace(SAMPLER_PRESETS[name], **overrides)
