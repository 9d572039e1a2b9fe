"""Weight-decay groups and optimizer construction (exact values)."""

from __future__ import annotations

import pytest
import torch
from _tiny_system import TinyNet, TinySystem
from torch import nn

from chatumm_kit.training.optim import OptimizerSpec, build_optimizer, no_weight_decay_names, param_groups

NO_DECAY = {
    "embed.weight",
    "pos_embed",
    "norm.weight",
    *(f"layers.{i}.{n}" for i in range(2) for n in ("norm.weight", "norm.bias", "fc1.bias", "fc2.bias")),
}
DECAY = {"head.weight", *(f"layers.{i}.{n}" for i in range(2) for n in ("fc1.weight", "fc2.weight"))}


def test_no_decay_on_norms_biases_embeddings_and_pos_tables():
    net = TinyNet()
    assert no_weight_decay_names(net) == NO_DECAY
    groups = param_groups(net, weight_decay=0.1)
    names = {id(p): n for n, p in net.named_parameters()}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert {names[id(p)] for p in groups[0]["params"]} == DECAY
    assert {names[id(p)] for p in groups[1]["params"]} == NO_DECAY


def test_decided_by_module_type_not_shape_for_2d_tables():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(5, 3)  # 2-D but an embedding
            self.pos_embed = nn.Parameter(torch.zeros(4, 3))  # 2-D but a position table
            self.proj = nn.Linear(3, 3, bias=False)  # 2-D matrix: decayed
            self.register_buffer("rope", torch.zeros(4, 3))  # buffers are never optimised

    assert no_weight_decay_names(Net()) == {"table.weight", "pos_embed"}


def test_tied_head_is_not_decayed_and_frozen_params_are_left_out():
    net = TinyNet()
    net.head.weight = net.embed.weight  # tied: the one tensor belongs to an embedding
    net.layers[1].requires_grad_(False)
    groups = param_groups(net, weight_decay=0.1)
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})  # each tensor once
    assert not any(p is net.embed.weight for p in groups[0]["params"])
    assert any(p is net.embed.weight for p in groups[1]["params"])
    frozen = {id(p) for p in net.layers[1].parameters()}
    assert not frozen & {id(p) for p in all_params}
    assert len(groups[0]["params"]) == 2  # layers.0.fc1.weight, layers.0.fc2.weight (head is tied now)


def test_lightning_module_names_carry_the_prefix():
    system = TinySystem()
    system.configure_model()
    assert no_weight_decay_names(system) == {f"model.{n}" for n in NO_DECAY}


def test_one_adamw_step_with_zero_grads_is_pure_decoupled_decay():
    net = TinyNet()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = OptimizerSpec(lr=0.1, weight_decay=0.5, betas=[0.8, 0.9]).build(net)  # a YAML list is accepted
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.8, 0.9)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # Adam's step is 0/(0+eps) = 0; only the decoupled decay p *= 1 - lr*wd acts
    for n, p in net.named_parameters():
        expected = before[n] if n in NO_DECAY else before[n] * (1 - 0.1 * 0.5)
        assert torch.equal(p.detach(), expected), n


def test_build_optimizer_and_errors():
    net = nn.Linear(2, 2)
    opt = build_optimizer(net, name="adam", lr=1e-3, weight_decay=0.0, eps=1e-6)
    assert type(opt) is torch.optim.Adam and opt.defaults["eps"] == 1e-6
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        OptimizerSpec(lr=1e-3, name="lion")
    with pytest.raises(ValueError, match="betas"):
        OptimizerSpec(lr=1e-3, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="no trainable parameters"):
        OptimizerSpec(lr=1e-3).build(net.requires_grad_(False))
