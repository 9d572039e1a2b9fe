"""ViTEncoder: variable-resolution batching, patch layout, connector + 2-D sin-cos positions."""

import pytest
import torch

from chatumm_kit.components.layers import sincos_2d_table
from chatumm_kit.components.vit import ViTEncoder, ViTPatches, patchify_image


def _vit(**overrides):
    torch.manual_seed(0)
    kwargs = dict(patch_size=4, hidden=32, num_layers=2, num_heads=2, mlp_dim=64, max_patches_per_side=8, llm_hidden=24)
    kwargs.update(overrides)
    vit = ViTEncoder(**kwargs).eval()
    with torch.no_grad():  # move LayerNorms / biases off their 1/0 init so every parameter matters
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vit


def _images():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 16, 8, generator=g), torch.randn(3, 12, 20, generator=g), torch.randn(3, 16, 8, generator=g)]


def test_patchify_flattens_row_col_channel_in_row_major_grid():
    image = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    v = patchify_image(image, patch_size=2)
    assert v.grid_hw.tolist() == [[2, 3]]
    assert v.patch_rc.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    # patch (1, 2) covers pixel rows 2..3, cols 4..5; entry k = (row_in * 2 + col_in) * 3 + channel
    for row_in in range(2):
        for col_in in range(2):
            for ch in range(3):
                assert v.patches[5, (row_in * 2 + col_in) * 3 + ch] == image[ch, 2 + row_in, 4 + col_in]
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patchify_image(torch.zeros(3, 5, 4), patch_size=2)


def test_mixed_sizes_in_one_call_equal_each_image_alone():
    vit = _vit()
    views = [vit.patchify(im) for im in _images()]
    batch = ViTPatches.cat(views)
    with torch.no_grad():
        together = vit(batch.patches, batch.patch_rc, batch.grid_hw)
        alone = torch.cat([vit(v.patches, v.patch_rc, v.grid_hw) for v in views])
    assert together.shape == (8 + 15 + 8, 24)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # images 0 and 2 share a size but not pixels: their tokens differ (nothing leaked across images or got mixed up)
    assert not torch.allclose(together[:8], together[23:], atol=1e-3)


def test_same_size_images_take_the_unmasked_path_and_still_do_not_mix():
    vit = _vit()
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(3, 8, 8, generator=g) for _ in range(3))
    ab = ViTPatches.cat([vit.patchify(a), vit.patchify(b)])
    ac = ViTPatches.cat([vit.patchify(a), vit.patchify(c)])
    a_only = vit.patchify(a)
    with torch.no_grad():
        with_b = vit.features(ab.patches, ab.patch_rc, ab.grid_hw)
        with_c = vit.features(ac.patches, ac.patch_rc, ac.grid_hw)
        alone = vit.features(a_only.patches, a_only.patch_rc, a_only.grid_hw)
    torch.testing.assert_close(with_b[:4], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_c[:4], alone, atol=1e-5, rtol=1e-5)  # the neighbour does not affect image a
    assert not torch.allclose(with_b[4:], with_c[4:], atol=1e-3)


def test_forward_adds_connector_and_sincos_position_of_llm_width():
    vit = _vit()
    v = vit.patchify(_images()[1])  # 3 x 5 patches
    with torch.no_grad():
        feats = vit.features(v.patches, v.patch_rc, v.grid_hw)
        out = vit(v.patches, v.patch_rc, v.grid_hw)
    table = sincos_2d_table(dim=24, max_side=8)
    flat = v.patch_rc[:, 0] * 8 + v.patch_rc[:, 1]
    torch.testing.assert_close(out, vit.connector(feats) + table[flat], atol=1e-6, rtol=0)


def test_position_of_a_patch_changes_its_feature():
    vit = _vit()
    v = vit.patchify(_images()[0])
    shifted = v.patch_rc.clone()
    shifted[:, 1] += 1  # same pixels, grid moved one column right
    with torch.no_grad():
        base = vit.features(v.patches, v.patch_rc, v.grid_hw)
        moved = vit.features(v.patches, shifted, v.grid_hw)
    assert (base - moved).abs().max() > 1e-3


def test_bad_inputs_are_named():
    vit = _vit(max_patches_per_side=4)
    v = vit.patchify(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="grid_hw"):
        vit.features(v.patches, v.patch_rc, torch.tensor([[2, 3]]))
    with pytest.raises(ValueError, match="max_patches_per_side=4"):
        big = vit.patchify(torch.randn(3, 20, 4))  # 5 patch rows
        vit.features(big.patches, big.patch_rc, big.grid_hw)
    empty = vit(torch.zeros(0, 48), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long))
    assert empty.shape == (0, 24)  # a text-only batch
    with pytest.raises(ValueError, match=r"\[N, 48\]"):
        vit.features(torch.zeros(4, 12), v.patch_rc, v.grid_hw)


def test_gradient_checkpointing_gives_the_same_gradients():
    images = ViTPatches.cat([patchify_image(im, patch_size=4) for im in _images()[:2]])
    grads = []
    for ckpt in (False, True):
        vit = _vit(gradient_checkpointing=ckpt).train()
        vit(images.patches, images.patch_rc, images.grid_hw).square().mean().backward()
        grads.append(vit.layers[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().sum() > 0


def test_hyperparameters_rebuild_the_same_architecture():
    vit = _vit(num_layers=3)
    rebuilt = ViTEncoder(**vit.hparams)
    assert len(rebuilt.layers) == 3
    missing, unexpected = rebuilt.load_state_dict(vit.state_dict())
    assert not missing and not unexpected
    assert rebuilt.layers[0].mlp.fc1.out_features == 64
    assert vit.position_embedding.weight.shape == (64, 32)
