"""The four-dimensional taxonomy: tags, targets, steering toward target mixes, and the report."""

from __future__ import annotations

import json

import pytest

from chatumm_kit.synth import (
    ChainStage,
    DistractorStage,
    InterleaveStage,
    ShapesPool,
    ShapesRuleBackend,
    SynthPipeline,
    TaxonomyTargets,
)
from chatumm_kit.synth.taxonomy import (
    Dependency,
    InputModality,
    MixBalancer,
    OutputModality,
    SynthReport,
    Task,
    TurnTags,
)


def test_turn_tags_round_trip_and_cell():
    t = TurnTags(task=Task.EDIT, input=InputModality.TEXT, output=OutputModality.IMAGE, distance=4)
    assert t.dependency is Dependency.DISTANT and t.cell == "edit|text|image|distant"
    assert TurnTags.from_dict(t.to_dict()) == t and t.to_dict()["distance"] == 4
    assert TurnTags(task=Task.CHAT, input=InputModality.TEXT, output=OutputModality.TEXT).dependency is Dependency.NONE
    assert Dependency.from_distance(0) is Dependency.PREVIOUS
    assert InputModality.from_count(2) is InputModality.MULTI_IMAGE


def test_targets_normalise_and_reject_unknown_values():
    t = TaxonomyTargets(task={"generate": 2, "edit": 2}, distance={0: 1, 4: 3})
    assert t.task == {"generate": 0.5, "edit": 0.5} and t.distance == {"0": 0.25, "4": 0.75}
    assert t.dims() == ["task", "distance"]
    with pytest.raises(ValueError, match="unknown values \\['paint'\\]"):
        TaxonomyTargets(task={"paint": 1})
    with pytest.raises(ValueError, match="distances"):
        TaxonomyTargets(distance={"far": 1})
    with pytest.raises(ValueError, match="positive sum"):
        TaxonomyTargets(output={"text": 0})


def test_steering_favours_what_lags_and_state_round_trips():
    b = MixBalancer(targets=TaxonomyTargets(output={"text": 0.5, "image": 0.5}))
    tag = TurnTags(task=Task.CHAT, input=InputModality.TEXT, output=OutputModality.TEXT)
    b.add([tag] * 9)
    w = b.snapshot().weights("output", ["text", "image", "interleaved"], [1.0, 1.0, 1.0])
    assert w[1] > 10 * w[0]  # image lags far behind its target
    assert w[2] == 1.0  # no target: the prior stays
    assert b.gaps()["output"] == pytest.approx(0.5)
    c = MixBalancer(targets=b.targets)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert c.shares() == b.shares()
    assert MixBalancer().snapshot().weights("task", ["a", "b"], [0.2, 0.8]) == [0.2, 0.8]


def _run(tmp_path, name, targets):
    return SynthPipeline(
        pool=ShapesPool(seeds=[0, 100_000]),
        backend=ShapesRuleBackend(),
        stages=[ChainStage(turns=[2, 4]), DistractorStage(k=[0, 1, 2, 4, 8]), InterleaveStage(p=0.5)],
        output_dir=tmp_path / name,
        num_dialogues=240,
        shard_size=20,
        targets=targets,
        use_cache=False,
        report_png=False,
        progress=False,
    ).run()


def _tv(shares: dict, target: dict) -> float:
    keys = set(shares) | set(target)
    return 0.5 * sum(abs(shares.get(k, 0.0) - target.get(k, 0.0)) for k in keys)


def test_balancing_reaches_target_mixes_within_tolerance(tmp_path):
    # Far from what the unsteered stages produce: fewer generations, many edits, long distances.
    targets = TaxonomyTargets(
        task={"generate": 0.15, "edit": 0.35, "understand": 0.3, "caption": 0.05, "chat": 0.15},
        distance={0: 0.4, 1: 0.1, 2: 0.1, 4: 0.15, 8: 0.25},
    )
    free = _run(tmp_path, "free", None)
    steered = _run(tmp_path, "steered", targets)
    for dim, tol in (("task", 0.05), ("distance", 0.08)):
        got, base = _tv(steered.shares(dim), targets.get(dim)), _tv(free.shares(dim), targets.get(dim))
        assert got < tol, f"{dim}: steered mix {steered.shares(dim)} is {got:.3f} from the target"
        assert got < base / 2, f"{dim}: steering did not help ({got:.3f} vs {base:.3f} unsteered)"


def test_report_counts_and_files(tmp_path):
    r = SynthReport(targets={"task": {"chat": 1.0}})
    tags = [
        TurnTags(task=Task.GENERATE, input=InputModality.TEXT, output=OutputModality.IMAGE),
        TurnTags(task=Task.EDIT, input=InputModality.TEXT, output=OutputModality.IMAGE, distance=2),
    ]
    r.add_dialogue(tags, n_turns=4)
    r.add_failure("query2dep_q:refusal", "I'm sorry")
    d = r.to_dict()
    assert d["attempted"] == 2 and d["written"] == 1 and d["dropped"] == 1
    assert d["cells"] == {"edit|text|image|distant": 1, "generate|text|image|none": 1}
    assert d["distance_hist"] == {"2": 1} and d["turns_per_dialogue"] == {"4": 1}
    assert d["failures"] == {"query2dep_q:refusal": 1} and d["failure_examples"]["query2dep_q:refusal"] == "I'm sorry"
    assert SynthReport.from_dict(json.loads(json.dumps(d))).to_dict() == d
    js, png = r.write(tmp_path)
    assert json.loads(js.read_text())["cells"] == d["cells"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
