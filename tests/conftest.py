"""Shared test settings (one intra-op thread: CI has 2 cores and pytest-xdist is not used; fixed seeds) and the
chatumm_tiny training recipe and checkpoint that several test folders use."""

import os
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A 2-step `chatumm train` of a very small chatumm_tiny on synthesised dialogues (12 unless told), with EMA and no
# validation: the recipe `trained_checkpoint` trains as it is and tests/systems/test_unified.py with its overrides.
TRAIN = """\
seed: 0
output_dir: {out}
vars:
  data_dir: {data}
prepare:
  - _component_: chatumm_kit.training.prepare.ensure_synthesised
    recipe: shapes/synth
    artifact: ${{vars.data_dir}}/train/index.json
    overrides: ["output_dir=${{vars.data_dir}}/train", "synth.num_dialogues={num_dialogues}", "synth.shard_size=12"]
  - _component_: chatumm_kit.training.prepare.ensure_tokenizer
    shards: ${{vars.data_dir}}/train/index.json
    output: ${{vars.data_dir}}/tokenizer
    vocab_size: 300
system:
  _component_: chatumm_kit.systems.unified.ChatUMMSystem
  model: {{_component_: chatumm_kit.presets.chatumm_tiny, tokenizer: "${{vars.data_dir}}/tokenizer", hidden_size: 32,
          num_layers: 1, intermediate_size: 64, vit_hidden: 32, vit_layers: 1}}
  optimizer: {{lr: 1.0e-2, weight_decay: 0.0}}
  schedule: {{_component_: chatumm_kit.training.schedules.ConstantSchedule}}
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


def write_train_recipe(
    path: Path, *, out: Path, data: Path, num_dialogues: int = 12, overrides: Sequence[str] = ()
) -> Path:
    """Write :data:`TRAIN` to ``path``: output in ``out``, prepared data in ``data``.

    ``overrides`` are ``key=value``, ``+key=value`` and ``~key`` items as on the ``chatumm train`` command line; when
    there are any, the recipe is written as the YAML of the tree they give.
    """
    text = TRAIN.format(out=out, data=data, num_dialogues=num_dialogues)
    if overrides:
        import yaml
        from omegaconf import OmegaConf

        from chatumm_kit.config import apply_overrides

        text = OmegaConf.to_yaml(apply_overrides(OmegaConf.create(yaml.safe_load(text)), overrides))
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def train_recipe():
    """:func:`write_train_recipe`, for test modules (which cannot import this conftest by name)."""
    return write_train_recipe


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    from chatumm_kit.cli import main

    root = tmp_path_factory.mktemp("train")
    recipe = write_train_recipe(root / "train.yaml", out=root / "run", data=root / "data")
    assert main(["train", str(recipe)]) == 0
    return root / "run" / "checkpoints" / "last.ckpt"
