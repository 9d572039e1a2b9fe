"""`chatumm eval` with both held-out wording slices (issue 18): two reports, each naming its slice, with intervals."""

import json

import pytest

from chatumm_kit.cli import main
from chatumm_kit.config import RecipeError
from chatumm_kit.eval import BenchmarkReport
from chatumm_kit.eval.cli import summarise

EVAL = """\
seed: 0
output_dir: {out}
world: {{_component_: chatumm_kit.data.shapes.WorldConfig, image_size: 32}}
phrasing: {{_component_: chatumm_kit.synth.ShapesPhrasing, split: recomposed}}
phrasing_unseen_vocab: {{_component_: chatumm_kit.synth.ShapesPhrasing, split: unseen_vocab}}
vars: {{data_dir: "{out}/recomposed", num_dialogues: 2}}
heldout:
  _component_: chatumm_kit.synth.SynthPipeline
  output_dir: ${{vars.data_dir}}
  num_dialogues: ${{vars.num_dialogues}}
  shard_size: 2
  use_cache: false
  report_png: false
  progress: false
  pool: {{_component_: chatumm_kit.synth.ShapesPool, world: "${{world}}", phrasing: "${{phrasing}}",
         seeds: [3000000, 3100000]}}
  backend: {{_component_: chatumm_kit.synth.ShapesRuleBackend, world: "${{world}}", phrasing: "${{phrasing}}"}}
  stages:
    - {{_component_: chatumm_kit.synth.ChainStage, turns: [2, 2]}}
heldout_unseen_vocab:
  _component_: chatumm_kit.synth.SynthPipeline
  output_dir: {out}/unseen
  num_dialogues: 1
  shard_size: 2
  use_cache: false
  report_png: false
  progress: false
  pool: {{_component_: chatumm_kit.synth.ShapesPool, world: "${{world}}", phrasing: "${{phrasing_unseen_vocab}}",
         seeds: [3100000, 3200000]}}
  backend: {{_component_: chatumm_kit.synth.ShapesRuleBackend, world: "${{world}}",
            phrasing: "${{phrasing_unseen_vocab}}"}}
  stages: ${{heldout.stages}}
models:
  trained: "{ckpt}"
benchmark:
  _component_: chatumm_kit.eval.BenchmarkSettings
  reply:
    _component_: chatumm_kit.eval.ReplySettings
    max_new_tokens: 4
    max_segments: 2
    sampler: {{_component_: chatumm_kit.inference.sampler.SamplerConfig, num_steps: 2}}
"""


def test_chatumm_eval_reports_the_recomposed_and_unseen_vocabulary_slices_apart(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(EVAL.format(out=out, ckpt=trained_checkpoint))
    assert main(["eval", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "headline cells (slice: recomposed)" in printed and "headline cells (slice: unseen_vocab)" in printed
    rec = BenchmarkReport.load(out / "eval_report.json")
    unseen = BenchmarkReport.load(out / "eval_report_unseen_vocab.json")
    assert (out / "eval_report_unseen_vocab.png").is_file()
    assert rec.slice == "recomposed" and rec.headline()["slice"] == "recomposed"
    assert (
        unseen.slice == "unseen_vocab"
        and json.loads((out / "eval_report_unseen_vocab.json").read_text())["headline"]["slice"] == "unseen_vocab"
    )
    assert (rec.data.num_dialogues, unseen.data.num_dialogues) == (2, 1)
    assert "history_vqa_acc_d2plus_n" in rec.headline()
    cell = rec.models["trained"].teacher_forced.overall.to_dict()["intent"]
    assert cell["count"] == rec.data.num_turns and len(cell["ci95"]) == 2

    # the training run's summary: only the headline slice, synthesising only the dialogues it reads
    report = summarise(
        checkpoint=str(trained_checkpoint),
        recipe=str(recipe),
        overrides=["+benchmark.max_dialogues=1", f"output_dir={tmp_path / 'summary'}"],
    )
    assert report.slice == "recomposed" and report.data.num_dialogues == 1
    assert (out / "recomposed_first1" / "index.json").is_file()
    assert not (tmp_path / "summary" / "eval_report_unseen_vocab.json").exists()
    # with a baseline (the main job's single-turn model): both on the same dialogues, the paired differences
    both = summarise(
        checkpoint=str(trained_checkpoint),
        recipe=str(recipe),
        name="multi",
        overrides=["+benchmark.max_dialogues=1", f"output_dir={tmp_path / 'summary2'}"],
        baseline=str(trained_checkpoint),
        baseline_name="single",
    )
    h = both.headline()
    assert list(both.models) == ["multi", "single"] and (h["model"], h["baseline"]) == ("multi", "single")
    assert both.models["multi"].turns == both.models["single"].turns  # the same weights, dialogues and seeds
    assert h["baseline_history_turns_d2plus"] == h["history_turns_d2plus"] and "history_vqa_acc_d2plus_diff" in h
    # the main job's step names the baseline's training recipe: checked at validate, trained only when missing
    problems = summarise.check_recipe_arguments(
        {"baseline_recipe": "shapes/single_turn_tiny", "baseline_overrides": ["vars.dta=1", "~report"]}
    )
    assert problems == [
        "baseline_recipe: in shapes/single_turn_tiny: vars.dta: no such key in the recipe (keys here: data_dir, "
        "single_dir, vae, train_dialogues, val_dialogues, single_dialogues); use +vars.dta=... to add one"
    ]
    again = summarise(
        checkpoint=str(trained_checkpoint),
        recipe=str(recipe),
        overrides=["+benchmark.max_dialogues=1", f"output_dir={tmp_path / 'summary3'}"],
        baseline=str(trained_checkpoint),
        baseline_recipe="shapes/single_turn_tiny",  # the baseline exists: nothing is trained
    )
    assert again.models["baseline"].turns == both.models["single"].turns
    with pytest.raises(RecipeError, match="baseline_recipe needs baseline"):
        summarise(checkpoint=str(trained_checkpoint), recipe=str(recipe), baseline_recipe="shapes/single_turn_tiny")
