"""Stream settings come from the model: the data module takes the ViT patch and VAE token stride of the system's
model, and a data recipe that gives different ones fails at setup with one line naming both values."""

import pytest
import torch

from chatumm_kit.cli import main
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.datamodule import DialogueDataModule
from chatumm_kit.data.packing import Packer, model_stream_settings
from chatumm_kit.presets import chatumm_tiny


def test_packer_for_a_model_takes_its_vit_patch_and_vae_token_stride():
    model = chatumm_tiny(vocab_size=300, vit_patch_size=4, vae_downsample=8)
    tok = ChatTokenizer.train(["a red circle", "a blue square"], vocab_size=300)
    packer = Packer.for_model(model, tokenizer=tok, max_image_side=32)
    assert (packer.vit_patch_size, packer.vae_token_stride) == (4, 16)
    assert model_stream_settings(model) == {"vit_patch_size": 4, "vae_token_stride": 16}


def test_the_data_takes_the_models_stream_settings(tmp_path, train_recipe):
    recipe = train_recipe(
        tmp_path / "r.yaml", out=tmp_path / "run", data=tmp_path / "data", num_dialogues=12,
        overrides=["~data.vit_patch_size", "~data.vae_token_stride", "trainer.max_steps=1"],
    )  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1


def test_data_settings_that_differ_from_the_model_fail_naming_both(tmp_path):
    """The check ChatUMMSystem runs when it hands its model to the data (a recipe run is refused even earlier, by
    ``chatumm validate``'s check of the same rule: tests/training/test_recipe_checks.py)."""
    tok = ChatTokenizer.train(["a red circle", "a blue square"], vocab_size=300)
    data = DialogueDataModule(
        train_sources=[{"name": "s", "shards": str(tmp_path / "index.json")}], tokenizer=tok, vae_token_stride=16,
        max_image_side=32,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"^data\.vae_token_stride=16 but the model's is 8 \(the model fixes it\)$"):
        data.use_model_settings(chatumm_tiny(vocab_size=300))
    same = DialogueDataModule(train_sources=[{"name": "s", "shards": "x"}], tokenizer=tok, max_image_side=32)
    same.use_model_settings(chatumm_tiny(vocab_size=300, vit_patch_size=4))
    assert (same.view_sizing.vit.stride, same.view_sizing.vae.stride) == (4, 8)
