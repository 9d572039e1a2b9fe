"""95 % intervals of the benchmark (issue 18): Wilson against hand-computed values, the dialogue bootstrap's respect
for clustering, the paired difference, and the report's interval keys."""

import json

import numpy as np
import pytest

from chatumm_kit.data.shapes import WorldConfig
from chatumm_kit.eval import BenchmarkReport, DatasetSummary, ExpectedTurn, ModelReport, Reply, score_turn
from chatumm_kit.eval.intervals import dialogue_bootstrap, paired_difference_bootstrap, wilson
from chatumm_kit.eval.metrics import MetricStat


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # hand-computed: centre = (p + z²/2n)/(1 + z²/n), half = z/(1 + z²/n) * sqrt(p(1-p)/n + z²/4n²), z = 1.96
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (47, 100, 0.3751, 0.5671),
    ],
)
def test_wilson_matches_hand_computed_values(k, n, low, high):
    ci = wilson(k, n, z=1.96)
    assert ci.low == pytest.approx(low, abs=2e-4) and ci.high == pytest.approx(high, abs=2e-4)


def test_wilson_interval_always_holds_the_observed_rate():
    # at 0/n and n/n rounding once left low a hair above 0 (and high below 1): the plot's error bars went negative
    for n in range(1, 300):
        for k in (0, n // 3, n):
            ci = wilson(k, n)
            assert ci.low <= k / n <= ci.high
        assert wilson(0, n).low == 0.0 and wilson(n, n).high == 1.0


def test_wilson_of_no_turns_is_none_and_bad_counts_are_refused():
    assert wilson(0, 0) is None
    with pytest.raises(ValueError, match="successes must be in"):
        wilson(11, 10)


def test_metric_stat_reports_its_wilson_interval():
    stat = MetricStat(total=47.0, count=100)
    assert stat.to_dict()["ci95"] == pytest.approx([0.3751, 0.5671], abs=2e-4)
    assert MetricStat().to_dict()["ci95"] is None
    assert MetricStat.from_dict(stat.to_dict()) == stat


def _width(ci):
    return ci.high - ci.low


def test_bootstrap_over_dialogues_widens_when_turns_of_a_dialogue_agree():
    # 20 dialogues of 10 turns; each dialogue all right or all wrong: in effect 20 observations, not 200
    clustered = {f"d{i}": [float(i % 2)] * 10 for i in range(20)}
    turn_level = wilson(100, 200)
    boot = dialogue_bootstrap(clustered, seed=0)
    assert boot.contains(0.5) and _width(boot) > 2.5 * _width(turn_level)
    # the same 100/200 right answers spread evenly over dialogues: the bootstrap agrees with Wilson (no clustering)
    spread = {f"d{i}": [1.0, 0.0] * 5 for i in range(20)}
    assert _width(dialogue_bootstrap(spread, seed=0)) < 0.5 * _width(turn_level)  # every resample is exactly 0.5
    rng = np.random.default_rng(1)
    independent = {f"d{i}": rng.integers(0, 2, 10).astype(float).tolist() for i in range(20)}
    ratio = _width(dialogue_bootstrap(independent, seed=0)) / _width(turn_level)
    assert 0.6 < ratio < 1.4


def test_bootstrap_is_seeded():
    values = {f"d{i}": [float(i % 3 == 0), 1.0] for i in range(15)}
    assert dialogue_bootstrap(values, seed=3) == dialogue_bootstrap(values, seed=3)
    assert dialogue_bootstrap({}, seed=0) is None


def test_paired_difference_excludes_zero_on_a_clear_win_and_includes_it_on_a_tie():
    rng = np.random.default_rng(0)
    base = {f"d{i}": rng.integers(0, 2, 6).astype(float).tolist() for i in range(40)}
    win = {k: [1.0 if rng.random() < 0.8 else x for x in v] for k, v in base.items()}  # mostly fixed baseline errors
    diff, ci = paired_difference_bootstrap(win, base, seed=0)
    assert diff > 0.2 and ci.low > 0
    other = {f"d{i}": rng.integers(0, 2, 6).astype(float).tolist() for i in range(40)}  # same skill, other draws
    diff, ci = paired_difference_bootstrap(other, base, seed=0)
    assert abs(diff) < 0.1 and ci.contains(0.0)
    assert paired_difference_bootstrap({"a": [1.0]}, {"b": [0.0]}) is None  # no shared dialogue


WORLD = WorldConfig()


def _vqa(dialogue, index, distance, right):
    exp = ExpectedTurn(dialogue_id=dialogue, index=index, task="understand", output="text", distance=distance,
                       distractor=False, answer="red", answer_scene=None, target=None, user=["q"], reply=["red"])  # fmt: skip
    return score_turn(expected=exp, reply=Reply(parts=["red" if right else "blue"]), world=WORLD)


def test_headline_carries_counts_intervals_and_the_paired_difference(tmp_path):
    # 12 dialogues, 3 far VQA turns each (distance 2, 4, 8) + one near turn (distance 0, not a headline turn)
    mt, st = [], []
    for i in range(12):
        for j, d in enumerate([0, 2, 4, 8]):
            mt.append(_vqa(f"d{i}", j, d, right=True))
            st.append(_vqa(f"d{i}", j, d, right=(d == 0 or i % 4 == 0)))
    models = {
        name: ModelReport.from_scores(name=name, source={}, turns=t, free_runs=[])
        for name, t in {"multi_turn": mt, "single_turn": st}.items()
    }
    report = BenchmarkReport(settings={"seed": 0}, data=DatasetSummary(), models=models, slice="recomposed")
    h = report.headline()
    assert h["slice"] == "recomposed"
    assert h["history_vqa_acc_d2plus"] == 1.0 and h["history_vqa_acc_d2plus_n"] == 36
    assert (
        h["baseline_history_vqa_acc_d2plus"] == pytest.approx(9 / 36) and h["baseline_history_vqa_acc_d2plus_n"] == 36
    )
    assert h["history_vqa_acc_d2plus_wilson95"] == wilson(36, 36).to_list()
    assert h["baseline_history_vqa_acc_d2plus_wilson95"] == wilson(9, 36).to_list()
    lo, hi = h["baseline_history_vqa_acc_d2plus_ci95"]
    assert lo < 9 / 36 < hi and hi - lo > wilson(9, 36).high - wilson(9, 36).low  # clustered: wider than Wilson
    assert h["history_vqa_acc_d2plus_diff"] == pytest.approx(0.75) and h["history_vqa_acc_d2plus_diff_ci95"][0] > 0
    assert h["history_attr_acc_d2plus_n"] == 0 and h["history_attr_acc_d2plus_ci95"] is None
    assert h["history_attr_acc_d2plus_diff"] is None
    js, png = report.write(tmp_path)
    assert json.loads(js.read_text())["headline"] == h and BenchmarkReport.load(js).headline() == h
    assert png.stat().st_size > 10_000
    table = report.interval_table().splitlines()
    assert table[0] == "headline cells (slice: recomposed)"
    diff_row = next(r for r in table if r.startswith("history_vqa_acc_d2plus") and "difference" in r)
    assert "0.750" in diff_row
