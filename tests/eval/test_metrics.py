"""Per-turn scoring on hand-made turns with known answers, aggregation, SR@k, and the report's JSON and PNG."""

import json

import pytest
import torch

from chatumm_kit.data.shapes import Scene, ShapeObject, WorldConfig, render
from chatumm_kit.eval import (
    BenchmarkReport,
    Breakdown,
    DatasetSummary,
    ExpectedTurn,
    FreeRun,
    ModelReport,
    Reply,
    SuccessRates,
    TurnAggregate,
    score_turn,
)
from chatumm_kit.eval.intervals import wilson

WORLD = WorldConfig()
RED_CIRCLE = ShapeObject(shape="circle", colour="red", size="small", cell=0)
BLUE_SQUARE = ShapeObject(shape="square", colour="blue", size="large", cell=4)
TARGET = Scene(objects=(RED_CIRCLE, BLUE_SQUARE))


def _turn(*, task="understand", output="text", distance=None, answer=None, target=None, index=0, answer_scene=None):
    return ExpectedTurn(
        dialogue_id="d",
        index=index,
        task=task,
        output=output,
        distance=distance,
        distractor=False,
        answer=answer,
        answer_scene=answer_scene,
        target=target,
        user=["question"],
        reply=[answer or "x"],
    )


def _score(expected, *parts, threshold=1.0):
    return score_turn(expected=expected, reply=Reply(parts=list(parts)), world=WORLD, image_success_threshold=threshold)


def test_vqa_exact_match_after_normalisation_and_intent():
    exp = _turn(answer="top left")
    right = _score(exp, "It is in the upper left.")
    assert (right.intent, right.text_metric, right.text_correct, right.success) == (True, "vqa", True, True)
    wrong = _score(exp, "bottom left")
    assert (wrong.intent, wrong.text_correct, wrong.success) == (True, False, False)
    as_image = _score(exp, render(TARGET, WORLD))  # answered a question with a picture
    assert (as_image.predicted_output, as_image.intent, as_image.text_correct) == ("image", False, False)
    assert as_image.image is None  # no image was expected, so none is scored
    assert _score(_turn(answer="2"), "two").text_correct is True


def test_generated_image_partial_credit_and_success_threshold():
    exp = _turn(task="generate", output="image", target=TARGET)
    exact = _score(exp, render(TARGET, WORLD))
    assert exact.image.accuracy == 1.0 and exact.image.exact == 1.0 and exact.success
    assert exact.text_metric is None and exact.text_correct is None
    # one of two objects has the wrong colour: colour 1/2, everything else right → accuracy (1+0.5+1+1+1)/5
    recoloured = Scene(objects=(RED_CIRCLE.replace(colour="green"), BLUE_SQUARE))
    s = _score(exp, render(recoloured, WORLD))
    assert (s.image.colour, s.image.shape, s.image.count) == (0.5, 1.0, 1.0)
    assert s.image.accuracy == pytest.approx(0.9) and s.image.exact == 0.0
    assert s.intent and not s.success
    assert _score(exp, render(recoloured, WORLD), threshold=0.9).success
    assert s.values()["image_colour"] == 0.5 and s.values()["image_exact"] == 0.0
    # a text reply to a drawing request: wrong intent, and the missing image scores as an empty scene
    t = _score(exp, "A small red circle in the top left and a large blue square in the center.")
    assert (t.intent, t.image.accuracy, t.success) == (False, 0.0, False)
    # a 64×64 render of the right scene is resized for the detector
    big = render(TARGET, WorldConfig(image_size=64))
    assert _score(exp, big).image.exact == 1.0


def test_interleaved_needs_image_text_and_both_modalities():
    exp = _turn(task="generate", output="interleaved", target=TARGET, answer="red")
    img = render(TARGET, WORLD)
    ok = _score(exp, img, "Red.")
    assert (ok.intent, ok.text_metric, ok.text_correct, ok.success) == (True, "interleaved_text", True, True)
    no_text = _score(exp, img)
    assert (no_text.predicted_output, no_text.intent, no_text.image.exact, no_text.success) == (
        "image",
        False,
        1.0,
        False,
    )
    wrong_text = _score(exp, img, "blue")
    assert wrong_text.intent and not wrong_text.text_correct and not wrong_text.success


def test_caption_is_scored_by_the_scene_it_describes():
    caption = "A small red circle in the top left and a large blue square in the center."
    exp = _turn(task="caption", answer=caption, answer_scene=TARGET)
    reordered = _score(exp, "I see a large blue square in the middle and a small red circle in the upper left.")
    assert (reordered.text_metric, reordered.text_correct, reordered.caption_attr) == ("caption", True, 1.0)
    half = _score(exp, "A small red circle in the top left.")
    # one of two objects: count 0, each attribute 1/2 → (0 + 4 * 0.5) / 5
    assert half.text_correct is False and half.caption_attr == pytest.approx(0.4)
    assert _score(exp, "no idea").caption_attr == 0.0


