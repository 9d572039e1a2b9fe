"""The edit diagnosis: each edited picture classified by what it changed and what it kept, on crafted scenes, on
random edits, and end to end from a benchmark report through ``chatumm diagnose-edits``."""

import copy
import json
import random

import pytest
import torch

from chatumm_kit.cli import main
from chatumm_kit.data.dialogue import Role
from chatumm_kit.data.shapes import Scene, ShapeObject, WorldConfig, sample_edit, sample_scene
from chatumm_kit.data.shards import read_samples
from chatumm_kit.eval import OracleResponder, Reply, expected_turns, run_benchmark
from chatumm_kit.eval.edit_diagnosis import EditTruth, diagnose_edit, diagnose_report, edit_truths
from chatumm_kit.synth import (
    ChainStage,
    DistractorStage,
    ShapesPhrasing,
    ShapesPool,
    ShapesRuleBackend,
    SynthPipeline,
)

WORLD = WorldConfig()
RED = ShapeObject(shape="circle", colour="red", size="small", cell=0)
SQUARE = ShapeObject(shape="square", colour="blue", size="large", cell=4)


def truth(operation, source, target, subject, result, others=()):
    return EditTruth(
        dialogue_id="d",
        index=1,
        operation=operation,
        distance=0,
        source=Scene(objects=source),
        target=Scene(objects=target),
        subject=subject,
        result=result,
        others=tuple(Scene(objects=o) for o in others),
    )


def flags(case):
    return {k: getattr(case, k) for k in ("picture", "exact", "applied", "kept", "copied", "other_picture")}


def test_crafted_edits_are_told_apart():
    blue = RED.replace(colour="blue")
    recolour = truth("recolour", (RED, SQUARE), (blue, SQUARE), RED, blue, others=[(RED.replace(cell=8),)])
    assert flags(diagnose_edit(Scene(objects=(blue, SQUARE)), recolour)) == dict(
        picture=True, exact=True, applied=True, kept=True, copied=False, other_picture=False
    )
    # the source itself: the change ignored, the rest kept
    assert flags(diagnose_edit(Scene(objects=(RED, SQUARE)), recolour)) == dict(
        picture=True, exact=False, applied=False, kept=True, copied=True, other_picture=False
    )
    # the right change, but the square redrawn as a cross: applied, not kept
    cross = SQUARE.replace(shape="cross")
    case = diagnose_edit(Scene(objects=(blue, cross)), recolour)
    assert (case.applied, case.kept, case.exact) == (True, False, False)
    # a green circle: the wrong change of the right object (the rest kept)
    case = diagnose_edit(Scene(objects=(RED.replace(colour="green"), SQUARE)), recolour)
    assert (case.applied, case.kept, case.copied) == (False, True, False)
    # the conversation's other picture, returned as it was
    case = diagnose_edit(Scene(objects=(RED.replace(cell=8),)), recolour)
    assert case.other_picture and not case.copied and not case.exact
    # no picture (or none the detector could read)
    assert flags(diagnose_edit(None, recolour)) == dict.fromkeys(flags(case), False)


def test_a_move_must_also_empty_the_old_cell_and_a_remove_its_cell():
    moved = RED.replace(cell=2)
    move = truth("move", (RED,), (moved,), RED, moved)
    both = diagnose_edit(Scene(objects=(RED, moved)), move)  # drawn in the new cell, but left in the old one too
    assert (both.applied, both.kept, both.exact) == (False, True, False)
    assert diagnose_edit(Scene(objects=(moved,)), move).exact
    remove = truth("remove", (RED, SQUARE), (SQUARE,), RED, None)
    assert flags(diagnose_edit(Scene(objects=(SQUARE,)), remove))["exact"]
    gone = diagnose_edit(Scene(), remove)  # both removed: the removal applied, the square lost
    assert (gone.applied, gone.kept) == (True, False)
    add = truth("add", (SQUARE,), (SQUARE, RED), None, RED)
    assert not diagnose_edit(Scene(objects=(SQUARE,)), add).applied  # nothing added
    assert not diagnose_edit(Scene(objects=(RED,)), add).kept  # added, but the square lost


