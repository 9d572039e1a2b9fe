"""The benchmark protocol on synthesized held-out dialogues: oracle, wrong-modality and scripted responders, teacher
forcing, stop-at-first-failure SR@k, and a real tiny random ChatUMM through the ChatSession adapter."""

import copy
import json

import pytest
import torch

import chatumm_kit.eval.responders as responders_module
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import Role
from chatumm_kit.data.shapes import WorldConfig, render
from chatumm_kit.data.shards import read_samples
from chatumm_kit.eval import (
    METRICS,
    BenchmarkReport,
    BenchmarkSettings,
    ContextTrackingBenchmark,
    OracleResponder,
    Reply,
    ReplySettings,
    Responder,
    TurnFilter,
    expected_turns,
    run_benchmark,
)
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.presets import chatumm_tiny
from chatumm_kit.synth import (
    ChainStage,
    DistractorStage,
    InterleaveStage,
    ShapesPhrasing,
    ShapesPool,
    ShapesRuleBackend,
    SynthPipeline,
)

WORLD = WorldConfig()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout")
    phrasing = ShapesPhrasing(split="heldout")
    SynthPipeline(
        pool=ShapesPool(world=WORLD, phrasing=phrasing, seeds=[3_000_000, 3_100_000]),
        backend=ShapesRuleBackend(world=WORLD, phrasing=phrasing),
        stages=[ChainStage(turns=[2, 3]), DistractorStage(k=[0, 1, 2]), InterleaveStage(p=1.0)],
        output_dir=out,
        num_dialogues=8,
        shard_size=8,
        use_cache=False,
        report_png=False,
        progress=False,
    ).run()
    return str(out / "index.json")


@pytest.fixture(scope="module")
def samples(shards):
    return list(read_samples(shards))


class Scripted:
    """Replies with the truth, except that turns in ``wrong`` (dialogue id → exchange indices) get a wrong answer of
    the right modality. Records what it is asked and what history it is given."""

    def __init__(self, samples, wrong):
        self.truth = {s.dialogue.id: expected_turns(s, WORLD) for s in samples}
        self.wrong = wrong
        self.calls: list[tuple[str, int]] = []
        self.history: list[tuple[Role, list]] = []
        self.retracts = 0

    def start(self, dialogue_id):
        self.dialogue, self.users, self.history = dialogue_id, 0, []

    def add_turn(self, role, parts):
        self.history.append((Role(role), list(parts)))
        self.users += Role(role) is Role.USER

    def respond(self, *, seed):
        index = self.users - 1
        self.calls.append((self.dialogue, index))
        exp = self.truth[self.dialogue][index]
        if index not in self.wrong.get(self.dialogue, ()):
            return Reply(parts=list(exp.reply))
        blank = torch.full((3, 32, 32), 255, dtype=torch.uint8)
        return Reply(parts=[blank if isinstance(p, torch.Tensor) else "certainly not" for p in exp.reply])

    def retract(self):
        self.retracts += 1


class WrongModality:
    """Answers text turns with a (right) picture and image turns with words only."""

    def __init__(self, samples):
        self.truth = {s.dialogue.id: expected_turns(s, WORLD) for s in samples}
        self.picture = next(t.target for ts in self.truth.values() for t in ts if t.target is not None)

    def start(self, dialogue_id):
        self.turns, self.users = self.truth[dialogue_id], 0

    def add_turn(self, role, parts):
        self.users += Role(role) is Role.USER

    def respond(self, *, seed):
        exp = self.turns[self.users - 1]
        if exp.output == "text":
            return Reply(parts=[render(self.picture, WORLD)])
        return Reply(parts=[exp.answer or "a picture"])  # words only, even where the truth is image + text

    def retract(self):
        pass


def test_held_out_set_has_the_tags_the_benchmark_breaks_down_by(samples):
    turns = [t for s in samples for t in expected_turns(s, WORLD)]
    assert {t.output for t in turns} == {"text", "image", "interleaved"}
    assert {t.distance_key for t in turns} >= {"none", "0"}
    for t in turns:
        assert (t.target is not None) == (t.output != "text")
        assert t.answer is not None or t.output == "image"
        if t.task == "caption":
            assert t.answer_scene is not None


