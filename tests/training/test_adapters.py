"""LoRA on ChatUMM (training/adapters.py): targets per expert and projection, gradients only where asked, merged ==
unmerged, peft's own loader reads a kit adapter, bf16 base with fp32 adapters, gradient checkpointing, EMA."""

from types import SimpleNamespace

import pytest
import torch

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.config import RecipeError, load_recipe, validate_recipe
from chatumm_kit.data.packing import Packer
from chatumm_kit.data.shards import read_samples
from chatumm_kit.presets import chatumm_tiny
from chatumm_kit.synth.pipeline import run_synth
from chatumm_kit.training.adapters import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterError,
    LoraSpec,
    apply_lora,
    has_adapter,
    load_adapter,
    merge_adapter,
    parameter_counts,
    save_adapter,
)
from chatumm_kit.training.ema import EMAWeights
from chatumm_kit.training.prepare import dialogue_texts

SIZES = dict(hidden_size=32, num_layers=2, intermediate_size=64, vit_hidden=32, vit_layers=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    cfg = load_recipe("shapes/synth", [f"output_dir={root}", "synth.num_dialogues=3", "synth.shard_size=3"])
    run_synth(cfg)
    samples = list(read_samples(root / "index.json"))
    tokenizer = ChatTokenizer.train(dialogue_texts(str(root / "index.json")), vocab_size=300)
    packer = Packer(
        tokenizer=tokenizer, vit_patch_size=8, vae_token_stride=8, max_image_side=32,
        drop_rates={"text": 0.0, "vit": 0.0, "vae": 0.0},
    )  # fmt: skip
    batch = packer.pack(samples)
    assert batch.mse_indices.numel() and batch.ce_indices.numel() and batch.vit_indices.numel()
    return SimpleNamespace(batch=batch, vocab=tokenizer.vocab_size)


def _base(world, **overrides):
    torch.manual_seed(3)
    model = chatumm_tiny(vocab_size=world.vocab, **{**SIZES, **overrides})
    with torch.no_grad():  # zero-initialised head: give velocities something to differ in
        model.vae.llm2vae.weight.normal_(std=0.05)
    return model


def _outputs(model, world):
    flow = model.draw_flow(world.batch, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.eval()(world.batch, flow=flow)
    return out.logits.double(), out.velocity.double()


def _adapted_modules(model):
    return sorted(
        {n.split(".lora_")[0].split(".modules_to_save")[0] for n, p in model.named_parameters() if p.requires_grad}
    )


def test_targets_are_chosen_per_expert_and_projection(world):
    und = apply_lora(_base(world), LoraSpec(rank=2, experts="understanding", attention=["q", "o"], mlp=["down"]))
    expect = [
        f"backbone.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "self_attn.o_proj", "self_attn.q_proj")
    ]
    assert _adapted_modules(und) == sorted(expect)
    gen = apply_lora(_base(world), LoraSpec(rank=2, experts="generation", attention=[], mlp=["gate", "up"]))
    assert _adapted_modules(gen) == sorted(
        f"backbone.layers.{i}.mlp_moe_gen.{p}_proj" for i in range(2) for p in ("gate", "up")
    )
    both = apply_lora(_base(world), LoraSpec(rank=2, connectors=True, vit=True, embeddings=True))
    names = _adapted_modules(both)
    assert len([n for n in names if n.startswith("backbone.layers.")]) == 2 * 2 * 7  # layers x experts x (4 + 3)
    assert {"backbone.embed_tokens", "backbone.lm_head", "vae.llm2vae", "vit.connector.fc1"} <= set(names)
    assert any(n.startswith("vit.layers.0.attn") for n in names)
    counts = parameter_counts(both)
    assert 0 < counts.trainable < counts.frozen / 5


def test_bad_targets_and_specs_are_named():
    with pytest.raises(AdapterError, match=r"attention\[1\]: unknown projection 'x'"):
        LoraSpec(attention=["q", "x"])
    with pytest.raises(AdapterError, match="rank"):
        LoraSpec(rank=0)
    with pytest.raises(AdapterError, match=r"dropout: must be in \[0, 1\), got 'x'"):
        LoraSpec(dropout="x")
    with pytest.raises(AdapterError, match="matches no module"):
        apply_lora(chatumm_tiny(vocab_size=50, num_layers=1), LoraSpec(extra_targets=[r"backbone\.nope"]))
    with pytest.raises(AdapterError, match="trainable: 'backbone.head' is not a module"):
        apply_lora(chatumm_tiny(vocab_size=50, num_layers=1), LoraSpec(trainable=["backbone.head"]))


def test_recipe_validation_names_the_yaml_path_of_a_bad_adapter_key():
    node = {"_component_": "chatumm_kit.training.adapters.LoraSpec", "rank": 4}
    recipe = {"system": {"_component_": "chatumm_kit.systems.unified.ChatUMMSystem",
                         "model": {"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": 50},
                         "adapter": node}}  # fmt: skip
    validate_recipe(recipe)
    node["rnk"] = 4
    node["attention"] = ["q", "qq"]
    node["experts"] = "vision"
    with pytest.raises(RecipeError) as err:
        validate_recipe(recipe)
    text = str(err.value)
    assert "system.adapter.rnk: unexpected keyword argument" in text
    assert "system.adapter.attention[1]: unknown projection 'qq'" in text
    assert "system.adapter.experts" in text


def test_only_adapter_and_named_parameters_get_gradients(world):
    spec = LoraSpec(rank=2, connectors=True, embeddings=True, trainable=["backbone.norm_moe_gen"], init="random")
    model = apply_lora(_base(world), spec).train()
    out = model(world.batch, generator=torch.Generator().manual_seed(0))
    (out.ce_loss + out.mse_loss).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(".lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("moe_gen" in n and "lora_B" in n for n in trainable) and any("embed_tokens.lora" in n for n in trainable)
    assert "backbone.norm_moe_gen.modules_to_save.default.weight" in trainable
    assert all(model.get_parameter(n).grad.abs().max() > 0 for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert (
        "backbone.layers.0.self_attn.q_proj.base_layer.weight" in frozen
        and "backbone.lm_head.base_layer.weight" in frozen
    )


def test_unmerged_adapter_and_merged_model_give_the_same_logits_and_velocities(world):
    base_logits, base_velocity = _outputs(_base(world), world)
    spec = LoraSpec(rank=4, alpha=8, connectors=True, vit=True, embeddings=True, init="random",
                    trainable=["backbone.norm"])  # fmt: skip
    model = apply_lora(_base(world), spec)
    with torch.no_grad():  # the full-trained copy differs from the base too
        model.backbone.norm.modules_to_save["default"].weight.mul_(1.5)
    logits, velocity = _outputs(model, world)
    assert (logits - base_logits).abs().max() > 1e-2 and (velocity - base_velocity).abs().max() > 1e-3  # it adapts
    merged = merge_adapter(model)
    assert not has_adapter(merged)
    assert set(merged.state_dict()) == set(_base(world).state_dict())  # the plain kit layout again
    merged_logits, merged_velocity = _outputs(merged, world)
    assert (merged_logits - logits).abs().max() < 1e-5
    assert (merged_velocity - velocity).abs().max() < 1e-5


def test_kit_adapter_loads_with_peft_own_loader_and_with_load_adapter(world, tmp_path):
    from peft import PeftModel

    spec = LoraSpec(rank=4, experts="both", embeddings=True, init="random", trainable=["vae.llm2vae"])
    model = apply_lora(_base(world), spec)
    with torch.no_grad():
        model.vae.llm2vae.modules_to_save["default"].weight.add_(0.1)
    folder = save_adapter(model, tmp_path / "adapter", base="tiny-base")
    assert (folder / ADAPTER_WEIGHTS_FILE).is_file() and (folder / ADAPTER_CONFIG_FILE).is_file()
    logits, velocity = _outputs(model, world)

    peft_model = PeftModel.from_pretrained(_base(world), str(folder))  # peft's own loader, same base
    peft_logits, peft_velocity = _outputs(peft_model.base_model.model, world)
    assert (peft_logits - logits).abs().max() < 1e-6 and (peft_velocity - velocity).abs().max() < 1e-6
    assert peft_model.peft_config["default"].base_model_name_or_path == "tiny-base"

    loaded = load_adapter(_base(world), folder)
    kit_logits, kit_velocity = _outputs(loaded, world)
    assert torch.equal(kit_logits, logits) and torch.equal(kit_velocity, velocity)

    with pytest.raises(AdapterError, match="does not fit|missing"):  # a base with another depth
        load_adapter(_base(world, num_layers=3), folder)


def test_bf16_base_with_fp32_adapter_weights_trains_under_autocast(world):
    spec = LoraSpec(rank=4, base_dtype="bfloat16", init="random", trainable=["backbone.lm_head"])
    model = apply_lora(_base(world), spec).train()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if ".lora_" in n or "modules_to_save" in n)
    assert dtypes["backbone.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["vit.connector.fc1.weight"] == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(world.batch, generator=torch.Generator().manual_seed(0))
        loss = out.ce_loss + out.mse_loss
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_gradient_checkpointing_gives_the_same_adapter_gradients(world):
    def grads(checkpointing: bool):
        model = apply_lora(_base(world, gradient_checkpointing=checkpointing), LoraSpec(rank=2, init="random")).train()
        out = model(world.batch, generator=torch.Generator().manual_seed(0))
        (out.ce_loss + out.mse_loss).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 2 * 7 * 2
    assert max((plain[k] - ckpt[k]).abs().max().item() for k in plain) < 1e-6


def test_ema_averages_the_trainable_weights_only(world):
    model = apply_lora(_base(world), LoraSpec(rank=2, attention=["q"], mlp=[], trainable=["backbone.lm_head"]))
    ema = EMAWeights(module=model, decay=0.5)
    assert set(ema.shadow) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(ema.shadow) == 2 * 2 * 2 + 1  # (A, B) x layers x experts + the lm_head copy
    assert sum(t.numel() for t in ema.shadow.values()) == parameter_counts(model).trainable
