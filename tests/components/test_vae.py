"""VAELatentHead: latent normalisation, 2×2 patchify, LLM-facing layers, freezing, and fitting a tiny VAE."""

import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from chatumm_kit.components.layers import sincos_2d_table
from chatumm_kit.components.vae import VAELatentHead, tiny_autoencoder
from chatumm_kit.systems.autoencoder import AutoencoderSystem


def _head(**overrides):
    torch.manual_seed(0)
    kwargs = dict(
        hidden=32,
        autoencoder=tiny_autoencoder(latent_channels=4, downsample=4, base_channels=16),
        scaling_factor=0.5,
        shift_factor=0.1,
        max_latent_side=8,
    )
    kwargs.update(overrides)
    return VAELatentHead(**kwargs)


@pytest.fixture
def one_thread():
    """Tiny convolutions run faster on one thread than on two contended ones; restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _shapes(n=4, side=32, seed=0):
    """Coloured squares on a dark background, in [-1, 1] (ShapesChat-like)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, 3, side, side), -1.0)
    for i in range(n):
        r, c = torch.randint(0, side - 10, (2,), generator=g).tolist()
        images[i, i % 3, r : r + 10, c : c + 10] = 1.0
    return images


def test_tiny_autoencoder_builds_fast_with_the_requested_geometry():
    import time

    tiny_autoencoder()  # first build pays diffusers' lazy imports
    start = time.perf_counter()
    ae = tiny_autoencoder(latent_channels=8, downsample=8)
    assert time.perf_counter() - start < 0.5
    assert ae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode().shape == (1, 8, 4, 4)
    assert not ae.config.use_quant_conv and not ae.config.use_post_quant_conv
    with pytest.raises(ValueError, match="power of two"):
        tiny_autoencoder(downsample=6)


def test_encode_is_the_normalised_posterior_mode_and_decode_inverts_the_normalisation():
    head = _head()
    images = _shapes(3)
    mixed = [images[0], images[1, :, :16, :], images[2]]  # two sizes in one call
    latents = head.encode(mixed)
    with torch.no_grad():
        for image, z in zip(mixed, latents):
            mode = head.autoencoder.encode(image[None]).latent_dist.mode()[0]
            torch.testing.assert_close(z, 0.5 * (mode - 0.1), atol=1e-5, rtol=1e-5)
        assert latents[1].shape == (4, 4, 8)
        ref = head.autoencoder.decode((latents[0] / 0.5 + 0.1)[None]).sample[0]
        torch.testing.assert_close(head.decode([latents[0]])[0], ref, atol=1e-5, rtol=1e-5)
    assert latents[0].requires_grad is False  # frozen autoencoder: encode runs without a graph
    with pytest.raises(ValueError, match="downsample factor 4"):
        head.encode([torch.zeros(3, 30, 32)])


def test_patchify_orders_features_p_row_p_col_channel_and_round_trips_exactly():
    head = _head()
    latent = torch.randn(4, 6, 10)
    tokens = head.patchify(latent)
    assert tokens.shape == (3 * 5, 16)
    i, j = 2, 3  # token row 2, col 3 -> flat index 2 * 5 + 3
    for pr in range(2):
        for pc in range(2):
            for c in range(4):
                assert tokens[i * 5 + j, (pr * 2 + pc) * 4 + c] == latent[c, 2 * i + pr, 2 * j + pc]
    assert torch.equal(head.unpatchify(tokens, (3, 5)), latent)
    assert torch.equal(head.unpatchify(tokens, torch.tensor([3, 5])), latent)
    with pytest.raises(ValueError, match="latent_patch=2"):
        head.patchify(torch.randn(4, 5, 4))


def test_view_tokens_follow_the_packed_view_order():
    head = _head()
    latents = [torch.randn(4, 4, 4), torch.randn(4, 2, 6)]
    tokens = head.view_tokens(latents, torch.tensor([1, 0, 1]))
    assert tokens.shape == (3 + 4 + 3, 16)
    assert torch.equal(tokens[3:7], head.patchify(latents[0]))
    assert torch.equal(tokens[7:], head.patchify(latents[1]))
    assert head.view_tokens(latents, torch.tensor([], dtype=torch.long)).shape == (0, 16)


