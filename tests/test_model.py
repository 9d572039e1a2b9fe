import time

import pytest
import torch

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.config import resolve_callable
from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.packing import Packer
from chatumm_kit.model import FlowInputs
from chatumm_kit.presets import LEGACY_PRESET_NAMES, build_model, chatumm_bagel_7b, check_model_spec, model_spec

TEXTS = ["draw a red circle", "what colour is it", "it is red", "make it blue", "a blue square"]


@pytest.fixture(scope="module")
def tokenizer():
    return ChatTokenizer.train(TEXTS * 5, vocab_size=300)


def _sample(key: str, seed: int) -> DialogueSample:
    g = torch.Generator().manual_seed(seed)
    d = Dialogue(
        id=key,
        turns=[
            Turn(role=Role.USER, segments=[TextSegment(text="draw a red circle", droppable=True)]),
            Turn(role=Role.ASSISTANT, segments=[ImageSegment(image="a")]),
            Turn(role=Role.USER, segments=[TextSegment(text="what colour is it")]),
            Turn(role=Role.ASSISTANT, segments=[TextSegment(text="it is red"), ImageSegment(image="b")]),
        ],
    )
    images = {k: torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g) for k in ("a", "b")}
    return DialogueSample(dialogue=d, images=images, key=key)


@pytest.fixture(scope="module")
def batch(tokenizer):
    packer = Packer(tokenizer=tokenizer, vit_patch_size=8, vae_token_stride=8, max_image_side=32)
    return packer.pack([_sample("k0", 0), _sample("k1", 1)])


@pytest.fixture
def model(tokenizer):
    return build_model({"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": tokenizer.vocab_size})


def test_forward_shapes_and_counts(model, batch, tokenizer):
    out = model(batch)
    assert out.logits.shape == (batch.ce_indices.numel(), tokenizer.vocab_size)
    assert out.ce_count == batch.ce_indices.numel() > 0
    # two generated images per dialogue, 16 latent tokens each (32 px / 8 px per token = 4×4)
    assert out.mse_count == 2 * 2 * 16 == batch.mse_indices.numel()
    assert out.velocity.shape == out.velocity_target.shape == (out.mse_count, model.vae.token_dim)
    assert out.flow.timesteps.shape == (4,)
    # llm2vae starts at zero (SPEC §4): the first prediction is exactly 0, the MSE is E|ε − x0|²
    assert torch.equal(out.velocity, torch.zeros_like(out.velocity))
    assert torch.allclose(out.mse_loss, out.velocity_target.pow(2).mean())


def test_velocity_target_is_noise_minus_clean_latents_of_the_right_image(model, batch):
    n = int(batch.mse_token_mask.sum())
    flow = FlowInputs(timesteps=torch.full((batch.num_noised_views,), 0.5), noise=torch.randn(n, model.vae.token_dim))
    out = model(batch, flow=flow)
    # independent path: encode every VAE image and patchify it ourselves
    latents = model.vae.encode(batch.vae_images)
    expected = []
    for view, noised in enumerate(batch.vae_view_noised.tolist()):
        if noised:
            expected.append(model.vae.patchify(latents[int(batch.vae_view_image[view])]))
    x0 = torch.cat(expected)
    torch.testing.assert_close(out.velocity_target, flow.noise - x0)


def test_fixed_flow_is_deterministic_and_timesteps_change_the_output(model, batch):
    n = int(batch.mse_token_mask.sum())
    torch.nn.init.normal_(model.vae.llm2vae.weight, std=0.02)
    noise = torch.randn(n, model.vae.token_dim)
    a = model(batch, flow=FlowInputs(timesteps=torch.full((4,), 0.3), noise=noise))
    b = model(batch, flow=FlowInputs(timesteps=torch.full((4,), 0.3), noise=noise))
    c = model(batch, flow=FlowInputs(timesteps=torch.full((4,), 0.9), noise=noise))
    assert torch.equal(a.velocity, b.velocity) and torch.equal(a.logits, b.logits)
    assert not torch.allclose(a.velocity, c.velocity)
    # text before the first generated image cannot see noised latents: its logits do not depend on t (SPEC §3)
    first_noise = int(batch.mse_indices.min())
    early = batch.ce_indices < first_noise
    assert early.any()
    torch.testing.assert_close(a.logits[early], c.logits[early])


