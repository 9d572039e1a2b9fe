"""Shared test settings: one intra-op thread (CI has 2 cores and pytest-xdist is not used), fixed seeds."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A 2-step `chatumm train` of a very small chatumm_tiny on 12 synthesised dialogues, with EMA: the checkpoint that
# loading, chat and eval tests read.
TRAIN = """\
seed: 0
output_dir: {out}
vars:
  data_dir: {data}
prepare:
  - _component_: chatumm_kit.training.prepare.ensure_synthesised
    recipe: shapes/synth
    artifact: ${{vars.data_dir}}/train/index.json
    overrides: ["output_dir=${{vars.data_dir}}/train", "synth.num_dialogues=12", "synth.shard_size=12"]
  - _component_: chatumm_kit.training.prepare.ensure_tokenizer
    shards: ${{vars.data_dir}}/train/index.json
    output: ${{vars.data_dir}}/tokenizer
    vocab_size: 300
system:
  _component_: chatumm_kit.systems.unified.ChatUMMSystem
  model: {{preset: chatumm_tiny, tokenizer: "${{vars.data_dir}}/tokenizer", hidden_size: 32, num_layers: 1,
          intermediate_size: 64, vit_hidden: 32, vit_layers: 1}}
  optimizer: {{lr: 1.0e-2, weight_decay: 0.0}}
  schedule: {{kind: constant}}
data:
  _component_: chatumm_kit.data.datamodule.DialogueDataModule
  train_sources: [{{name: shapes, shards: "${{vars.data_dir}}/train/index.json"}}]
  tokenizer: ${{vars.data_dir}}/tokenizer
  vit_patch_size: 8
  vae_token_stride: 8
  max_image_side: 32
  token_budget: 1024
  num_workers: 0
  shuffle_buffer: 4
trainer:
  max_steps: 2
  accelerator: cpu
  devices: 1
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  callbacks:
    - _component_: lightning.pytorch.callbacks.ModelCheckpoint
      dirpath: ${{output_dir}}/checkpoints
      save_last: true
    - _component_: chatumm_kit.training.ema.EMACallback
      decay: 0.5
"""


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    from chatumm_kit.cli import main

    root = tmp_path_factory.mktemp("train")
    recipe = root / "train.yaml"
    recipe.write_text(TRAIN.format(out=root / "run", data=root / "data"))
    assert main(["train", str(recipe)]) == 0
    return root / "run" / "checkpoints" / "last.ckpt"
