"""VAE latents in training (SPEC §4.1): precomputed posteriors give exactly the on-the-fly forward, posterior
sampling is ``mean + σ·ε`` from the step's generator (training mode only, after the flow draws), and leaving it off
changes nothing."""

from __future__ import annotations

import pytest
import torch

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.components.vae import LatentPosterior
from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.packing import CFGDropRates, Packer
from chatumm_kit.presets import build_model

TEXTS = ["draw a red circle", "make it blue", "it is blue"]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.train(TEXTS * 5, vocab_size=280)


@pytest.fixture(scope="module")
def batch(tok):
    g = torch.Generator().manual_seed(0)
    d = Dialogue(
        id="d",
        turns=[
            Turn(role=Role.USER, segments=[TextSegment(text="draw a red circle")]),
            Turn(role=Role.ASSISTANT, segments=[ImageSegment(image="a")]),
            Turn(role=Role.USER, segments=[ImageSegment(image="b"), TextSegment(text="make it blue")]),
            Turn(role=Role.ASSISTANT, segments=[TextSegment(text="it is blue"), ImageSegment(image="c")]),
        ],
    )
    images = {
        k: torch.randint(0, 256, (3, 32, 24 + 8 * i), dtype=torch.uint8, generator=g) for i, k in enumerate("abc")
    }
    packer = Packer(
        tokenizer=tok, vit_patch_size=8, vae_token_stride=8, max_image_side=32, drop_rates=CFGDropRates.disabled()
    )
    return packer.pack([DialogueSample(dialogue=d, images=images, key="d")])


def _model(tok, **kw):
    torch.manual_seed(0)
    m = build_model({"preset": "chatumm_tiny", "vocab_size": tok.vocab_size, **kw})
    with torch.no_grad():  # a non-zero velocity head, so the MSE depends on the inputs
        m.vae.llm2vae.weight.normal_(0, 0.1)
    return m


def test_precomputed_latents_equal_on_the_fly_encoding(tok, batch):
    model = _model(tok).eval()
    flow = model.draw_flow(batch, generator=torch.Generator().manual_seed(1))
    live = model(batch, flow=flow)
    cached = model.vae.posterior(batch.vae_images)  # what a user caches offline, one per image
    assert len(cached) == 3 and all(p.std is not None and p.std.shape == p.mean.shape for p in cached)
    for latents in (cached, [p.mean for p in cached]):
        out = model(batch, flow=flow, latents=latents)
        assert torch.equal(out.ce_sum, live.ce_sum) and torch.equal(out.mse_sum, live.mse_sum)
        assert torch.equal(out.velocity_target, live.velocity_target)
    with pytest.raises(ValueError, match="2 precomputed latents for 3 images"):
        model(batch, flow=flow, latents=cached[:2])


def test_cached_posteriors_are_sampled_like_live_ones(tok, batch, tmp_path):
    """The README's recipe for cached latents: posteriors saved with safetensors and read back give the live forward
    in training mode with posterior sampling on (the draws land on the cached mean and σ); means alone cannot."""
    from safetensors.torch import load_file, save_file

    model = _model(tok, sample_posterior=True).train()
    flow = model.draw_flow(batch, generator=torch.Generator().manual_seed(4))
    live = model(batch, flow=flow)
    with torch.no_grad():
        cached = model.vae.posterior(batch.vae_images)
    tensors = {f"{i}.{k}": getattr(p, k).contiguous() for i, p in enumerate(cached) for k in ("mean", "std")}
    save_file(tensors, str(tmp_path / "latents.safetensors"))
    back = load_file(str(tmp_path / "latents.safetensors"))
    read = [LatentPosterior(mean=back[f"{i}.mean"], std=back[f"{i}.std"]) for i in range(len(cached))]
    out = model(batch, flow=flow, latents=read)
    assert torch.allclose(out.mse_sum, live.mse_sum, rtol=1e-6) and torch.allclose(out.ce_sum, live.ce_sum, rtol=1e-6)
    assert torch.allclose(out.velocity_target, live.velocity_target, atol=1e-6)
    with pytest.raises(ValueError, match="holds only the mean"):
        model(batch, flow=flow, latents=[p.mean for p in read])


def test_posterior_sampling_is_mean_plus_sigma_eps(tok, batch):
    model = _model(tok, sample_posterior=True).train()
    flow = model.draw_flow(batch, generator=torch.Generator().manual_seed(2))
    assert flow.posterior_noise is not None
    assert [tuple(e.shape) for e in flow.posterior_noise] == [
        (4, 8, 6),
        (4, 8, 8),
        (4, 6, 8),
    ]  # [C, H/4, W/4]; 32×40 capped to 24×32
    x0 = model.vae_clean_tokens(batch, flow=flow)
    # independently: the diffusers posterior, normalised by hand (z <- scale · (z − shift))
    vae = model.vae
    expected = []
    for img, eps in zip(batch.vae_images, flow.posterior_noise):
        dist = vae.autoencoder.encode(img[None]).latent_dist
        expected.append((vae.scaling_factor * (dist.mean[0] + dist.std[0] * eps - vae.shift_factor)).detach())
    assert torch.allclose(x0, vae.view_tokens(expected, batch.vae_view_image), atol=1e-6)
    means = vae.view_tokens(vae.encode(batch.vae_images), batch.vae_view_image)
    assert not torch.allclose(x0, means)  # σ > 0: the sample is not the mean
    out = model(batch, flow=flow)
    noised = x0[batch.mse_token_mask]
    assert torch.allclose(out.velocity_target, flow.noise - noised, atol=1e-6)


def test_sampling_only_in_training_and_after_the_flow_draws(tok, batch):
    plain, sampling = _model(tok), _model(tok, sample_posterior=True)
    a = plain.train().draw_flow(batch, generator=torch.Generator().manual_seed(3))
    b = sampling.train().draw_flow(batch, generator=torch.Generator().manual_seed(3))
    assert a.posterior_noise is None
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.noise, b.noise)  # the flow draws do not move
    sampling.eval()
    c = sampling.draw_flow(batch, generator=torch.Generator().manual_seed(3))
    assert c.posterior_noise is None  # evaluation uses the mean
    assert torch.equal(sampling(batch, flow=c).mse_sum, plain.eval()(batch, flow=c).mse_sum)


def test_mean_only_posterior_cannot_be_sampled() -> None:
    with pytest.raises(ValueError, match="holds only the mean"):
        LatentPosterior(mean=torch.zeros(4, 2, 2)).sample(torch.zeros(4, 2, 2))