def test_overfitting_one_batch_lowers_both_losses(model, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    flow = model.draw_flow(batch, generator=g)
    first = model(batch, flow=flow)
    for _ in range(40):
        out = model(batch, flow=flow)
        opt.zero_grad()
        (out.ce_loss + out.mse_loss).backward()
        opt.step()
    last = model(batch, flow=flow)
    assert last.ce_loss < 0.5 * first.ce_loss
    assert last.mse_loss < 0.8 * first.mse_loss


def test_frozen_autoencoder_gets_no_gradient(model, batch):
    out = model(batch)
    (out.ce_loss + out.mse_loss).backward()
    assert all(p.grad is None for p in model.vae.autoencoder.parameters())
    assert model.vae.vae2llm.weight.grad is not None and model.vit.patch_embedding.weight.grad is not None


def test_tiny_preset_is_fast(tokenizer, batch):
    start = time.perf_counter()
    model = build_model({"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": tokenizer.vocab_size})
    built = time.perf_counter() - start
    model(batch)  # warm-up
    start = time.perf_counter()
    out = model(batch)
    (out.ce_loss + out.mse_loss).backward()
    step = time.perf_counter() - start
    # Issue target: < 1 s each on one core. Bounds are loose because CI machines are shared and noisy.
    assert built < 3.0 and step < 3.0, (built, step)


def test_bagel_7b_builds_on_meta_without_allocating():
    with torch.device("meta"):
        model = chatumm_bagel_7b()
    params = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())
    # Qwen2.5-7B is 7.6e9 parameters; the MoT duplicates every layer weight (not embeddings, lm_head) → ~14.1e9
    layer = (3584 * 3584 + 3584) + 2 * (3584 * 512 + 512) + 3584 * 3584 + 2 * 128 + 3 * 3584 * 18944 + 2 * 3584
    assert backbone == 2 * 152064 * 3584 + 28 * 2 * layer + 2 * 3584
    assert 14.0e9 < params < 15.0e9


def test_model_spec_errors_name_the_key():
    with pytest.raises(ValueError, match="model.hiden_size: unexpected keyword argument 'hiden_size'"):
        check_model_spec({"_component_": "chatumm_kit.presets.chatumm_tiny", "hiden_size": 3})
    with pytest.raises(ValueError, match="model._component_: 'os.system' is not on the recipe allow-list"):
        check_model_spec({"_component_": "os.system"})
    with pytest.raises(ValueError, match="model.preset: unknown preset 'nope'"):
        check_model_spec({"preset": "nope"})
    with pytest.raises(ValueError, match="model: a model spec needs _component_"):
        check_model_spec({"vocab_size": 3})


def test_an_old_preset_spec_builds_the_same_model_as_its_component_form(tokenizer):
    """Checkpoints and kit folders written before _component_ named the model hold {preset: NAME}: still loads."""
    old = {"preset": "chatumm_tiny", "vocab_size": tokenizer.vocab_size, "hidden_size": 32}
    assert model_spec(old) == {
        "_component_": "chatumm_kit.presets.chatumm_tiny",
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": 32,
    }
    torch.manual_seed(0)
    a = build_model(old)
    torch.manual_seed(0)
    b = build_model(model_spec(old))
    assert a.hidden_size == 32 and a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert {name: resolve_callable(dotted).__name__ for name, dotted in LEGACY_PRESET_NAMES.items()} == {
        name: name for name in LEGACY_PRESET_NAMES
    }


def test_system_freeze_switches_decide_which_parts_get_gradients(tokenizer, batch):
    from chatumm_kit.systems.unified import ChatUMMSystem

    spec = {"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": tokenizer.vocab_size}
    frozen = ChatUMMSystem(model=spec, freeze={"vit": True, "understanding": True, "embeddings": True})
    frozen.configure_model()
    out = frozen.model(batch)
    (out.ce_loss + out.mse_loss).backward()
    m = frozen.model
    assert m.vit.patch_embedding.weight.grad is None and m.backbone.embed_tokens.weight.grad is None
    assert m.backbone.layers[0].mlp.up_proj.weight.grad is None
    assert m.backbone.layers[0].mlp_moe_gen.up_proj.weight.grad is not None
    assert m.backbone.lm_head.weight.grad is None and m.backbone.norm.weight.grad is None

    # The understanding expert alone: the shared embed_tokens/lm_head keep the CE loss a trainable path.
    und_only = ChatUMMSystem(model=spec, freeze={"understanding": True})
    und_only.configure_model()
    out = und_only.model(batch)
    out.ce_loss.backward()
    b = und_only.model.backbone
    assert b.layers[0].mlp.up_proj.weight.grad is None and b.norm.weight.grad is None
    assert b.embed_tokens.weight.grad.abs().sum() > 0 and b.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.vae.autoencoder.parameters())  # the VAE is frozen by default

    unfrozen = ChatUMMSystem(model=spec, freeze={"vae": False})
    unfrozen.configure_model()
    out = unfrozen.model(batch)
    (out.ce_loss + out.mse_loss).backward()
    enc = unfrozen.model.vae.autoencoder.encoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