def test_aggregate_by_distance_turn_and_task_has_exact_means():
    turns = []
    # distance 2: four VQA turns, three right → 0.75
    for i, reply in enumerate(["red", "red", "blue", "red"]):
        turns.append(_score(_turn(answer="red", distance=2, index=i), reply))
    # distance 0: one image turn with half the colours right (image_attr 0.9), one wrong-modality turn
    turns.append(
        _score(
            _turn(task="edit", output="image", target=TARGET, distance=0, index=1),
            render(Scene(objects=(RED_CIRCLE.replace(colour="green"), BLUE_SQUARE)), WORLD),
        )
    )
    turns.append(_score(_turn(task="edit", output="image", target=TARGET, distance=0, index=2), "sorry"))
    agg = TurnAggregate.from_turns(turns)
    assert list(agg.by_distance) == ["0", "2"]
    d2 = agg.by_distance["2"]
    assert d2.mean("vqa") == 0.75 and d2.stats["vqa"].count == 4 and d2.mean("success") == 0.75
    assert d2.mean("image_attr") is None
    d0 = agg.by_distance["0"]
    assert d0.mean("intent") == 0.5 and d0.mean("image_attr") == pytest.approx(0.45) and d0.mean("success") == 0.0
    assert agg.overall.mean("success") == pytest.approx(3 / 6) and agg.overall.mean("intent") == pytest.approx(5 / 6)
    # by turn index: index 1 holds a right VQA and the 0.9 image; index 2 a wrong VQA and the text reply
    assert agg.by_turn["1"].mean("success") == 0.5 and agg.by_turn["2"].mean("success") == 0.0
    assert agg.by_task["understand"].mean("vqa") == 0.75 and agg.by_task["edit"].mean("image_exact") == 0.0
    assert TurnAggregate.from_dict(json.loads(json.dumps(agg.to_dict()))) == agg
    # merging distance buckets weighs every turn the same: (3 right VQA + 0.45·2 image) over their own counts
    both = Breakdown.merged([d0, d2])
    assert both.mean("vqa") == 0.75 and both.stats["intent"].count == 6
    assert both.mean("success") == pytest.approx(3 / 6) and both.mean("image_attr") == pytest.approx(0.45)
    with pytest.raises(KeyError, match="unknown metric"):
        agg.overall.mean("accuracy")


def _run(n, first_failure):
    return FreeRun(dialogue_id=f"d{n}{first_failure}", num_turns=n, first_failure=first_failure)


def test_success_rates_stop_at_first_failure():
    runs = [_run(3, None), _run(3, 1), _run(2, 0), _run(1, None)]
    sr = SuccessRates.from_runs(runs)
    # SR@1: all four have a first turn, three survive it; SR@2: three long enough, one survives; SR@3: one of two
    assert sr.sr_at_k == {1: 0.75, 2: pytest.approx(1 / 3), 3: 0.5}
    assert sr.dialogues_at_k == {1: 4, 2: 3, 3: 2}
    assert sr.first_failure == {"none": 2, "0": 1, "1": 1}
    assert sr.mean_survived == pytest.approx((3 + 1 + 0 + 1) / 4)
    assert SuccessRates.from_dict(json.loads(json.dumps(sr.to_dict()))) == sr


def test_success_rates_carry_counts_and_wilson_intervals_over_dialogues():
    runs = [_run(3, None), _run(3, 1), _run(2, 0), _run(1, None)]
    sr = SuccessRates.from_runs(runs)
    assert sr.successes_at_k == {1: 3, 2: 1, 3: 1}
    d = sr.to_dict()
    assert d["successes_at_k"] == {"1": 3, "2": 1, "3": 1}
    assert d["ci95"]["1"] == wilson(3, 4).to_list() and d["ci95"]["3"] == wilson(1, 2).to_list()
    lo, hi = d["ci95"]["2"]  # 1 of 3: Wilson [0.0615, 0.7923]
    assert lo == pytest.approx(0.0615, abs=1e-4) and hi == pytest.approx(0.7923, abs=1e-4)
    assert sr.interval(4) is None and SuccessRates().to_dict()["ci95"] == {}
    # a report written before the counts were recorded reads them back from the rates
    old = {k: v for k, v in d.items() if k not in ("successes_at_k", "ci95")}
    assert SuccessRates.from_dict(old) == sr


