"""The pipeline: resume after a kill, determinism, failures recorded not raised, caching, the recipe entry point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import chatumm_kit.synth.pipeline as pipeline_mod
from chatumm_kit.config import RecipeError, load_recipe, validate_recipe
from chatumm_kit.data.shards import read_samples
from chatumm_kit.synth import (
    BackendError,
    ChainStage,
    DatasetPool,
    DistractorStage,
    ExchangeMeta,
    InterleaveStage,
    JsonlSource,
    ShapesPool,
    ShapesRuleBackend,
    SynthAborted,
    SynthPipeline,
    run_synth,
)
from chatumm_kit.synth.draft import DialogueMeta
from conftest import EchoBackend, png_bytes, write_jsonl


class Killed(BaseException):
    """Stands in for SIGKILL / KeyboardInterrupt: not an Exception, so nothing may swallow it."""


def stages():
    return [ChainStage(turns=[2, 3]), DistractorStage(k=[0, 1, 2, 4, 8]), InterleaveStage(p=0.5)]


def shapes_pipeline(out, *, n=30, shard=8, backend=None, **kw):
    kw.setdefault("stages", stages())
    return SynthPipeline(
        pool=ShapesPool(seeds=[0, 10_000]),
        backend=backend or ShapesRuleBackend(),
        output_dir=out,
        num_dialogues=n,
        shard_size=shard,
        use_cache=False,
        report_png=False,
        progress=False,
        **kw,
    )


def snapshot(out: Path) -> dict:
    """Everything a consumer sees: the shard files byte for byte, the index, and the decoded samples."""
    tars = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
    samples = [(s.dialogue.to_json(), {k: v.tolist() for k, v in s.images.items()}) for s in read_samples(out)]
    return {"tars": tars, "index": json.loads((out / "index.json").read_text()), "samples": samples}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    report = shapes_pipeline(out).run()
    return out, snapshot(out), report


def test_reference_run_writes_what_was_asked(reference):
    out, snap, report = reference
    assert report.written == 30 and len(snap["samples"]) == 30
    assert len(snap["tars"]) >= 4 and sum(s["num_samples"] for s in snap["index"]["shards"]) == 30
    ids = [json.loads(d)["id"] for d, _ in snap["samples"]]
    assert len(set(ids)) == 30 and ids == sorted(ids)
    assert json.loads((out / "report.json").read_text())["written"] == 30


def test_killed_mid_run_resumes_to_the_same_shards(reference, tmp_path):
    _, ref, _ = reference
    out = tmp_path / "out"
    pipe = shapes_pipeline(out)
    real = pipe.make

    def make(index, **kw):
        if index == 19:  # in the third chunk: two shards are committed by then
            raise Killed()
        return real(index, **kw)

    pipe.make = make
    with pytest.raises(Killed):
        pipe.run()
    state = json.loads((out / "synth_state.json").read_text())
    assert state["next_chunk"] == 2 and len(state["shards"]) == 2 and 0 < state["written"] < 30
    assert shapes_pipeline(out).run().written == 30
    assert snapshot(out) == ref


def test_kill_between_shard_and_state_is_redone_not_duplicated(reference, tmp_path, monkeypatch):
    _, ref, _ = reference
    out = tmp_path / "out"
    real = pipeline_mod._atomic_json
    calls = []

    def flaky(path, data):
        calls.append(path)
        if len(calls) == 3:  # the third chunk's shard is on disk and indexed, its state is not
            raise Killed()
        real(path, data)

    monkeypatch.setattr(pipeline_mod, "_atomic_json", flaky)
    with pytest.raises(Killed):
        shapes_pipeline(out).run()
    monkeypatch.setattr(pipeline_mod, "_atomic_json", real)
    assert len(list(out.glob("*.tar"))) == 3 and len(json.loads((out / "synth_state.json").read_text())["shards"]) == 2
    shapes_pipeline(out).run()
    assert snapshot(out) == ref


def test_subprocess_killed_with_sigkill_resumes(reference, tmp_path):
    _, ref, _ = reference
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        torch.set_num_threads(1)
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_pipeline import shapes_pipeline
        pipe = shapes_pipeline({str(out)!r})
        real = pipe.make
        def make(index, **kw):
            if index >= 12:
                time.sleep(0.2)  # slow down so the parent can kill us mid-run
            return real(index, **kw)
        pipe.make = make
        pipe.run()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = out / "synth_state.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["next_chunk"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the child finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["written"] < 30
    shapes_pipeline(out).run()
    assert snapshot(out) == ref


class FlakyBackend(ShapesRuleBackend):
    """The rule backend, unreachable after ``up_for`` calls while ``down`` is set."""

    def __init__(self, *, up_for: int) -> None:
        super().__init__()
        self.up_for = up_for
        self.n = 0

    def answer(self, op, inputs, *, attempt, feedback):
        self.n += 1
        if self.n > self.up_for:
            raise BackendError("connection refused (fake)", stop_run=True)
        return super().answer(op, inputs, attempt=attempt, feedback=feedback)


def test_unreachable_backend_stops_without_committing_then_resumes(reference, tmp_path):
    _, ref, _ = reference
    out = tmp_path / "out"
    with pytest.raises(SynthAborted, match="rerun to resume"):
        shapes_pipeline(out, backend=FlakyBackend(up_for=120)).run()
    state = json.loads((out / "synth_state.json").read_text())
    assert 0 < len(state["shards"]) < len(ref["tars"])
    assert "backend_error" not in state["report"]["failures"]  # the aborted chunk left no trace
    shapes_pipeline(out).run()
    assert snapshot(out) == ref


def test_same_output_whatever_the_number_of_workers(reference, tmp_path):
    _, ref, _ = reference
    shapes_pipeline(tmp_path / "w3", workers=3).run()
    assert snapshot(tmp_path / "w3") == ref


def test_failures_are_recorded_and_the_run_goes_on(tmp_path):
    class Buggy:
        name = "buggy"

        def __call__(self, draft, ctx):
            if draft.index % 4 == 1:
                raise ZeroDivisionError("a bug in a user stage")
            return draft

    report = shapes_pipeline(tmp_path / "out", n=12, stages=[*stages(), Buggy()]).run()
    assert report.written == 12
    assert report.failures["error:buggy#0:ZeroDivisionError"] == report.attempted - 12 > 0
    assert "a bug in a user stage" in report.failure_examples["error:buggy#0:ZeroDivisionError"]
    ids = [s.dialogue.meta["index"] for s in read_samples(tmp_path / "out")]
    assert all(i % 4 != 1 for i in ids) and len(ids) == 12


def _real_pool(tmp_path):
    (tmp_path / "red.png").write_bytes(png_bytes((220, 20, 40)))
    (tmp_path / "blue.png").write_bytes(png_bytes((30, 70, 220)))
    t2i = write_jsonl(
        tmp_path / "t2i.jsonl",
        [{"caption": "a red square", "image": "red.png"}, {"caption": "a blue square", "image": "blue.png"}],
    )
    vqa = write_jsonl(tmp_path / "vqa.jsonl", [{"image": "red.png", "question": "Which colour?", "answer": "red"}])
    return DatasetPool(sources=[JsonlSource(path=t2i, kind="t2i"), JsonlSource(path=vqa, kind="vqa")])


def test_refusals_drop_only_the_dialogues_that_need_them(tmp_path):
    be = EchoBackend(refuse=frozenset({"query2dep_q"}))
    report = SynthPipeline(
        pool=_real_pool(tmp_path),
        backend=be,
        stages=[ChainStage(turns=[2, 2], follow_prob=1.0), DistractorStage(k=[0, 2])],
        output_dir=tmp_path / "out",
        num_dialogues=10,
        shard_size=5,
        max_attempts=2,
        report_png=False,
        progress=False,
    ).run()
    assert report.written == 10 and report.failures["query2dep_q:refusal"] > 0
    assert "I'm sorry" in report.failure_examples["query2dep_q:refusal"]
    for s in read_samples(tmp_path / "out"):  # survivors never needed a long-range rewrite
        assert all((t.meta.get("refers_to") or {}).get("distance", 0) == 0 for t in s.dialogue.turns)


def test_shared_cache_makes_a_rerun_free_and_identical(tmp_path):
    pool = _real_pool(tmp_path)
    cache = tmp_path / "llm.sqlite"

    def run(out, be):
        return SynthPipeline(
            pool=pool,
            backend=be,
            stages=[ChainStage(turns=[2, 3]), DistractorStage(k=[0, 1, 2]), InterleaveStage(p=1.0)],
            output_dir=out,
            num_dialogues=10,
            shard_size=4,
            workers=2,
            cache_path=cache,
            report_png=False,
            progress=False,
        ).run()

    first, second = EchoBackend(), EchoBackend()
    run(tmp_path / "a", first)
    run(tmp_path / "b", second)
    assert first.calls > 10 and second.calls == 0
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")


def test_meta_schema_round_trips_and_droppable_marks_image_replies(reference):
    _, snap, _ = reference
    for text, _ in snap["samples"]:
        d = json.loads(text)
        assert DialogueMeta.from_dict(d["meta"]).to_dict() == d["meta"]
        for u, a in zip(d["turns"][::2], d["turns"][1::2]):
            assert ExchangeMeta.from_dict(a["meta"]).to_dict() == a["meta"]
            assert u["meta"]["tags"] == a["meta"]["tags"]
            image_reply = any(s["type"] == "image" for s in a["segments"])
            assert all(s.get("droppable", False) == image_reply for s in u["segments"])
            assert not any(s.get("droppable", False) for s in a["segments"])


def test_changed_settings_refuse_to_resume(reference, tmp_path):
    out = tmp_path / "out"
    shapes_pipeline(out, n=8).run()
    with pytest.raises(RecipeError, match="other settings"):
        shapes_pipeline(out, n=8, seed=1).run()
    assert shapes_pipeline(out, n=16).run().written == 16  # asking for more extends the run


def test_shipped_recipe_validates_and_runs(tmp_path):
    overrides = [
        f"output_dir={tmp_path / 'out'}",
        "synth.num_dialogues=12",
        "synth.shard_size=6",
        "+synth.progress=false",
        "+synth.report_png=false",
    ]
    cfg = load_recipe("shapes/synth", overrides)
    validate_recipe(cfg)
    report = run_synth(cfg)
    assert report.written == 12 and len(list((tmp_path / "out").glob("shapes-*.tar"))) == 2
    bad = load_recipe("shapes/synth", [*overrides, "+synth.stages.0.turnz=3"])
    with pytest.raises(RecipeError, match="turnz"):
        validate_recipe(bad)
    with pytest.raises(RecipeError, match="missing"):
        run_synth({"seed": 0})
