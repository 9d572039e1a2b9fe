"""FLUX ae.safetensors (original layout) -> diffusers AutoencoderKL, through diffusers' own converter."""

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from chatumm_kit.components.vae import VAELatentHead, autoencoder_config
from chatumm_kit.convert.flux_vae import (
    FluxVAEConversionError,
    diffusers_to_original,
    infer_autoencoder_kwargs,
    load_flux_vae,
    save_flux_vae,
)

# FLUX's architecture at toy width: 3 levels (4× downsample), 2 resnets per level, mid attention, no quant convs.
TINY_FLUX = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 32],
    layers_per_block=2,
    latent_channels=8,
    norm_num_groups=8,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)


@pytest.fixture(scope="module")
def tiny_ae():
    torch.manual_seed(0)
    ae = AutoencoderKL(**TINY_FLUX).eval()
    with torch.no_grad():  # move norms/biases off their init so a mis-mapped key cannot hide
        for p in ae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return ae


@pytest.fixture(scope="module")
def ae_file(tiny_ae, tmp_path_factory):
    path = tmp_path_factory.mktemp("flux") / "ae.safetensors"
    save_flux_vae(tiny_ae, path)
    return path


def test_export_writes_the_original_flux_layout(ae_file):
    state = load_file(ae_file)
    assert "encoder.down.0.block.1.norm1.weight" in state
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in state  # level 0 keeps its width
    assert "encoder.down.1.block.0.nin_shortcut.weight" in state  # 16 -> 32 needs a shortcut conv
    assert "encoder.down.1.downsample.conv.weight" in state and "encoder.down.2.downsample.conv.weight" not in state
    # decoder levels are indexed by resolution: level 0 is full resolution and has no upsample
    assert "decoder.up.0.upsample.conv.weight" not in state and "decoder.up.2.upsample.conv.weight" in state
    assert state["decoder.up.0.block.0.conv1.weight"].shape[0] == 16  # full-resolution level is the narrow one
    assert state["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert "encoder.mid.attn_1.proj_out.bias" in state and "decoder.mid.block_2.conv2.weight" in state
    assert not any("quant_conv" in k for k in state)


def test_loader_restores_identical_weights_and_encodings(tiny_ae, ae_file):
    loaded = load_flux_vae(ae_file, norm_num_groups=8)
    assert autoencoder_config(loaded)["block_out_channels"] == [16, 32, 32]
    assert loaded.config.latent_channels == 8 and not loaded.config.use_quant_conv
    ref_state = tiny_ae.state_dict()
    assert loaded.state_dict().keys() == ref_state.keys()
    assert all(torch.equal(v, ref_state[k]) for k, v in loaded.state_dict().items())
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).latent_dist.mode(), tiny_ae.encode(x).latent_dist.mode())
        assert torch.equal(loaded.decode(torch.ones(1, 8, 4, 4)).sample, tiny_ae.decode(torch.ones(1, 8, 4, 4)).sample)


def test_inferred_kwargs_match_the_architecture(ae_file):
    kwargs = infer_autoencoder_kwargs(load_file(ae_file), norm_num_groups=8)
    for key, value in TINY_FLUX.items():
        assert kwargs[key] == value, key


def test_vae_head_latents_are_the_normalised_diffusers_mode(ae_file, tiny_ae):
    head = VAELatentHead(hidden=16, autoencoder=load_flux_vae(ae_file, norm_num_groups=8), max_latent_side=8)
    images = [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1]
    with torch.no_grad():
        mode = tiny_ae.encode(images[0][None]).latent_dist.mode()[0]
    torch.testing.assert_close(head.encode(images)[0], (mode - 0.1159) * 0.3611, atol=1e-6, rtol=0)


def test_unused_and_missing_keys_are_reported(ae_file, tmp_path):
    state = load_file(ae_file)
    state["encoder.mid.attn_2.q.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(FluxVAEConversionError, match="attn_2"):
        load_flux_vae(tmp_path / "extra.safetensors", norm_num_groups=8)
    state = load_file(ae_file)
    del state["decoder.up.1.block.2.conv2.bias"]
    save_file(state, tmp_path / "missing.safetensors")
    with pytest.raises(FluxVAEConversionError, match=r"decoder\.up_blocks\.1\.resnets\.2\.conv2\.bias"):
        load_flux_vae(tmp_path / "missing.safetensors", norm_num_groups=8)


def test_export_rejects_unknown_diffusers_keys():
    with pytest.raises(FluxVAEConversionError, match="no original-layout name"):
        diffusers_to_original({"encoder.mystery.weight": torch.zeros(1)}, num_levels=3)
