"""Loading a trained ChatUMMSystem checkpoint (EMA or raw weights, safely) and the `chatumm eval` command end to end."""

import argparse

import pytest
import torch

from chatumm_kit.cli import main
from chatumm_kit.config import RecipeError
from chatumm_kit.eval import BenchmarkReport
from chatumm_kit.eval import cli as eval_cli
from chatumm_kit.training.ema import EMA_CALLBACK_MARKER
from chatumm_kit.training.loading import checkpoint_has_ema, checkpoint_hyperparameters, load_checkpoint

EVAL = """\
seed: 0
output_dir: {out}
world: {{_component_: chatumm_kit.data.shapes.WorldConfig, image_size: 32}}
phrasing: {{_component_: chatumm_kit.synth.ShapesPhrasing, split: heldout}}
heldout:
  _component_: chatumm_kit.synth.SynthPipeline
  output_dir: {out}/heldout
  num_dialogues: 2
  shard_size: 2
  use_cache: false
  report_png: false
  progress: false
  pool: {{_component_: chatumm_kit.synth.ShapesPool, world: "${{world}}", phrasing: "${{phrasing}}",
         seeds: [3000000, 3100000]}}
  backend: {{_component_: chatumm_kit.synth.ShapesRuleBackend, world: "${{world}}", phrasing: "${{phrasing}}"}}
  stages:
    - {{_component_: chatumm_kit.synth.ChainStage, turns: [2, 2]}}
models:
  trained: {{_component_: chatumm_kit.eval.ModelSource, checkpoint: "{ckpt}"}}
  also_trained: "{ckpt}"
benchmark:
  _component_: chatumm_kit.eval.BenchmarkSettings
  reply:
    _component_: chatumm_kit.eval.ReplySettings
    max_new_tokens: 4
    max_segments: 2
    sampler: {{_component_: chatumm_kit.inference.sampler.SamplerConfig, num_steps: 2}}
"""


@pytest.fixture(scope="module")
def checkpoint(trained_checkpoint):
    return trained_checkpoint


def test_load_checkpoint_uses_ema_when_present_and_raw_weights_on_request(checkpoint):
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    (ema_state,) = [s for s in raw["callbacks"].values() if s.get("format") == EMA_CALLBACK_MARKER]
    shadow = ema_state["shadow"]
    assert checkpoint_has_ema(checkpoint)
    assert checkpoint_hyperparameters(checkpoint)["model"]["_component_"] == "chatumm_kit.presets.chatumm_tiny"

    default = load_checkpoint(checkpoint)
    assert default.ema is True and not default.model.training
    state = default.model.state_dict()
    differs = 0
    for key, value in raw["state_dict"].items():
        inner = key.removeprefix("model.")
        want = shadow.get(key, value)  # averaged parameters come from the EMA, buffers and frozen weights do not
        torch.testing.assert_close(state[inner], want, rtol=0, atol=0, msg=inner)
        differs += key in shadow and not torch.equal(shadow[key], value)
    assert differs > 0  # the EMA really differs from the last weights (decay 0.5, lr 1e-2)

    plain = load_checkpoint(checkpoint, use_ema=False)
    assert plain.ema is False
    for key, value in raw["state_dict"].items():
        torch.testing.assert_close(plain.model.state_dict()[key.removeprefix("model.")], value, rtol=0, atol=0)
    assert default.tokenizer.vocab_size == plain.tokenizer.vocab_size == default.model.backbone.config.vocab_size


def test_load_checkpoint_errors_name_the_problem(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="spec's tokenizer 'nowhere/tok'"):
        load_checkpoint(checkpoint, spec_overrides={"tokenizer": "nowhere/tok"})
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.ckpt")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, foreign)
    with pytest.raises(ValueError, match="no hyper_parameters.model"):
        load_checkpoint(foreign)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": argparse.Namespace(preset="x")}}, pickled)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(pickled)


def test_chatumm_eval_synthesises_the_held_out_set_and_writes_the_report(checkpoint, tmp_path, capsys):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(EVAL.format(out=tmp_path / "eval", ckpt=checkpoint))
    assert main(["eval", str(recipe)]) == 0  # `chatumm eval` delegates to chatumm_kit.eval.cli
    out = capsys.readouterr().out
    js, png = tmp_path / "eval" / "eval_report.json", tmp_path / "eval" / "eval_report.png"
    assert f"report: {js}" in out and png.is_file()
    report = BenchmarkReport.load(js)
    assert list(report.models) == ["trained", "also_trained"]
    assert report.models["trained"].source == {"kind": "checkpoint", "checkpoint": str(checkpoint), "ema": True}
    assert report.data.num_dialogues == 2 and report.data.num_turns == 4  # two chains of two exchanges
    assert report.settings["shards"] == str(tmp_path / "eval" / "heldout" / "index.json")
    # the same checkpoint twice gives the same scores (deterministic per seed)
    a, b = (report.models[k].to_dict() for k in ("trained", "also_trained"))
    assert a["turns"] == b["turns"] and a["free_running"] == b["free_running"]
    assert out.splitlines()[0].split()[:2] == ["model", "success"]

    assert main(["eval", str(recipe), "+models.gone=nowhere.ckpt"]) == 2
    assert "models.gone.checkpoint: 'nowhere.ckpt' does not exist; " in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    with pytest.raises(RecipeError, match="heldout: missing"):
        eval_cli.run(parser.parse_args([str(recipe), "~heldout"]))
