"""Strategy factories (construct only; the 2-process runs are in test_distributed.py) and FSDP2 unit selection."""

from __future__ import annotations

import pytest
import torch
from _tiny_system import Block, TinyNet
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from chatumm_kit.training.strategies import (
    FSDP2Plan,
    FSDP2Strategy,
    _unit_names,
    ddp,
    fsdp2,
    fsdp2_mixed_precision,
    fsdp_gpu,
)


def test_ddp_defaults():
    s = ddp()
    assert isinstance(s, DDPStrategy)
    assert s._ddp_kwargs["find_unused_parameters"] is False
    assert s.process_group_backend is None  # resolved at setup: gloo on CPU, nccl on CUDA
    assert ddp(find_unused_parameters=True, static_graph=True)._ddp_kwargs == {
        "find_unused_parameters": True,
        "static_graph": True,
    }


def test_fsdp2_factory_builds_a_model_parallel_strategy_with_its_plan():
    s = fsdp2(unit_names=["layers"], mixed_precision=None, activation_checkpointing=False)
    assert isinstance(s, FSDP2Strategy) and isinstance(s, ModelParallelStrategy)
    assert s.plan == FSDP2Plan(unit_names=("layers",), mixed_precision=None, activation_checkpointing=False)
    assert s._save_distributed_checkpoint is True and s._tensor_parallel_size == 1
    assert fsdp2().plan.mixed_precision == "bf16"
    with pytest.raises(ValueError, match="mixed_precision"):
        fsdp2(mixed_precision="fp16")
    with pytest.raises(ValueError, match="unit_names"):
        fsdp2(unit_names=())


def test_mixed_precision_policy_only_where_bf16_runs():
    assert fsdp2_mixed_precision(None, device_type="cpu") is None
    with pytest.raises(ValueError, match="pass mixed_precision=None"):
        fsdp2_mixed_precision("bf16", device_type="cpu")
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        policy = fsdp2_mixed_precision("bf16", device_type="cuda")
        assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32


def test_units_are_layer_list_elements_deepest_first():
    class Vision(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block(dim=4) for _ in range(2))

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = TinyNet()
            self.vit = Vision()
            self.layers_norm = nn.LayerNorm(4)  # a name that merely starts with "layers" is not a unit

    m = Both()
    names = _unit_names(m, unit_names=("layers", "blocks"), unit_types=(), predicate=None)
    assert names == ["lm.layers.0", "lm.layers.1", "vit.blocks.0", "vit.blocks.1"]
    only_lm = _unit_names(m, unit_names=("layers",), unit_types=(), predicate=None)
    assert only_lm == ["lm.layers.0", "lm.layers.1"]
    by_type = _unit_names(m, unit_names=(), unit_types=(nn.LayerNorm,), predicate=None)
    assert by_type == ["lm.layers.0.norm", "lm.layers.1.norm", "vit.blocks.0.norm", "vit.blocks.1.norm", "layers_norm"]
    nested = _unit_names(m, unit_names=("layers",), unit_types=(), predicate=lambda n, _: n == "lm")
    assert nested == ["lm.layers.0", "lm.layers.1", "lm"]  # children are sharded before their parent


def test_fsdp_gpu_constructs_with_per_layer_policies():
    s = fsdp_gpu(layer_types=["torch.nn.TransformerEncoderLayer", Block], state_dict_type="sharded")
    assert isinstance(s, FSDPStrategy)
    assert s._state_dict_type == "sharded"
    assert s.mixed_precision.param_dtype == torch.bfloat16 and s.mixed_precision.reduce_dtype == torch.float32
    assert s.kwargs["auto_wrap_policy"]._module_classes == {nn.TransformerEncoderLayer, Block}
    assert fsdp_gpu(layer_types=[Block], mixed_precision=None, activation_checkpointing=False).mixed_precision is None
    with pytest.raises(ValueError, match="nn.Module classes"):
        fsdp_gpu(layer_types=["torch.optim.AdamW"])  # on the recipe allow-list, but not a module class
    with pytest.raises(ValueError, match="'torch.nn.functional.relu' is not on the recipe allow-list"):
        fsdp_gpu(layer_types=["torch.nn.functional.relu"])


def test_fsdp2_refuses_to_checkpoint_layers_that_checkpoint_themselves():
    """Activation checkpointing is one setting: the strategy's or the model's, never both (no double recompute)."""
    from chatumm_kit.components.mot import MoTBackbone
    from chatumm_kit.training.strategies import apply_fsdp2

    sizes = dict(
        vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=8
    )
    with pytest.raises(ValueError, match=r"^apply_fsdp2\(activation_checkpointing=True\): MoTBackbone already"):
        apply_fsdp2(MoTBackbone(**sizes, gradient_checkpointing=True), device_mesh=None)
