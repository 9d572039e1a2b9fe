"""BAGEL's CFG (SPEC §4.1) re-derived in plain tensor algebra: renorm modes, skip rule, step convention, presets."""

from __future__ import annotations

import pytest
import torch

from chatumm_kit.inference.guidance import guided_velocity
from chatumm_kit.inference.sampler import SamplerConfig, euler_sample
from chatumm_kit.inference.sampler_presets import SAMPLER_PRESETS, sampler_preset


def _bagel_velocity(v_c, v_tu, v_iu, *, s_txt, s_img, renorm, lo, t, rmin):
    """One guided velocity as SPEC §4.1 describes BAGEL's inferencer, written out independently of the kit."""
    if s_txt <= 1.0 or not (lo < t <= 1.0):
        return v_c
    vt = v_tu + s_txt * (v_c - v_tu)
    if renorm == "text_channel":
        f = (v_c.norm(dim=-1, keepdim=True) / (vt.norm(dim=-1, keepdim=True) + 1e-8)).clamp(rmin, 1.0)
        vt = vt * f
        return v_iu + s_img * (vt - v_iu) if s_img > 1.0 else vt
    v = v_iu + s_img * (vt - v_iu) if s_img > 1.0 else vt
    if renorm == "global":
        f = (v_c.norm() / (v.norm() + 1e-8)).clamp(rmin, 1.0)
    elif renorm == "channel":
        f = (v_c.norm(dim=-1, keepdim=True) / (v.norm(dim=-1, keepdim=True) + 1e-8)).clamp(rmin, 1.0)
    else:
        f = 1.0
    return v * f


def _fields():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(6, 8, generator=g, dtype=torch.float64) for _ in range(3))

    def full(x, t):
        return torch.sin(x) + a * t

    def text_u(x, t):
        return 0.3 * x + b * (1 - t)

    def image_u(x, t):
        return torch.cos(x) * c

    return full, text_u, image_u


def _bagel_sample(x_T, *, num_timesteps, shift, **cfg):
    """BAGEL's sampler re-derived: grid linspace(1, 0, N) shifted, N − 1 Euler steps x ← x − v·(t_i − t_{i+1})."""
    full, text_u, image_u = _fields()
    ts = torch.linspace(1.0, 0.0, num_timesteps, dtype=torch.float64)
    ts = shift * ts / (1 + (shift - 1) * ts)
    x = x_T.clone()
    for i in range(num_timesteps - 1):
        t = float(ts[i])
        v = _bagel_velocity(full(x, t), text_u(x, t), image_u(x, t), t=t, **cfg)
        x = x - v * float(ts[i] - ts[i + 1])
    return x


@pytest.mark.parametrize("renorm", ["none", "global", "channel", "text_channel"])
@pytest.mark.parametrize("scales", [(4.0, 2.0), (4.0, 1.0), (1.0, 2.0), (2.5, 0.5)])
@pytest.mark.parametrize("rmin", [0.0, 0.6])
def test_guided_velocity_equals_bagel_formulas(renorm, scales, rmin):
    full, text_u, image_u = _fields()
    s_txt, s_img = scales
    cfg = SamplerConfig(
        cfg_text_scale=s_txt,
        cfg_image_scale=s_img,
        cfg_interval=(0.4, 1.0),
        cfg_renorm=renorm,
        renorm_min=rmin,
        cfg_skip_rule="bagel",
    )
    velocity = guided_velocity(full=full, text_uncond=text_u, image_uncond=image_u, config=cfg)
    x = torch.randn(6, 8, dtype=torch.float64) * 3
    for t in (1.0, 0.7, 0.41, 0.4, 0.1):
        want = _bagel_velocity(
            full(x, t), text_u(x, t), image_u(x, t), s_txt=s_txt, s_img=s_img, renorm=renorm, lo=0.4, t=t, rmin=rmin
        )
        torch.testing.assert_close(velocity(x, t), want, atol=1e-6, rtol=0)


def test_renorm_modes_differ_and_shrink_only():
    full, text_u, image_u = _fields()
    x, t = torch.randn(6, 8, dtype=torch.float64), 0.9
    outs = {}
    for renorm in ("none", "global", "channel", "text_channel"):
        cfg = SamplerConfig(cfg_text_scale=4.0, cfg_image_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm=renorm)
        outs[renorm] = guided_velocity(full=full, text_uncond=text_u, image_uncond=image_u, config=cfg)(x, t)
    vc = full(x, t)
    assert outs["global"].norm() <= vc.norm() + 1e-9
    assert bool((outs["channel"].norm(dim=-1) <= vc.norm(dim=-1) + 1e-9).all())
    values = list(outs.values())
    assert all(not torch.allclose(values[i], values[j]) for i in range(4) for j in range(i + 1, 4))
    # "token" is the older name of "channel".
    cfg = SamplerConfig(cfg_text_scale=4.0, cfg_image_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm="token")
    torch.testing.assert_close(
        guided_velocity(full=full, text_uncond=text_u, image_uncond=image_u, config=cfg)(x, t), outs["channel"]
    )


