"""Each weighted component trains alone through its shipped recipe (`chatumm train`), and its loss falls: the MoT
backbone as a text LM on ShapesChat dialogue text, the ViT encoder on the colour/shape probe. (The VAE's recipe runs
in test_shipped_recipes_run.py.) The checkpoints they leave rebuild the component from its hyperparameters."""

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from chatumm_kit.cli import main
from chatumm_kit.components.mot import MoTBackbone
from chatumm_kit.components.vit import ViTEncoder


def _losses(folder, tag="train/loss"):
    (path,) = list(folder.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def _falls(losses, n=3):
    return sum(losses[-n:]) / n < sum(losses[:n]) / n


def _component(checkpoint, prefix, cls):
    """The component saved inside a system checkpoint, rebuilt from its own hyperparameters."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"][prefix]
    module = cls(**hparams)
    state = {k[len(prefix) + 1 :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix + ".")}
    module.load_state_dict(state)
    return module


COMMON = ["trainer.log_every_n_steps=1", "+trainer.enable_progress_bar=false", "+trainer.num_sanity_val_steps=0"]


def test_mot_text_lm_recipe_trains_the_backbone_alone(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [
        f"output_dir={run}",
        f"vars.data_dir={tmp_path / 'data'}",
        "vars.train_dialogues=12",
        "vars.val_dialogues=4",
        "vars.vocab_size=300",
        "system.backbone.hidden_size=32",
        "system.backbone.num_layers=1",
        "system.backbone.head_dim=8",
        "system.backbone.intermediate_size=64",
        "system.optimizer.lr=1.0e-2",
        "data.seq_len=32",
        "data.batch_size=4",
        "trainer.max_steps=10",
        "trainer.val_check_interval=10",
        "trainer.limit_val_batches=1",
        *COMMON,
    ]
    assert main(["train", "shapes/mot_text_lm", *overrides]) == 0, capsys.readouterr().err
    losses = _losses(run)
    assert len(losses) == 10 and _falls(losses), losses
    backbone = _component(run / "checkpoints" / "last.ckpt", "backbone", MoTBackbone)
    assert backbone.config.hidden_size == 32 and backbone.config.vocab_size == 300


def test_vit_probe_recipe_trains_the_encoder_alone(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [
        f"output_dir={run}",
        "system.vit.hidden=32",
        "system.vit.num_layers=1",
        "system.vit.mlp_dim=64",
        "system.optimizer.lr=3.0e-3",
        "data.train_size=96",
        "data.val_size=16",
        "data.batch_size=16",
        "trainer.max_steps=12",
        "trainer.val_check_interval=12",
        *COMMON,
    ]
    assert main(["train", "shapes/vit_probe", *overrides]) == 0, capsys.readouterr().err
    losses = _losses(run)
    assert len(losses) == 12 and _falls(losses), losses
    vit = _component(run / "checkpoints" / "last.ckpt", "vit", ViTEncoder)
    assert vit.hidden == 32 and len(vit.layers) == 1