def test_llm2vae_is_zero_at_init_so_the_fresh_velocity_is_zero():
    head = _head()
    assert torch.count_nonzero(head.llm2vae.weight) == 0 and torch.count_nonzero(head.llm2vae.bias) == 0
    assert torch.equal(head.velocity(torch.randn(5, 32)), torch.zeros(5, 16))
    assert torch.count_nonzero(head.vae2llm.weight) > 0


def test_embed_sums_vae2llm_time_and_latent_position():
    head = _head()
    x = torch.randn(6, 16)
    rc = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [7, 7], [3, 5]])
    t = torch.full((6,), 0.3)
    out = head.embed(x, t, rc)
    assert out.shape == (6, 32)
    table = sincos_2d_table(dim=32, max_side=8)
    expected = head.vae2llm(x) + head.time_embedder(t) + table[rc[:, 0] * 8 + rc[:, 1]]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    later = head.embed(x, torch.full((6,), 0.9), rc)
    assert (later - out).abs().max() > 1e-4  # t changes the embedding
    assert torch.allclose(later - out, (later - out)[:1].expand(6, -1), atol=1e-6)  # by the same vector per t
    with pytest.raises(ValueError, match="max_side=8"):
        head.embed(x[:1], t[:1], torch.tensor([[8, 0]]))


def test_frozen_autoencoder_gets_no_grads_and_stays_in_eval_mode():
    head = _head().train()
    assert not head.autoencoder.training and head.vae2llm.training
    assert not any(p.requires_grad for p in head.autoencoder.parameters())
    z = head.encode(list(_shapes(2)))
    tokens = head.view_tokens(z, torch.tensor([0, 1]))
    rc = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2).repeat(2, 1)
    h = head.embed(tokens, torch.rand(32), rc)
    images = head.decode([head.unpatchify(head.velocity(h)[:16] + tokens[:16], (4, 4))])
    (h.square().mean() + images[0].square().mean()).backward()
    assert all(p.grad is None for p in head.autoencoder.parameters())
    assert head.vae2llm.weight.grad is not None and head.llm2vae.weight.grad.abs().sum() > 0
    assert not head.autoencoder_loss(_shapes(2)).total.requires_grad  # a frozen autoencoder cannot be fitted
    head.set_autoencoder_frozen(False)
    assert head.autoencoder.training and all(p.requires_grad for p in head.autoencoder.parameters())


def _quiet_cpu_trainer(*, max_steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_autoencoder_system_fits_the_autoencoder_with_a_lightning_trainer(one_thread):
    arch = dict(_head(scaling_factor=1.0, shift_factor=0.0).hparams)
    system = AutoencoderSystem(head=arch, reconstruction_loss="l1", optimizer={"lr": 2e-3})
    torch.manual_seed(0)
    system.configure_model()  # the trainer calls it again: a no-op
    head = system.head
    images = _shapes(4)
    before = head.reconstruction_error(images).item()
    ae_before = {k: v.clone() for k, v in head.autoencoder.state_dict().items()}
    llm_before = head.vae2llm.weight.detach().clone()
    trainer = _quiet_cpu_trainer(max_steps=20)
    trainer.fit(system, train_dataloaders=DataLoader([images] * 20, batch_size=None))
    assert system.head is head
    after = head.reconstruction_error(images).item()
    assert after < 0.3 * before, (before, after)
    assert any(not torch.equal(v, head.autoencoder.state_dict()[k]) for k, v in ae_before.items())
    assert torch.equal(head.vae2llm.weight, llm_before)  # only the autoencoder is optimised here
    assert "vae/reconstruction" in trainer.callback_metrics


def test_autoencoder_system_follows_its_learning_rate_schedule(one_thread):
    arch = dict(_head(scaling_factor=1.0, shift_factor=0.0).hparams)
    cosine = {"_component_": "chatumm_kit.training.schedules.CosineSchedule", "total_steps": 10, "min_ratio": 0.1}
    system = AutoencoderSystem(head=arch, reconstruction_loss="mse", optimizer={"lr": 1e-3}, schedule=cosine)
    trainer = _quiet_cpu_trainer(max_steps=10)
    trainer.fit(system, train_dataloaders=DataLoader([_shapes(2)] * 10, batch_size=None))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)  # the floor, reached at step 10
    unscheduled = AutoencoderSystem(head=arch, optimizer={"lr": 1e-3})
    assert unscheduled.hparams.schedule["_component_"].endswith("ConstantSchedule")  # the peak rate throughout


