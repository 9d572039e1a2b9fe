"""The shipped shapes recipes themselves run a few steps (with small overrides), log to TensorBoard with images, and
leave artifacts that load back."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from chatumm_kit.cli import main
from chatumm_kit.components.vae import load_autoencoder_file, tiny_autoencoder
from chatumm_kit.model import ChatUMM
from chatumm_kit.training.loading import load_checkpoint


def _events(folder):
    (path,) = list(folder.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    overrides = [
        f"output_dir={out}",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "data.train_size=64",
        "data.val_size=32",
        "data.batch_size=16",
        "trainer.log_every_n_steps=1",
        "+trainer.enable_progress_bar=false",
    ]
    assert main(["train", "shapes/vae", *overrides]) == 0
    return out / "vae.safetensors"


def test_vae_recipe_writes_an_autoencoder_with_fitted_latent_statistics(vae_file):
    scale, shift = load_autoencoder_file(tiny_autoencoder(latent_channels=4, downsample=4), vae_file)
    assert scale > 0 and scale != 1.0 and shift != 0.0
    assert "vae/loss" in _events(vae_file.parent).Tags()["scalars"]


@pytest.mark.parametrize("recipe", ["shapes/chat_tiny", "shapes/single_turn_tiny"])
def test_training_recipe_runs_logs_images_and_loads_back(recipe, vae_file, tmp_path, capsys):
    data = tmp_path / "data"
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"vars.data_dir={data}",
        f"vars.vae={vae_file}",
        "vars.train_dialogues=16",
        "vars.val_dialogues=4",
        "system.model.hidden_size=32",
        "system.model.num_layers=1",
        "system.model.intermediate_size=64",
        "system.mask_image_every_n_steps=1",
        "system.schedule.warmup_steps=1",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.callbacks.0.every_n_train_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.callbacks.3.every_n_steps=1",
        "trainer.callbacks.4.every_n_steps=2",
        "+trainer.callbacks.4.num_steps=1",
        "data.token_budget=1024",
        "data.num_workers=0",
        "+trainer.enable_progress_bar=false",
        "~report",
    ]
    if recipe == "shapes/single_turn_tiny":
        overrides += [f"vars.single_dir={tmp_path / 'single'}", "vars.single_dialogues=16"]
    assert main(["train", recipe, *overrides]) == 0, capsys.readouterr().err
    events = _events(tmp_path / "run")
    assert {"train/attention_mask", "preview/generated"} <= set(events.Tags()["images"])
    scalars = set(events.Tags()["scalars"])
    assert {"train/ce", "train/mse", "train/grad_norm", "val/ce", "data/samples_ok"} <= scalars
    loaded = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert isinstance(loaded.model, ChatUMM) and loaded.ema
    assert loaded.model.backbone.config.hidden_size == 32
    assert torch.isfinite(next(loaded.model.parameters())).all()