def test_oracle_scores_one_on_everything(samples):
    bench = ContextTrackingBenchmark(samples=samples, world=WORLD)
    report = bench.evaluate("oracle", OracleResponder(samples=samples, world=WORLD))
    tf = report.teacher_forced
    assert tf.overall.stats.keys() >= {"success", "intent", "vqa", "caption", "image_attr", "interleaved_text"}
    for name, stat in tf.overall.stats.items():
        assert stat.mean == 1.0, name
    for key, breakdown in tf.by_distance.items():
        assert breakdown.mean("success") == 1.0, key
    assert len(report.turns) == sum(len(expected_turns(s, WORLD)) for s in samples)
    assert set(report.free_running.sr_at_k.values()) == {1.0}
    assert all(r.first_failure is None for r in report.free_runs)


def test_wrong_modality_scores_zero_intent(samples):
    report = ContextTrackingBenchmark(samples=samples, world=WORLD).evaluate("flip", WrongModality(samples))
    assert report.teacher_forced.overall.mean("intent") == 0.0
    assert report.teacher_forced.overall.mean("success") == 0.0
    assert report.free_running.sr_at_k[1] == 0.0
    assert all(r.first_failure == 0 and len(r.turns) == 1 for r in report.free_runs)


def test_free_running_stops_at_the_first_failure_and_sr_at_k_is_exact(samples):
    ids = [s.dialogue.id for s in samples]
    lengths = {s.dialogue.id: len(expected_turns(s, WORLD)) for s in samples}
    wrong = {ids[0]: {0}, ids[1]: {1, lengths[ids[1]] - 1}, ids[2]: {lengths[ids[2]] - 1}}
    bench = ContextTrackingBenchmark(samples=samples, world=WORLD)

    scripted = Scripted(samples, wrong)
    runs = bench.free_running(scripted)
    first = {r.dialogue_id: r.first_failure for r in runs}
    assert first == {i: (min(wrong[i]) if i in wrong else None) for i in ids}
    # it stopped: the turns after a failure were never asked
    assert len(scripted.calls) == sum((min(wrong[i]) + 1) if i in wrong else lengths[i] for i in ids)
    assert [len(r.turns) for r in runs] == [len([c for c in scripted.calls if c[0] == i]) for i in ids]

    report = bench.evaluate("scripted", Scripted(samples, wrong))
    survived = {i: (min(wrong[i]) if i in wrong else lengths[i]) for i in ids}
    for k, rate in report.free_running.sr_at_k.items():
        eligible = [i for i in ids if lengths[i] >= k]
        assert report.free_running.dialogues_at_k[k] == len(eligible)
        assert rate == pytest.approx(sum(survived[i] >= k for i in eligible) / len(eligible)), k
    # teacher forcing scores every turn; only the scripted ones fail
    n_wrong = sum(len(v) for v in wrong.values())
    assert len(report.turns) == sum(lengths.values())
    assert report.teacher_forced.overall.mean("success") == pytest.approx(1 - n_wrong / sum(lengths.values()))
    assert {(t.dialogue_id, t.index) for t in report.turns if not t.success} == {
        (i, j) for i, js in wrong.items() for j in js
    }


