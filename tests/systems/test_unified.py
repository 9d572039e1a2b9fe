"""The main-job path end to end on a miniature: prepare steps, `chatumm train`, checkpoints, exact resume."""

import pytest
import torch

from chatumm_kit.cli import main

# The shared recipe (tests/conftest.py) on 24 dialogues, with validation, a cosine schedule, seeded system and data,
# and a checkpoint every 2 of 4 steps.
OVERRIDES = [
    "system.optimizer.lr=1.0e-3",
    "system.optimizer.weight_decay=0.01",
    "system.schedule={kind: cosine, warmup_steps: 1, total_steps: 4}",
    "+system.seed=${seed}",
    '+data.val_sources=[{name: shapes, shards: "${vars.data_dir}/train/index.json"}]',
    "data.shuffle_buffer=8",
    "+data.seed=${seed}",
    "trainer.max_steps=4",
    "trainer.limit_val_batches=1",
    "+trainer.val_check_interval=2",
    "+trainer.check_val_every_n_epoch=null",
    "+trainer.callbacks.0.every_n_train_steps=2",
    "+trainer.callbacks.0.save_top_k=-1",
]

REPORT = """\
report:
  - _component_: chatumm_kit.eval.cli.summarise
    recipe: shapes/eval
    name: tiny
    overrides: ["vars.data_dir={data}/eval", "vars.num_dialogues=2", "heldout.shard_size=2",
                "benchmark.max_dialogues=1", "benchmark.reply.sampler.num_steps=1", "output_dir={out}/eval"]
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes_data")


@pytest.fixture
def write_recipe(tmp_path, data_dir, train_recipe):
    """``write_recipe(name)`` writes ``tmp_path/name.yaml``, a run with output in ``tmp_path/name``."""

    def write(name="run"):
        path, out = tmp_path / f"{name}.yaml", tmp_path / name
        return train_recipe(path, out=out, data=data_dir, num_dialogues=24, overrides=OVERRIDES)

    return write


def _weights(ckpt):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return state["state_dict"], state


def test_train_prepares_data_and_tokenizer_then_trains(write_recipe, tmp_path, data_dir, capsys):
    recipe = write_recipe()
    recipe.write_text(recipe.read_text() + REPORT.format(data=data_dir, out=tmp_path / "run"))
    assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    # the report step evaluated the final checkpoint on the held-out set and printed the summary
    assert (tmp_path / "run" / "eval" / "eval_report.json").exists()
    assert "vqa@d>=2" in out and "eval: 1 dialogues" in out
    assert (data_dir / "train" / "index.json").exists() and (data_dir / "tokenizer" / "tokenizer.json").exists()
    assert f"checkpoint: {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}" in out
    assert "val/ce:" in out and "train/mse:" in out
    state, raw = _weights(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert raw["global_step"] == 4
    assert "ChatUMMSystem" in raw["recipe"] and "max_steps: 4" in raw["recipe"]  # the resolved recipe travels along
    assert (tmp_path / "run" / "recipe.yaml").read_text() == raw["recipe"]
    assert any(k.startswith("model.backbone.layers.0.self_attn.q_proj_moe_gen") for k in state)
    # files named by the model spec are stored absolute, so the checkpoint loads from any working directory
    assert raw["hyper_parameters"]["model"]["tokenizer"] == str((data_dir / "tokenizer").resolve())
    # a second run reuses the prepared data instead of synthesising again
    assert main(["train", str(write_recipe("again")), "trainer.max_steps=1"]) == 0
    assert "prepare: reusing" in capsys.readouterr().out


def test_resume_continues_exactly_as_an_uninterrupted_run(write_recipe, tmp_path):
    recipe = write_recipe("full")
    assert main(["train", str(recipe)]) == 0
    full, _ = _weights(tmp_path / "full" / "checkpoints" / "last.ckpt")

    stopped = write_recipe("stopped")
    assert main(["train", str(stopped), "trainer.max_steps=2"]) == 0
    assert main(["train", str(stopped), "resume_from=last"]) == 0
    resumed, raw = _weights(tmp_path / "stopped" / "checkpoints" / "last.ckpt")
    assert raw["global_step"] == 4
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6, msg=k)


def test_a_run_killed_with_sigkill_resumes_as_if_it_had_not_stopped(write_recipe, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    full = write_recipe("full6")
    assert main(["train", str(full), "trainer.max_steps=6", "system.schedule.total_steps=6"]) == 0
    expected, _ = _weights(tmp_path / "full6" / "checkpoints" / "last.ckpt")

    killed = write_recipe("killed")
    args = ["trainer.max_steps=6", "system.schedule.total_steps=6"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatumm_kit", "train", str(killed), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    target = tmp_path / "killed" / "checkpoints" / "epoch=0-step=2.ckpt"
    deadline = time.monotonic() + 120
    size = -1
    while proc.poll() is None and time.monotonic() < deadline:  # wait for the step-2 checkpoint to be written
        now = target.stat().st_size if target.exists() else -1
        if now > 0 and now == size:
            break
        size = now
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)  # lands somewhere in steps 3-6
    proc.wait()
    assert target.exists()

    assert main(["train", str(killed), *args, "resume_from=last"]) == 0
    resumed, raw = _weights(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert raw["global_step"] == 6
    for k in expected:
        torch.testing.assert_close(resumed[k], expected[k], rtol=0, atol=1e-6, msg=k)


def test_validation_losses_are_token_weighted_means_over_all_batches(write_recipe, tmp_path, capsys):
    from omegaconf import OmegaConf

    from chatumm_kit.config import instantiate, load_recipe
    from chatumm_kit.systems.unified import ChatUMMSystem
    from chatumm_kit.training.loading import load_checkpoint

    recipe = write_recipe("val")
    overrides = ["trainer.max_steps=2", "trainer.limit_val_batches=2", "trainer.val_check_interval=2"]
    assert main(["train", str(recipe), *overrides, "~trainer.callbacks.1"]) == 0  # no EMA: raw weights
    printed = {
        line.split(":")[0].strip(): float(line.split(":")[1])
        for line in capsys.readouterr().out.splitlines()
        if line.strip().startswith("val/")
    }
    model = load_checkpoint(tmp_path / "val" / "checkpoints" / "last.ckpt", use_ema=False).model
    cfg = load_recipe(recipe)
    dm = instantiate(cfg.data, path="data")
    dm.setup("validate")
    system = ChatUMMSystem(model=OmegaConf.to_container(cfg.system.model), seed=0)
    sums = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for i, item in zip(range(2), dm.val_dataloader()):
            out = model(dm.consume(item), generator=system._step_generator(-1 - i))
            sums += torch.tensor([float(out.ce_sum), out.ce_count, float(out.mse_sum), out.mse_count])
    assert printed["val/ce"] == pytest.approx(float(sums[0] / sums[1]), abs=2e-4)
    assert printed["val/mse"] == pytest.approx(float(sums[2] / sums[3]), abs=2e-4)


def test_fit_refuses_views_the_position_tables_cannot_hold(write_recipe, capsys):
    """chatumm_tiny's ViT table is 16 patches of 8 px per side: a 256 px view sizing is refused — by `chatumm train`
    before any prepare step (the same rule as at fit start, training/recipe_checks.py), in one line."""
    recipe = write_recipe("big")
    assert main(["train", str(recipe), "data.max_image_side=256", "trainer.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert (
        "32 patches per side (max_side 256 / stride 8) but the ViT's position table has 16; lower vit.max_side to 128"
        in err
    )
