"""The main-job path end to end on a miniature: prepare steps, `chatumm train`, checkpoints, exact resume."""

import pytest
import torch

from chatumm_kit.cli import main

RECIPE = """\
seed: 0
output_dir: {out}
vars:
  data_dir: {data}
prepare:
  - _component_: chatumm_kit.training.prepare.ensure_synthesised
    recipe: shapes/synth
    artifact: ${{vars.data_dir}}/train/index.json
    overrides: ["output_dir=${{vars.data_dir}}/train", "synth.num_dialogues=24", "synth.shard_size=12"]
  - _component_: chatumm_kit.training.prepare.ensure_tokenizer
    shards: ${{vars.data_dir}}/train/index.json
    output: ${{vars.data_dir}}/tokenizer
    vocab_size: 300
system:
  _component_: chatumm_kit.systems.unified.ChatUMMSystem
  model: {{preset: chatumm_tiny, tokenizer: "${{vars.data_dir}}/tokenizer", hidden_size: 32, num_layers: 1,
          intermediate_size: 64, vit_hidden: 32, vit_layers: 1}}
  optimizer: {{lr: 1.0e-3, weight_decay: 0.01}}
  schedule: {{kind: cosine, warmup_steps: 1, total_steps: 4}}
  seed: ${{seed}}
data:
  _component_: chatumm_kit.data.datamodule.DialogueDataModule
  train_sources: [{{name: shapes, shards: "${{vars.data_dir}}/train/index.json"}}]
  val_sources: [{{name: shapes, shards: "${{vars.data_dir}}/train/index.json"}}]
  tokenizer: ${{vars.data_dir}}/tokenizer
  vit_patch_size: 8
  vae_token_stride: 8
  max_image_side: 32
  token_budget: 1024
  num_workers: 0
  shuffle_buffer: 8
  seed: ${{seed}}
trainer:
  max_steps: 4
  accelerator: cpu
  devices: 1
  limit_val_batches: 1
  val_check_interval: 2
  check_val_every_n_epoch: null
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  callbacks:
    - _component_: lightning.pytorch.callbacks.ModelCheckpoint
      dirpath: ${{output_dir}}/checkpoints
      save_last: true
      every_n_train_steps: 2
      save_top_k: -1
    - _component_: chatumm_kit.training.ema.EMACallback
      decay: 0.5
"""

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


def _recipe(tmp_path, data_dir, name="run"):
    f = tmp_path / f"{name}.yaml"
    f.write_text(RECIPE.format(out=tmp_path / name, data=data_dir))
    return f


def _weights(ckpt):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return state["state_dict"], state


def test_train_prepares_data_and_tokenizer_then_trains(tmp_path, data_dir, capsys):
    recipe = _recipe(tmp_path, data_dir)
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
    assert main(["train", str(_recipe(tmp_path, data_dir, "again")), "trainer.max_steps=1"]) == 0
    assert "prepare: reusing" in capsys.readouterr().out


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, data_dir):
    recipe = _recipe(tmp_path, data_dir, "full")
    assert main(["train", str(recipe)]) == 0
    full, _ = _weights(tmp_path / "full" / "checkpoints" / "last.ckpt")

    stopped = _recipe(tmp_path, data_dir, "stopped")
    assert main(["train", str(stopped), "trainer.max_steps=2"]) == 0
    assert main(["train", str(stopped), "resume_from=last"]) == 0
    resumed, raw = _weights(tmp_path / "stopped" / "checkpoints" / "last.ckpt")
    assert raw["global_step"] == 4
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6, msg=k)


def test_a_run_killed_with_sigkill_resumes_as_if_it_had_not_stopped(tmp_path, data_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    full = _recipe(tmp_path, data_dir, "full6")
    assert main(["train", str(full), "trainer.max_steps=6", "system.schedule.total_steps=6"]) == 0
    expected, _ = _weights(tmp_path / "full6" / "checkpoints" / "last.ckpt")

    killed = _recipe(tmp_path, data_dir, "killed")
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


def test_validation_losses_are_token_weighted_means_over_all_batches(tmp_path, data_dir, capsys):
    from omegaconf import OmegaConf

    from chatumm_kit.config import instantiate, load_recipe
    from chatumm_kit.eval import load_checkpoint
    from chatumm_kit.systems.unified import ChatUMMSystem

    recipe = _recipe(tmp_path, data_dir, "val")
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