def test_teacher_forcing_replays_the_true_reply_not_the_models(samples):
    sample = max(samples, key=lambda s: len(s.dialogue.turns))
    everything_wrong = {sample.dialogue.id: set(range(len(sample.dialogue.turns)))}
    scripted = Scripted([sample], everything_wrong)
    bench = ContextTrackingBenchmark(samples=[sample], world=WORLD)
    scores = bench.teacher_forced(scripted)
    assert not any(s.success for s in scores)
    truth = expected_turns(sample, WORLD)
    assert scripted.retracts == len(truth) - 1  # every reply but the last is replaced by the truth
    roles = [r for r, _ in scripted.history]
    assert roles == [Role.USER, Role.ASSISTANT] * (len(truth) - 1) + [Role.USER]
    for j, (role, parts) in enumerate(scripted.history):
        want = truth[j // 2].user if role is Role.USER else truth[j // 2].reply
        assert len(parts) == len(want)
        for got, exp in zip(parts, want):
            assert torch.equal(got, exp) if isinstance(exp, torch.Tensor) else got == exp
    # the same (dialogue, exchange) gets the same seed in both modes and across runs, different ones elsewhere
    assert bench.turn_seed(sample.dialogue.id, 1) == ContextTrackingBenchmark(samples=[sample]).turn_seed(
        sample.dialogue.id, 1
    )
    assert bench.turn_seed(sample.dialogue.id, 1) != bench.turn_seed(sample.dialogue.id, 2)


def test_protocol_and_errors(samples, shards):
    assert isinstance(OracleResponder(samples=samples, world=WORLD), Responder)
    assert isinstance(Scripted(samples, {}), Responder)
    with pytest.raises(ValueError, match="no dialogues"):
        ContextTrackingBenchmark(samples=[], world=WORLD)
    with pytest.raises(TypeError, match=r"models\['x'\]"):
        run_benchmark(models={"x": 3}, shards=shards)
    bad = copy.deepcopy(samples[0])
    bad.dialogue.turns[1] = type(bad.dialogue.turns[1])(role=Role.ASSISTANT, segments=bad.dialogue.turns[1].segments)
    with pytest.raises(ValueError, match="no taxonomy tags"):
        expected_turns(bad, WORLD)


def test_tiny_random_chatumm_runs_through_the_chat_session(shards, samples, tmp_path):
    torch.manual_seed(0)
    texts = [t.text for s in samples for t in s.dialogue.turns if t.text]
    tokenizer = ChatTokenizer.train(texts, vocab_size=300)
    model = chatumm_tiny(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, intermediate_size=64,
                         vit_hidden=32, vit_layers=1)  # fmt: skip
    settings = BenchmarkSettings(
        max_dialogues=2,
        seed=3,
        # sampled intents (seeded per turn, so still deterministic) make the random model draw pictures too
        reply=ReplySettings(max_new_tokens=4, max_segments=2, temperature=1.0, sampler=SamplerConfig(num_steps=2)),
    )
    report = run_benchmark(models={"random": (model, tokenizer)}, shards=shards, settings=settings, world=WORLD)
    n_turns = sum(len(expected_turns(s, WORLD)) for s in samples[:2])
    assert report.data.num_dialogues == 2 and report.data.num_turns == n_turns
    m = report.models["random"]
    assert m.source == {"kind": "model"}
    assert len(m.turns) == n_turns and m.teacher_forced.overall.stats["intent"].count == n_turns
    assert set(m.teacher_forced.overall.stats) <= set(METRICS)
    assert all(t.predicted_output in ("text", "image", "interleaved") for t in m.turns)
    assert {t.predicted_output for t in m.turns} >= {"text", "image"}
    assert m.free_running.dialogues_at_k[1] == 2 and len(m.free_runs) == 2
    # exchange 0 has the same history and seed in both modes, so the same reply
    for run in m.free_runs:
        tf0 = next(t for t in m.turns if t.dialogue_id == run.dialogue_id and t.index == 0)
        assert run.turns[0] == tf0
    js, png = report.write(tmp_path)
    assert BenchmarkReport.load(js) == report and png.is_file()
    assert json.loads(js.read_text())["settings"]["reply"]["sampler"]["num_steps"] == 2


def test_lockstep_batches_give_the_same_report_as_one_dialogue_at_a_time(shards, samples, monkeypatch):
    texts = [t.text for s in samples for t in s.dialogue.turns if t.text]
    tokenizer = ChatTokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    model = chatumm_tiny(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, intermediate_size=64,
                         vit_hidden=32, vit_layers=1)  # fmt: skip
    model = model.double()  # float64: the stacked forward's rounding cannot move a pixel
    reply = ReplySettings(max_new_tokens=4, max_segments=2, temperature=1.0, sampler=SamplerConfig(num_steps=2))
    together: list[int] = []
    inner = responders_module.respond_batch

    def counting(sessions, **kwargs):
        together.append(len(sessions))
        return inner(sessions, **kwargs)

    monkeypatch.setattr(responders_module, "respond_batch", counting)
    reports, calls = {}, {}
    for size in (1, 3):
        together.clear()
        settings = BenchmarkSettings(max_dialogues=5, seed=3, reply=reply, batch_size=size)
        reports[size] = run_benchmark(
            models={"random": (model, tokenizer)}, shards=shards, settings=settings, world=WORLD
        )
        calls[size] = list(together)
    assert reports[1] == reports[3]  # every score, breakdown, SR@k and setting (batch_size is not a result setting)
    assert "batch_size" not in reports[3].settings
    assert calls[1] == []  # one by one: plain respond
    # groups of 3 and 2 dialogues; dialogues of different lengths (or failing, free running) drop out
    assert max(calls[3]) == 3 and 1 in calls[3] and set(calls[3]) <= {1, 2, 3}
    n_turns = sum(len(expected_turns(s, WORLD)) for s in samples[:5])
    assert len(reports[3].models["random"].turns) == n_turns
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        BenchmarkSettings(batch_size=0)


def test_turn_filter_asks_only_the_selected_turns_and_prefills_the_rest_with_the_truth(samples):
    far = TurnFilter(min_distance=2)
    lengths = {s.dialogue.id: len(expected_turns(s, WORLD)) for s in samples}
    selected = {(t.dialogue_id, t.index) for s in samples for t in expected_turns(s, WORLD) if far.selects(t)}
    assert selected and len(selected) < sum(lengths.values())  # the fixture has far turns, and others
    bench = ContextTrackingBenchmark(samples=samples, world=WORLD, settings=BenchmarkSettings(turns=far))
    scripted = Scripted(samples, {})
    report = bench.evaluate("scripted", scripted)
    assert set(scripted.calls) == selected and len(scripted.calls) == len(selected)
    assert {(t.dialogue_id, t.index) for t in report.turns} == selected
    assert report.free_runs == [] and report.free_running.sr_at_k == {}  # no free-running pass
    # the history of every asked turn is the true dialogue up to it (replies never generated, never retracted)
    sample = next(s for s in samples if any(d == s.dialogue.id for d, _ in selected))
    truth = expected_turns(sample, WORLD)
    last = max(j for d, j in selected if d == sample.dialogue.id)
    one = Scripted([sample], {})
    ContextTrackingBenchmark(samples=[sample], world=WORLD, settings=BenchmarkSettings(turns=far)).teacher_forced(one)
    assert one.retracts == 0
    assert [r for r, _ in one.history] == [Role.USER, Role.ASSISTANT] * last + [Role.USER]  # stops after the last
    for j, (role, parts) in enumerate(one.history):
        want = truth[j // 2].user if role is Role.USER else truth[j // 2].reply
        assert all(torch.equal(g, w) if isinstance(w, torch.Tensor) else g == w for g, w in zip(parts, want))
    assert bench.report([report]).settings["turns"] == {"min_distance": 2, "tasks": None}
    assert "turns" not in BenchmarkSettings().to_dict()  # unfiltered reports keep their settings as before
    with pytest.raises(ValueError, match="min_distance"):
        TurnFilter(min_distance=-1)
    with pytest.raises(ValueError, match="tasks"):
        TurnFilter(tasks="generate")
    with pytest.raises(TypeError, match="TurnFilter"):
        BenchmarkSettings(turns={"min_distance": 2})


@pytest.fixture(scope="module")
def far_shards(tmp_path_factory):
    """Six held-out dialogues whose references lie 2 or 3 exchanges back."""
    out = tmp_path_factory.mktemp("heldout_far")
    phrasing = ShapesPhrasing(split="heldout")
    SynthPipeline(
        pool=ShapesPool(world=WORLD, phrasing=phrasing, seeds=[3_000_000, 3_100_000]),
        backend=ShapesRuleBackend(world=WORLD, phrasing=phrasing),
        stages=[ChainStage(turns=[2, 3]), DistractorStage(k=[2, 3]), InterleaveStage(p=1.0)],
        output_dir=out, num_dialogues=6, shard_size=6, use_cache=False, report_png=False, progress=False,
    ).run()  # fmt: skip
    return str(out / "index.json")


def test_headline_only_run_equals_the_full_run_on_the_headline_cells(far_shards):
    """The cheap headline evaluation (benchmark.turns=${headline_turns}) scores the far turns exactly as the full
    run does, on a real tiny ChatUMM (float64, lockstep batches of 3)."""
    shards, samples = far_shards, list(read_samples(far_shards))
    texts = [t.text for s in samples for t in s.dialogue.turns if t.text]
    tokenizer = ChatTokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    model = chatumm_tiny(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, intermediate_size=64,
                         vit_hidden=32, vit_layers=1).double()  # fmt: skip
    reply = ReplySettings(max_new_tokens=4, max_segments=2, temperature=1.0, sampler=SamplerConfig(num_steps=2))
    reports = {}
    for name, turns in {"full": None, "headline": TurnFilter(min_distance=2)}.items():
        settings = BenchmarkSettings(seed=5, reply=reply, batch_size=3, turns=turns)
        reports[name] = run_benchmark(models={"m": (model, tokenizer)}, shards=shards, settings=settings, world=WORLD)
    full, cheap = reports["full"].models["m"], reports["headline"].models["m"]
    far = [t for t in full.turns if t.distance is not None and t.distance >= 2]
    assert far and cheap.turns == far  # every far turn: the same reply, the same score
    assert {t.predicted_output for t in far} >= {"text", "image", "interleaved"}  # images were generated, and text
    hf, hc = reports["full"].headline(), reports["headline"].headline()
    cells = [k for k in hf if "d2plus" in k]
    assert len(cells) == 15 and {k: hc[k] for k in cells} == {k: hf[k] for k in cells}
    assert len(cheap.turns) < len(full.turns) / 2 and cheap.free_runs == [] and full.free_runs
