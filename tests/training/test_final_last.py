"""``last.ckpt`` holds the weights training ended with, also when ``max_steps`` is not a multiple of the checkpoint
interval (Lightning alone leaves ``last`` at the last multiple: the final steps would be lost to chat, eval and
export)."""

from __future__ import annotations

import torch

from chatumm_kit.cli import main


def _step(path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_last_holds_the_final_step_and_resumes_from_it(tmp_path, train_recipe):
    out = tmp_path / "run"
    recipe = train_recipe(tmp_path / "train.yaml", out=out, data=tmp_path / "data",
                          overrides=["trainer.max_steps=3", "+trainer.callbacks.0.every_n_train_steps=2"])  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    ckpts = out / "checkpoints"
    (step2,) = [p for p in ckpts.glob("*.ckpt") if p.name != "last.ckpt"]
    assert _step(step2) == 2  # the interval's checkpoint, as Lightning writes it
    assert _step(ckpts / "last.ckpt") == 3  # the final step, not the interval's
    changed = [k for k, v in _weights(step2).items() if not torch.equal(v, _weights(ckpts / "last.ckpt")[k])]
    assert changed, "last.ckpt must hold the weights after step 3, not those of step 2"

    assert main(["train", str(recipe), "resume_from=last", "trainer.max_steps=5"]) == 0
    assert _step(ckpts / "last.ckpt") == 5