def test_latent_stats_standardise_latents_and_are_kept_in_the_rebuilt_heads_hparams():
    head = _head()
    saved = dict(head.hparams)
    images = list(_shapes(4))
    scale, shift = head.latent_stats(images)
    assert dict(head.hparams) == saved  # hyperparameters never change after they are saved
    fitted = VAELatentHead(**{**head.hparams, "scaling_factor": scale, "shift_factor": shift})
    fitted.load_state_dict(head.state_dict())
    z = torch.cat([x.reshape(-1) for x in fitted.encode(images)])
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1.0) < 1e-4
    assert fitted.hparams["scaling_factor"] == scale and fitted.hparams["shift_factor"] == shift


def test_hyperparameters_rebuild_head_and_autoencoder_from_config():
    head = _head()
    rebuilt = VAELatentHead(**head.hparams)
    assert rebuilt.token_dim == 16 and rebuilt.downsample == 4
    missing, unexpected = rebuilt.load_state_dict(head.state_dict())
    assert not missing and not unexpected
    images = list(_shapes(1))
    torch.testing.assert_close(rebuilt.encode(images)[0], head.encode(images)[0])
    with pytest.raises(ValueError, match="exactly one"):
        VAELatentHead(hidden=8)


def test_a_checkpoint_with_the_retired_training_settings_still_loads(tmp_path):
    """Heads saved before the training settings moved to AutoencoderSystem carry them in their hyperparameters."""
    head = _head()
    old_hparams = {**head.hparams, "freeze_autoencoder": False, "reconstruction_loss": "mse", "kl_weight": 1e-5}
    old_hparams |= {"lr": 2e-3, "weight_decay": 0.0}
    path = tmp_path / "old.ckpt"
    torch.save(
        {"state_dict": head.state_dict(), "hyper_parameters": old_hparams, "pytorch-lightning_version": "2.6.6"}, path
    )
    loaded = VAELatentHead.load_from_checkpoint(path, weights_only=True)
    assert dict(loaded.hparams) == dict(head.hparams)
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.autoencoder_frozen


def test_autoencoder_file_loads_weights_and_a_meta_build_gets_only_the_key_check(tmp_path):
    from safetensors.torch import save_file

    from chatumm_kit.components.vae import load_autoencoder_file

    torch.manual_seed(0)
    trained = tiny_autoencoder(latent_channels=4, downsample=4)
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    file = tmp_path / "vae.safetensors"
    save_file(state, str(file), metadata={"scaling_factor": "0.5", "shift_factor": "-0.25"})

    fresh = tiny_autoencoder(latent_channels=4, downsample=4)
    assert load_autoencoder_file(fresh, file) == (0.5, -0.25)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())

    # Built for its architecture only (a checkpoint's tensors are assigned later): nothing is read into it, so
    # PyTorch's "copying into a meta parameter is a no-op" warning (once per tensor) is not raised.
    with torch.device("meta"):
        skeleton = tiny_autoencoder(latent_channels=4, downsample=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_autoencoder_file(skeleton, file) == (0.5, -0.25)
    assert all(t.is_meta for t in skeleton.state_dict().values())

    # A file of another autoencoder is refused either way, naming the keys.
    missing = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != missing}, str(tmp_path / "short.safetensors"))
    for target in (tiny_autoencoder(latent_channels=4, downsample=4), skeleton):
        with pytest.raises(ValueError, match=f"missing \\['{missing}'\\]"):
            load_autoencoder_file(target, tmp_path / "short.safetensors")