def test_exact_is_applied_and_kept_on_random_edits_and_scenes():
    rng = random.Random(0)
    seen = set()
    for _ in range(400):
        edit = sample_edit(rng, config=WORLD)
        t = EditTruth(
            dialogue_id="d",
            index=0,
            operation=edit.operation.value,
            distance=None,
            source=edit.source,
            target=edit.target,
            subject=edit.subject,
            result=edit.result,
            others=(),
        )
        guess = rng.choice([edit.target, edit.source, sample_scene(rng, WORLD)])
        case = diagnose_edit(guess, t)
        assert case.exact == (case.applied and case.kept), (edit, guess)
        assert case.exact == (guess == edit.target)
        assert not (case.copied and case.applied)  # an edit always changes something
        seen.add((case.exact, case.copied))
    assert seen >= {(True, False), (False, True), (False, False)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout_edits")
    phrasing = ShapesPhrasing(split="heldout")
    SynthPipeline(
        pool=ShapesPool(world=WORLD, phrasing=phrasing, seeds=[3_200_000, 3_300_000]),
        backend=ShapesRuleBackend(world=WORLD, phrasing=phrasing),
        stages=[ChainStage(turns=[3, 4]), DistractorStage(k=[0, 1, 2])],
        output_dir=out,
        num_dialogues=12,
        shard_size=12,
        use_cache=False,
        report_png=False,
        progress=False,
    ).run()
    return str(out / "index.json")


class LastPicture:
    """Answers every turn with the truth, except that a picture reply is the conversation's most recent picture."""

    def __init__(self, samples):
        self.truth = {s.dialogue.id: expected_turns(s, WORLD) for s in samples}

    def start(self, dialogue_id):
        self.turns, self.users, self.last = self.truth[dialogue_id], 0, None

    def add_turn(self, role, parts):
        self.users += Role(role) is Role.USER
        self.last = next((p for p in reversed(parts) if isinstance(p, torch.Tensor)), self.last)

    def respond(self, *, seed):
        exp = self.turns[self.users - 1]
        if exp.output == "text" or self.last is None:
            return Reply(parts=list(exp.reply))
        return Reply(parts=[self.last if isinstance(p, torch.Tensor) else p for p in exp.reply])

    def retract(self):
        pass


def test_report_to_diagnosis_through_the_cli(shards, tmp_path, capsys):
    samples = list(read_samples(shards))
    truths = [t for s in samples for t in edit_truths(s)]
    assert len(truths) >= 6 and {t.distance for t in truths} >= {None, 0}
    report = run_benchmark(
        models={"oracle": OracleResponder(samples=samples, world=WORLD), "last_picture": LastPicture(samples)},
        shards=shards,
    )
    report.write(tmp_path / "eval", png=False)

    assert main(["diagnose-edits", str(tmp_path / "eval"), "--json"]) == 0
    out = capsys.readouterr().out
    assert "edits of oracle" in out and "edits of last_picture" in out
    figures = json.loads(out.strip().splitlines()[-1])["models"]
    oracle = figures["oracle"]["all"]
    assert oracle["exact"]["k"] == oracle["applied"]["k"] == oracle["kept"]["k"] == len(truths)
    assert oracle["copied"]["k"] == oracle["other_picture"]["k"] == 0

    # The most recent picture is usually the source of an edit right after it was shown (distance 0 or the user's
    # own picture): those come out as copies, the change not applied and the rest kept; the others were the
    # conversation's other pictures, returned as they were.
    data = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    copier = diagnose_report(data, samples, model="last_picture")
    by_key = {(e.dialogue_id, e.index): e for e in truths}
    near = [c for c in copier.cases if c.distance in (None, 0)]
    copies = [c for c in near if c.copied]
    assert len(copies) >= len(near) / 2 > 0
    assert all(c.kept and not c.applied and not c.exact for c in copies)
    for c in copier.cases:
        if not c.copied:
            assert c.other_picture == (by_key[c.dialogue_id, c.index].others != ()), c
    assert figures["last_picture"]["all"]["copied"]["k"] == sum(c.copied for c in copier.cases)
    assert figures["last_picture"]["all"]["exact"]["k"] == 0


def test_bad_input_is_named(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no benchmark report"):
        main(["diagnose-edits", str(tmp_path / "nowhere")])
    samples = list(read_samples(shards))
    report = run_benchmark(models={"oracle": OracleResponder(samples=samples, world=WORLD)}, shards=shards)
    report.write(tmp_path / "eval", png=False)
    with pytest.raises(SystemExit, match=r"no model 'multi_turn' \(it has \['oracle'\]\)"):
        main(["diagnose-edits", str(tmp_path / "eval"), "--model", "multi_turn"])
    # a relative shards path read from another folder is named, with the way out; --shards is that way
    data = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    moved = {**data, "settings": {**data["settings"], "shards": "runs/shapes/eval_data/index.json"}}
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "eval_report.json").write_text(json.dumps(moved))
    with pytest.raises(SystemExit, match=r"cannot read the held-out dialogues runs/shapes/eval_data/index.json \(the"):
        main(["diagnose-edits", str(tmp_path / "moved")])
    assert main(["diagnose-edits", str(tmp_path / "moved"), "--shards", shards]) == 0
    with pytest.raises(ValueError, match="edit turn .* of dialogue .* is not in the given dialogues"):
        diagnose_report(data, [s for s in samples if not edit_truths(s)], model="oracle")
    # an edit turn without its synthesis record is named, dialogue and turn
    broken = copy.deepcopy(next(s for s in samples if edit_truths(s)))
    i, turn = next((i, t) for i, t in enumerate(broken.dialogue.turns) if (t.meta.get("tags") or {}).get("task") == "edit"
                   and t.role is Role.ASSISTANT)  # fmt: skip
    del turn.meta["truth"]["world"]
    with pytest.raises(ValueError, match=rf"dialogue '{broken.dialogue.id}' turn {i}: an edit turn without its world"):
        edit_truths(broken)
