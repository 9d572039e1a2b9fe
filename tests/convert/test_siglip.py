"""SigLIP HF checkpoint -> ViTEncoder: parity with transformers' SiglipVisionModel on a tiny random model."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatumm_kit.convert.siglip import (
    SiglipConversionError,
    conv_patch_to_linear,
    load_siglip_vit,
    place_position_grid,
    save_siglip_vit,
    vit_to_siglip_state,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random SiglipVisionModel (hidden 32, 2 layers, 2 heads, patch 4, image 16) saved as safetensors."""
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16
    )
    model = transformers.SiglipVisionModel(config).eval()
    # Random init leaves LayerNorms at 1/0 and biases at 0: perturb everything so each mapping is exercised.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def _hf_outputs(model, image):
    with torch.no_grad():
        return model(pixel_values=image[None], output_hidden_states=True)


def _our_features(vit, image):
    v = vit.patchify(image)
    with torch.no_grad():
        return vit.features(v.patches, v.patch_rc, v.grid_hw)


def test_conv_patch_weight_becomes_row_col_channel_linear():
    w = torch.randn(5, 3, 2, 2)
    lin = conv_patch_to_linear(w)
    patch = torch.randn(3, 2, 2)  # one patch, channel-first as the Conv2d sees it
    flat = patch.permute(1, 2, 0).reshape(-1)  # (row, col, channel) as PackedBatch stores it
    assert torch.allclose(lin @ flat, (w * patch).sum(dim=(1, 2, 3)), atol=1e-6)


def test_full_depth_features_match_hf_last_hidden_state(hf_folder):
    folder, model = hf_folder
    vit = load_siglip_vit(folder, llm_hidden=24).eval()
    assert len(vit.layers) == 2 and vit.max_patches_per_side == 4
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = _our_features(vit, image)
    ref = _hf_outputs(model, image).last_hidden_state[0]
    assert ours.shape == ref.shape == (16, 32)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_drop_last_layer_gives_post_layernorm_of_penultimate_hidden_state(hf_folder):
    folder, model = hf_folder
    vit = load_siglip_vit(folder, llm_hidden=24, drop_last_layer=True).eval()
    assert len(vit.layers) == 1
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
    hs = _hf_outputs(model, image).hidden_states  # embeddings, layer 1, layer 2
    with torch.no_grad():
        ref = getattr(model, "vision_model", model).post_layernorm(hs[-2])[0]
    torch.testing.assert_close(_our_features(vit, image), ref, atol=1e-4, rtol=0)
    assert not torch.allclose(_our_features(vit, image), _hf_outputs(model, image).last_hidden_state[0], atol=1e-2)


def test_larger_position_table_keeps_hf_grid_and_repeats_edges(hf_folder):
    folder, model = hf_folder
    vit = load_siglip_vit(folder, llm_hidden=24, max_patches_per_side=6).eval()
    hf_table = load_file(folder / "model.safetensors")["embeddings.position_embedding.weight"]  # [16, 32], g = 4
    table = vit.position_embedding.weight.detach()
    assert table.shape == (36, 32)
    assert torch.equal(table[2 * 6 + 3], hf_table[2 * 4 + 3])  # (2, 3) copied
    assert torch.equal(table[5 * 6 + 1], hf_table[3 * 4 + 1])  # (5, 1) -> edge row 3
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        _our_features(vit, image), _hf_outputs(model, image).last_hidden_state[0], atol=1e-4, rtol=0
    )
    with pytest.raises(SiglipConversionError, match="smaller than"):
        place_position_grid(hf_table, max_side=3)


def test_unexpected_key_is_named(hf_folder, tmp_path):
    folder, _ = hf_folder
    state = load_file(folder / "model.safetensors")
    state["encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(SiglipConversionError, match="rotary"):
        load_siglip_vit(tmp_path, llm_hidden=8)


def test_missing_key_is_named(hf_folder, tmp_path):
    folder, _ = hf_folder
    state = load_file(folder / "model.safetensors")
    del state["encoder.layers.1.mlp.fc2.bias"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(SiglipConversionError, match=r"layers\.1\.mlp\.fc2\.bias"):
        load_siglip_vit(tmp_path, llm_hidden=8)


def test_prefixed_full_siglip_checkpoint_loads_vision_tower(hf_folder, tmp_path):
    """A SiglipModel file: keys under ``vision_model.``, a text tower beside it, config nested in vision_config."""
    folder, model = hf_folder
    state = {f"vision_model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 2)
    state["logit_scale"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    vision_cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": vision_cfg}))
    vit = load_siglip_vit(tmp_path, llm_hidden=8).eval()
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        _our_features(vit, image), _hf_outputs(model, image).last_hidden_state[0], atol=1e-4, rtol=0
    )


def test_export_round_trips_through_transformers(hf_folder, tmp_path):
    folder, model = hf_folder
    vit = load_siglip_vit(folder, llm_hidden=8).eval()
    original = load_file(folder / "model.safetensors")
    exported = vit_to_siglip_state(vit)
    assert exported.keys() == {k for k in original if not k.startswith("head.")}
    assert all(torch.equal(exported[k], original[k]) for k in exported)
    save_siglip_vit(vit, tmp_path)
    reloaded = transformers.SiglipVisionModel.from_pretrained(tmp_path).eval()
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        _hf_outputs(reloaded, image).last_hidden_state, _hf_outputs(model, image).last_hidden_state, atol=1e-5, rtol=0
    )