def test_skip_rule_kit_still_guides_images_at_text_scale_one_bagel_does_not():
    full, text_u, image_u = _fields()
    x, t = torch.randn(6, 8, dtype=torch.float64), 0.9
    kit = SamplerConfig(cfg_text_scale=1.0, cfg_image_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm="none")
    bagel = SamplerConfig(**{**kit.__dict__, "cfg_skip_rule": "bagel"})
    v_kit = guided_velocity(full=full, text_uncond=text_u, image_uncond=image_u, config=kit)(x, t)
    v_bagel = guided_velocity(full=full, text_uncond=text_u, image_uncond=image_u, config=bagel)(x, t)
    vc, vi = full(x, t), image_u(x, t)
    torch.testing.assert_close(v_kit, vi + 2.0 * (vc - vi))  # today's default numerics, unchanged
    torch.testing.assert_close(v_bagel, vc)


@pytest.mark.parametrize("name", sorted(SAMPLER_PRESETS))
def test_presets_sample_like_bagel_num_timesteps(name):
    preset = sampler_preset(name, num_steps=7)
    assert preset.num_evaluations == 6
    full, text_u, image_u = _fields()
    velocity = guided_velocity(full=full, text_uncond=text_u, image_uncond=image_u, config=preset)
    x_T = torch.randn(6, 8, dtype=torch.float64)
    ours = euler_sample(velocity, x_T, preset)
    want = _bagel_sample(
        x_T,
        num_timesteps=7,
        shift=3.0,
        s_txt=preset.cfg_text_scale,
        s_img=preset.cfg_image_scale,
        renorm=preset.cfg_renorm,
        lo=preset.cfg_interval[0],
        rmin=0.0,
    )
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=0)


def test_step_conventions():
    # kit num_steps = N − 1 (euler_steps) == bagel_timesteps N == BAGEL's num_timesteps N; kit num_steps = N is not.
    x_T = torch.randn(6, 8, dtype=torch.float64)
    full, _, _ = _fields()
    kw = {"cfg_text_scale": 1.0, "cfg_image_scale": 1.0, "cfg_skip_rule": "bagel", "cfg_renorm": "none"}
    want = _bagel_sample(x_T, num_timesteps=10, shift=3.0, s_txt=1.0, s_img=1.0, renorm="none", lo=0.0, rmin=0.0)
    bagel = euler_sample(full, x_T, SamplerConfig(num_steps=10, step_convention="bagel_timesteps", **kw))
    kit9 = euler_sample(full, x_T, SamplerConfig(num_steps=9, **kw))
    kit10 = euler_sample(full, x_T, SamplerConfig(num_steps=10, **kw))
    torch.testing.assert_close(bagel, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(kit9, want, atol=1e-6, rtol=0)
    assert (kit10 - want).abs().max() > 1e-3


def test_published_preset_values_and_bad_input():
    t2i, edit = SAMPLER_PRESETS["bagel_t2i"], SAMPLER_PRESETS["bagel_edit"]
    assert (t2i.cfg_text_scale, t2i.cfg_image_scale, t2i.cfg_interval, t2i.cfg_renorm, t2i.shift) == (
        4.0,
        1.0,
        (0.4, 1.0),
        "global",
        3.0,
    )
    assert (edit.cfg_text_scale, edit.cfg_image_scale, edit.cfg_interval, edit.cfg_renorm, edit.shift) == (
        4.0,
        2.0,
        (0.0, 1.0),
        "text_channel",
        3.0,
    )
    assert t2i.num_steps == edit.num_steps == 50 and t2i.num_evaluations == 49 and t2i.renorm_min == 0.0
    with pytest.raises(ValueError, match="unknown sampler preset 'bagel'"):
        sampler_preset("bagel")
    with pytest.raises(ValueError, match="step_convention"):
        SamplerConfig(step_convention="bagel")
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        SamplerConfig(num_steps=1, step_convention="bagel_timesteps")
    with pytest.raises(ValueError, match="cfg_renorm"):
        SamplerConfig(cfg_renorm="per_token")
