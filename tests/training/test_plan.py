"""``chatumm plan``: its arithmetic equals what a tiny model really allocates on CPU, and the 7B plan is consistent."""

from __future__ import annotations

import json

import pytest
import torch

from chatumm_kit.cli import main
from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.packing import Packer
from chatumm_kit.systems.unified import ChatUMMSystem
from chatumm_kit.training.plan import GIB, RunShape, plan_training

SPEC = {"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": 300, "hidden_size": 32, "num_layers": 1, "intermediate_size": 64,
        "vit_hidden": 32, "vit_layers": 1}  # fmt: skip


def _batch():
    from chatumm_kit.components.tokenizer import ChatTokenizer

    tok = ChatTokenizer.train(["draw a red circle", "it is red"] * 10, vocab_size=300)
    d = Dialogue(
        id="d",
        turns=[
            Turn(role=Role.USER, segments=[TextSegment(text="draw a red circle"), ImageSegment(image="a")]),
            Turn(role=Role.ASSISTANT, segments=[TextSegment(text="it is red"), ImageSegment(image="b")]),
        ],
    )
    images = {k: torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) for k in "ab"}
    return Packer(tokenizer=tok, vit_patch_size=8, vae_token_stride=8, max_image_side=32).pack(
        [DialogueSample(dialogue=d, images=images, key="d")]
    )


@pytest.mark.parametrize("master_dtype", ["float32", "bfloat16"])
def test_plan_equals_measured_weight_gradient_and_adamw_bytes(master_dtype):
    # vit and understanding frozen: trainable and frozen parameters both present, as with an adapter on a frozen base
    system = ChatUMMSystem(model=SPEC, freeze={"vit": True, "understanding": True}, master_dtype=master_dtype)
    system.configure_model()
    model = system.model
    plan = plan_training(model, RunShape(strategy="single", devices=1, tokens=512))
    optimizer = system.configure_optimizers()["optimizer"]
    out = model(_batch())
    (out.ce_loss + out.mse_loss).backward()
    optimizer.step()

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert plan.weight_bytes == weights
    assert plan.grad_bytes == grads > 0  # every trainable parameter got a gradient, no frozen one did
    assert plan.optimizer_bytes == state > 2 * grads  # exp_avg + exp_avg_sq + a step tensor each
    assert plan.trainable_params + plan.frozen_params == plan.total_params
    assert plan.frozen_params == sum(p.numel() for p in model.parameters() if not p.requires_grad) > 0
    assert plan.weight_bytes == plan.total_params * (4 if master_dtype == "float32" else 2)


def test_fsdp2_shards_rows_as_fully_shard_does():
    # tests/training/test_distributed.py measures a 17x8 embedding's shards on 2 ranks: 72 and 64 elements
    net = torch.nn.Embedding(17, 8)
    net.backbone = type("B", (), {"config": type("C", (), {"hidden_size": 8, "intermediate_size": 16,
                                                            "num_layers": 0, "vocab_size": 17})})  # fmt: skip
    plan = plan_training(net, RunShape(strategy="fsdp2", devices=2, tokens=1, ce_fraction=0.0))
    assert plan.weight_bytes == 72 * 4 and plan.grad_bytes == 72 * 4 and plan.optimizer_bytes == 2 * 72 * 4 + 4


def test_bagel_7b_plan_on_8_gpus_with_and_without_activation_checkpointing(capsys):
    def plan(*overrides):
        assert main(["plan", "bagel_7b/sft_chat_fsdp", *overrides, "--preset", "chatumm_bagel_7b", "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    on, off = plan("trainer.devices=8"), plan("trainer.devices=8", "trainer.strategy.activation_checkpointing=false")
    assert on["total_params"] == 14_658_838_147 and on["run"]["devices"] == 8 and on["run"]["strategy"] == "fsdp2"
    assert on["run"]["compute_dtype"] == "bfloat16" and on["run"]["tokens"] == 32768
    # fp32 master weights, sharded 8 ways (each tensor's rows rounded up): ~14.66e9 * 4 / 8 bytes
    assert on["weight_bytes"] == pytest.approx(on["total_params"] * 4 / 8, rel=1e-3)
    assert on["optimizer_bytes"] == pytest.approx(2 * on["grad_bytes"], rel=1e-4)
    assert on["weight_bytes"] == off["weight_bytes"] and on["activation_bytes"] < off["activation_bytes"] / 5
    assert on["total_gib"] < 80 < off["total_gib"]  # checkpointing is what fits an 80 GB card
    one = plan("trainer.devices=1")
    assert one["weight_bytes"] == pytest.approx(8 * on["weight_bytes"], rel=1e-3)
    assert one["total_bytes"] / GIB > 200


def test_plan_of_a_lora_system_counts_adapters_as_trainable_and_equals_measured_bytes():
    # issue 15: the plan accounts for adapters — LoRA weights (and nothing else) trainable, the base frozen
    adapter = {"_component_": "chatumm_kit.training.adapters.LoraSpec", "rank": 4, "init": "random"}
    system = ChatUMMSystem(model=SPEC, adapter=adapter)
    system.configure_model()
    model = system.model
    plan = plan_training(model, RunShape(strategy="single", devices=1, tokens=512))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert plan.trainable_params == lora > 0
    assert plan.frozen_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    optimizer = system.configure_optimizers()["optimizer"]
    out = model(_batch())
    (out.ce_loss + out.mse_loss).backward()
    optimizer.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert plan.grad_bytes == grads == 4 * lora
    assert plan.optimizer_bytes == state


def test_lora_chat_plan_needs_a_fraction_of_full_fine_tuning_state(capsys):
    def plan(recipe):
        assert main(["plan", recipe, "trainer.devices=1", "--preset", "chatumm_bagel_7b", "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    lora, full = plan("bagel_7b/lora_chat"), plan("bagel_7b/sft_chat_freeze_und_ddp")
    assert lora["trainable_params"] < 0.05 * lora["total_params"]
    assert lora["optimizer_bytes"] < 0.1 * full["optimizer_bytes"]