def _report() -> BenchmarkReport:
    models = {}
    for name, replies in {"multi_turn": ["red", "red"], "single_turn": ["red", "blue"]}.items():
        turns = [
            _score(_turn(answer="red", distance=d, index=i), r) for i, (d, r) in enumerate(zip([None, 4], replies))
        ]
        turns.append(
            _score(_turn(task="generate", output="image", target=TARGET, distance=0, index=2), render(TARGET, WORLD))
        )
        runs = [
            FreeRun(dialogue_id="d", num_turns=3, turns=turns[:2], first_failure=1 if name == "single_turn" else None)
        ]
        models[name] = ModelReport.from_scores(name=name, source={"kind": "test"}, turns=turns, free_runs=runs)
    data = DatasetSummary(num_dialogues=1, num_turns=3, max_turns=3, by_distance={"none": 1, "0": 1, "4": 1})
    return BenchmarkReport(
        settings={"seed": 0, "reply": {"sampler": {"cfg_interval": [0.4, 1.0]}}}, data=data, models=models
    )


def test_report_round_trips_through_json_and_draws_a_png(tmp_path):
    report = _report()
    js, png = report.write(tmp_path, stem="r")
    again = BenchmarkReport.load(js)
    assert again == report
    assert again.models["single_turn"].teacher_forced.by_distance["4"].mean("vqa") == 0.0
    assert again.models["multi_turn"].free_running.sr_at_k == {1: 1.0, 2: 1.0, 3: 1.0}
    assert again.models["single_turn"].free_running.sr_at_k == {1: 1.0, 2: 0.0, 3: 0.0}
    assert report.distance_keys() == ["none", "0", "4"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = report.summary_table(max_k=3).splitlines()
    assert table[0].split()[:3] == ["model", "success", "intent"]
    assert table[2].split()[0] == "single_turn" and table[2].split()[-2:] == ["0.000", "0.000"]  # SR@2, SR@3
    head = table[0].split()
    assert head[8:11] == ["intent@d>=2", "vqa@d>=2", "image_attr@d>=2"]
    assert table[2].split()[head.index("vqa@d>=2")] == "0.000"  # single_turn's only distant turn: distance 4
    sr_rows = report.success_rate_table(max_k=2).splitlines()
    assert sr_rows[0].startswith("free-running SR@k")
    assert sr_rows[2].split()[:4] == ["SR@1", "multi_turn", "1.000", "1/1"]
    assert sr_rows[5].split()[:4] == ["SR@2", "single_turn", "0.000", "0/1"]
    assert sr_rows[5].endswith("[0.000, 0.793]")  # Wilson 95 % of 0 / 1


def test_turn_score_round_trip_keeps_attribute_scores():
    s = _score(_turn(task="generate", output="image", target=TARGET), torch.full((3, 32, 32), 255, dtype=torch.uint8))
    again = type(s).from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s and again.image.count == 0.0


def test_headline_keys_cover_distant_turns_of_the_model_and_its_baseline(tmp_path):
    report = _report()
    # add one more distant turn to multi_turn: a half-right image at distance 2 (image_attr 0.9, see above)
    far_image = _score(
        _turn(task="edit", output="image", target=TARGET, distance=2, index=3),
        render(Scene(objects=(RED_CIRCLE.replace(colour="green"), BLUE_SQUARE)), WORLD),
    )
    mt = report.models["multi_turn"]
    report.models["multi_turn"] = ModelReport.from_scores(
        name="multi_turn", source=mt.source, turns=[*mt.turns, far_image], free_runs=mt.free_runs
    )
    h = report.headline()
    # distance >= 2: multi_turn has the right VQA at distance 4 and the image at distance 2; distance 0 is left out
    assert h["model"] == "multi_turn" and h["baseline"] == "single_turn"
    assert h["history_vqa_acc_d2plus"] == 1.0 and h["history_vqa_turns_d2plus"] == 1
    assert h["history_attr_acc_d2plus"] == pytest.approx(0.9) and h["history_attr_turns_d2plus"] == 1
    assert h["history_turns_d2plus"] == 2
    assert h["baseline_history_vqa_acc_d2plus"] == 0.0 and h["baseline_history_attr_acc_d2plus"] is None
    # text-to-image, all attributes right: the one generate turn (a clean render of its target) in each model
    assert (h["t2i_exact"], h["t2i_exact_n"], h["baseline_t2i_exact_n"]) == (1.0, 1, 1)
    assert h["t2i_exact_wilson95"] == wilson(1, 1).to_list()
    assert [r.split()[3:6] for r in report.interval_table().splitlines() if r.startswith("t2i")] == [
        ["multi_turn", "1.000", "1"],
        ["single_turn", "1.000", "1"],
    ]
    js, _ = report.write(tmp_path, png=False)
    assert json.loads(js.read_text())["headline"] == h
    assert BenchmarkReport.load(js).headline() == h
    one = BenchmarkReport(settings={}, data=report.data, models={"multi_turn": report.models["multi_turn"]})
    assert "baseline" not in one.headline() and "baseline_history_vqa_acc_d2plus" not in one.headline()
