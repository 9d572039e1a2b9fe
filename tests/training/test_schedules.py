"""Warm-up + constant / cosine LR multipliers at given steps, through LambdaLR, and across a state-dict resume."""

from __future__ import annotations

import math

import pytest
import torch

from chatumm_kit.config import instantiate
from chatumm_kit.training.schedules import ConstantSchedule, CosineSchedule, schedule_node


def _opt(lr: float = 2.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(opt, sched, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_with_warmup_exact():
    spec = ConstantSchedule(warmup_steps=4)
    assert [spec.factor(s) for s in range(7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert ConstantSchedule(warmup_steps=0).factor(0) == 1.0
    opt = _opt(2.0)
    assert _lrs(opt, ConstantSchedule(warmup_steps=4).build(opt), 6) == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_cosine_with_warmup_exact():
    spec = CosineSchedule(warmup_steps=2, total_steps=6, min_ratio=0.1)
    c = math.cos(math.pi / 4)
    expected = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + c), 0.55, 0.1 + 0.45 * (1 - c), 0.1, 0.1, 0.1]
    assert [spec.factor(s) for s in range(9)] == pytest.approx(expected, abs=1e-15)
    assert spec.factor(1000) == pytest.approx(0.1, abs=1e-15)
    opt = _opt(2.0)
    got = _lrs(opt, CosineSchedule(warmup_steps=2, total_steps=6, min_ratio=0.1).build(opt), 8)
    assert got == pytest.approx([2 * e for e in expected[:8]], abs=1e-12)


def test_cosine_to_zero_midpoint_and_every_group_scaled():
    spec = CosineSchedule(total_steps=10)
    assert spec.factor(0) == 1.0 and spec.factor(5) == pytest.approx(0.5) and spec.factor(10) == 0.0
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": 1.0}, {"params": [p2], "lr": 0.1}])
    sched = spec.build(opt)
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])


def test_state_dict_resume_continues_the_curve():
    spec = CosineSchedule(warmup_steps=3, total_steps=12, min_ratio=0.2)
    opt = _opt(1.0)
    sched = spec.build(opt)
    full = _lrs(opt, sched, 10)
    opt2 = _opt(1.0)
    sched2 = spec.build(opt2)
    head = _lrs(opt2, sched2, 4)
    state = sched2.state_dict()
    opt3 = _opt(1.0)
    sched3 = spec.build(opt3)
    sched3.load_state_dict(state)
    opt3.param_groups[0]["lr"] = sched3.get_last_lr()[0]  # Lightning restores the optimizer's lr with its state
    assert head + _lrs(opt3, sched3, 6) == pytest.approx(full, abs=1e-15)


def test_lightning_config_steps_per_optimizer_step():
    cfg = CosineSchedule(warmup_steps=1, total_steps=5).lightning_config(_opt())
    assert cfg["interval"] == "step" and cfg["frequency"] == 1
    assert isinstance(cfg["scheduler"], torch.optim.lr_scheduler.LambdaLR)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": 4, "total_steps": 4}, "must exceed warmup_steps"),
        ({"total_steps": 4, "min_ratio": 1.5}, "min_ratio"),
        ({"warmup_steps": -1, "total_steps": 4}, "warmup_steps"),
    ],
)
def test_invalid_cosine(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CosineSchedule(**kwargs)


def test_schedule_nodes_use_component_and_old_kind_nodes_still_build():
    node = {"_component_": "chatumm_kit.training.schedules.CosineSchedule", "warmup_steps": 2, "total_steps": 6}
    assert schedule_node(node) == node
    assert instantiate(schedule_node(node)) == CosineSchedule(warmup_steps=2, total_steps=6)
    # A checkpoint written before _component_ named the schedule holds {kind: NAME, ...}.
    assert instantiate(schedule_node({"kind": "cosine", "warmup_steps": 2, "total_steps": 6})) == CosineSchedule(
        warmup_steps=2, total_steps=6
    )
    assert instantiate(schedule_node(None)) == ConstantSchedule()
    with pytest.raises(ValueError, match="schedule.kind: unknown 'linear'"):
        schedule_node({"kind": "linear"})
