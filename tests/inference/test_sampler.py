"""Flow sampler: timestep grid and Euler steps against diffusers, exact toy solutions, CFG algebra, renorm, gating."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from chatumm_kit.inference.decoding import choose_token
from chatumm_kit.inference.guidance import cfg_combine, guided_velocity, in_cfg_interval, renorm_velocity
from chatumm_kit.inference.sampler import SamplerConfig, euler_sample, timestep_grid


@pytest.mark.parametrize("num_steps,shift", [(5, 3.0), (7, 1.0), (3, 2.5)])
def test_grid_and_steps_match_diffusers_flow_match_euler(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1])
    grid = timestep_grid(num_steps, shift)
    torch.testing.assert_close(grid.float(), scheduler.sigmas, atol=1e-6, rtol=0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and bool((grid[1:] < grid[:-1]).all())

    # A nonlinear field, so any sign or time-index slip changes the result.
    def field(x, t):
        return torch.sin(3 * x) * (0.5 + t) - x

    x_T = torch.randn(6, 4)
    ours = euler_sample(field, x_T, SamplerConfig(num_steps=num_steps, shift=shift, cfg_interval=(1.0, 1.0)))
    x = x_T.clone()
    for step_t in scheduler.timesteps:
        t = float(step_t) / scheduler.config.num_train_timesteps
        x = scheduler.step(field(x, t), step_t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_shifted_grid_values_by_hand():
    # shift 3: t' = 3t / (1 + 2t) on linspace(1, 0, 5) = 1, .75, .5, .25, 0
    assert timestep_grid(4, 3.0).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


def test_euler_recovers_x0_for_the_exact_straight_path_velocity():
    x0, eps = torch.randn(8, 16), torch.randn(8, 16)
    cfg = SamplerConfig(num_steps=3, shift=3.0)
    # constant velocity v = ε − x0: the steps sum to −(ε − x0)
    torch.testing.assert_close(euler_sample(lambda x, t: eps - x0, eps, cfg), x0, atol=1e-6, rtol=0)
    # state-dependent form of the same field: v(x_t, t) = (x_t − x0) / t is exact on x_t = (1 − t)x0 + tε
    torch.testing.assert_close(euler_sample(lambda x, t: (x - x0) / t, eps, cfg), x0, atol=1e-5, rtol=0)


def test_euler_sign_convention_moves_against_velocity():
    # dx/dt = 1 integrated from t = 1 down to 0 subtracts 1 (SPEC §4: x ← x − v·Δt)
    out = euler_sample(lambda x, t: torch.ones_like(x), torch.zeros(2, 2), SamplerConfig(num_steps=5))
    torch.testing.assert_close(out, -torch.ones(2, 2))


def test_cfg_combine_matches_the_spec_formula():
    g = torch.Generator().manual_seed(1)
    f, t, i = (torch.randn(5, 3, generator=g) for _ in range(3))
    out = cfg_combine(f, t, i, text_scale=4.0, image_scale=1.5)
    v_txt = t + 4.0 * (f - t)
    torch.testing.assert_close(out, i + 1.5 * (v_txt - i))
    # unit scales give the conditional velocity back; zero scales give the unconditional one
    torch.testing.assert_close(cfg_combine(f, t, i, text_scale=1.0, image_scale=1.0), f)
    torch.testing.assert_close(cfg_combine(f, t, i, text_scale=0.0, image_scale=1.0), t)
    torch.testing.assert_close(cfg_combine(f, t, i, text_scale=1.0, image_scale=0.0), i)


def test_renorm_global_and_token():
    ref = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # row norms 5 and 1, global norm sqrt(26)
    v = torch.tensor([[6.0, 8.0], [0.0, 0.5]])  # row norms 10 and 0.5
    glob = renorm_velocity(v, ref, mode="global")
    torch.testing.assert_close(glob.norm(), ref.norm())
    torch.testing.assert_close(glob / glob.norm(), v / v.norm())  # direction kept
    tok = renorm_velocity(v, ref, mode="token")
    torch.testing.assert_close(tok, torch.tensor([[3.0, 4.0], [0.0, 0.5]]))  # row 0 shrunk, row 1 never enlarged
    small = torch.tensor([[0.3, 0.4], [0.0, 0.1]])
    assert torch.equal(renorm_velocity(small, ref, mode="global"), small)
    assert torch.equal(renorm_velocity(v, ref, mode="none"), v)
    # the factor is clamped from below by min_scale
    torch.testing.assert_close(renorm_velocity(v, ref, mode="token", min_scale=0.9)[0], v[0] * 0.9)
    guided = cfg_combine(ref, torch.zeros_like(ref), torch.zeros_like(ref), text_scale=4.0, image_scale=1.5)
    torch.testing.assert_close(
        cfg_combine(
            ref, torch.zeros_like(ref), torch.zeros_like(ref), text_scale=4.0, image_scale=1.5, renorm="global"
        ),
        guided * ref.norm() / guided.norm(),
    )


def test_cfg_interval_is_open_below_closed_above():
    assert in_cfg_interval(1.0, (0.4, 1.0)) and in_cfg_interval(0.41, (0.4, 1.0))
    assert not in_cfg_interval(0.4, (0.4, 1.0)) and not in_cfg_interval(0.2, (0.4, 1.0))
    assert in_cfg_interval(1e-3, (0.0, 1.0))


class _Counter:
    def __init__(self, value: float) -> None:
        self.value, self.times = value, []

    def __call__(self, x, t):
        self.times.append(t)
        return torch.full_like(x, self.value)


def test_guided_velocity_runs_unconditional_contexts_only_inside_the_interval():
    full, text_u, image_u = _Counter(1.0), _Counter(0.0), _Counter(-1.0)
    cfg = SamplerConfig(num_steps=4, shift=3.0, cfg_interval=(0.8, 1.0), cfg_renorm="none")
    x = euler_sample(
        guided_velocity(full=full, text_uncond=text_u, image_uncond=image_u, config=cfg), torch.zeros(1, 1), cfg
    )
    # grid 1, .9, .75, .5, 0: guidance at t = 1 and .9 only
    assert full.times == pytest.approx([1.0, 0.9, 0.75, 0.5])
    assert text_u.times == image_u.times == pytest.approx([1.0, 0.9])
    guided = -1.0 + 1.5 * ((0.0 + 4.0 * (1.0 - 0.0)) + 1.0)  # 6.5
    expected = -(0.1 * guided + 0.15 * guided + 0.25 * 1.0 + 0.5 * 1.0)
    assert float(x) == pytest.approx(expected)


def test_guided_velocity_skips_shared_and_unit_scale_contexts():
    full, text_u = _Counter(2.0), _Counter(0.0)
    cfg = SamplerConfig(
        num_steps=2, cfg_interval=(0.0, 1.0), cfg_text_scale=3.0, cfg_image_scale=1.5, cfg_renorm="none"
    )
    fn = guided_velocity(full=full, text_uncond=text_u, image_uncond=None, config=cfg)
    # image context shared with full: v_img_u = v_full = 2, v_txt = 0 + 3·2 = 6, v = 2 + 1.5·(6 − 2) = 8
    assert float(fn(torch.zeros(1, 1), 1.0)) == pytest.approx(8.0)
    assert len(full.times) == 1 and len(text_u.times) == 1
    image_u = _Counter(5.0)
    unit = SamplerConfig(cfg_text_scale=1.0, cfg_image_scale=1.0, cfg_interval=(0.0, 1.0))
    fn = guided_velocity(full=full, text_uncond=text_u, image_uncond=image_u, config=unit)
    assert float(fn(torch.zeros(1, 1), 0.5)) == pytest.approx(2.0)
    assert len(text_u.times) == 1 and image_u.times == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_steps": 0}, "num_steps"),
        ({"cfg_interval": (0.6, 0.4)}, "cfg_interval"),
        ({"cfg_renorm": "per_token"}, "cfg_renorm"),
        ({"renorm_min": 2.0}, "renorm_min"),
    ],
)
def test_sampler_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**kwargs)


def test_choose_token_greedy_restricted_and_nucleus():
    logits = torch.tensor([0.0, 5.0, 1.0, 4.0])
    assert choose_token(logits) == 1
    assert choose_token(logits, allowed=[0, 2, 3]) == 3
    assert choose_token(logits, banned=[1, 3]) == 2
    g = torch.Generator().manual_seed(0)
    # top_p below the top id's mass keeps only that id, whatever the temperature
    assert {choose_token(logits, temperature=5.0, top_p=0.2, generator=g) for _ in range(30)} == {1}
    # a high temperature without top-p reaches other ids, and only allowed ones
    drawn = {choose_token(logits, temperature=50.0, allowed=[0, 2], generator=g) for _ in range(60)}
    assert drawn == {0, 2}
    with pytest.raises(ValueError, match="excluded"):
        choose_token(logits, allowed=[1], banned=[1])
