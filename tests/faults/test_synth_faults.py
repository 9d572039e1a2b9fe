"""Synthesis on bad input: an endpoint that answers garbage and is then fixed, source rows that are skipped (and say
so), 16-bit pictures, a run that writes nothing, and ``query2dep_q`` on pictures nobody captioned."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from _llm_server import LoopbackLLM
from PIL import Image

from chatumm_kit.cli import main
from chatumm_kit.data.shards import read_samples
from chatumm_kit.synth import JsonlSource, OpenAIChatBackend
from chatumm_kit.synth.cache import AnswerCache
from chatumm_kit.synth.ops import Caption2QueryIn, OpFailed, Query2DepQIn
from chatumm_kit.synth.records import ImageRef
from chatumm_kit.synth.runner import OpRunner

CAPTIONS = ["a red kite", "a blue boat", "a green tree", "a white cat", "a black dog", "an orange sun", "a grey owl",
            "a pink rose"]  # fmt: skip


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_t2i(folder: Path, *, bad_rows: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        (folder / f"{i}.png").write_bytes(_png(Image.new("RGB", (16, 16), (i * 30, 0, 0))))
        rows.append(json.dumps({"caption": caption, "image": f"{i}.png"}))
    if bad_rows:
        (folder / "notes.png").write_text("not a picture")
        rows += [
            "{not json",
            json.dumps({"caption": "a lost picture", "image": "missing.png"}),
            json.dumps({"caption": "a text file", "image": "notes.png"}),
            json.dumps({"image": "0.png"}),
        ]
    path = folder / "t2i.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def write_recipe(path: Path, *, out: Path, jsonl: Path, url: str, max_candidates: int = 8) -> Path:
    path.write_text(f"""\
seed: 0
output_dir: {out}
synth:
  _component_: chatumm_kit.synth.SynthPipeline
  output_dir: ${{output_dir}}
  num_dialogues: 8
  shard_size: 8
  max_candidates: {max_candidates}
  report_png: false
  progress: false
  pool:
    _component_: chatumm_kit.synth.DatasetPool
    sources:
      - {{_component_: chatumm_kit.synth.JsonlSource, path: "{jsonl}", kind: t2i}}
  backend: {{_component_: chatumm_kit.synth.OpenAIChatBackend, model: m, base_url: "{url}", max_retries: 0}}
  stages:
    - {{_component_: chatumm_kit.synth.ChainStage, turns: [1, 1]}}
""")
    return path


def test_garbage_from_a_broken_endpoint_is_not_replayed_after_the_fix(tmp_path, capsys) -> None:
    jsonl = write_t2i(tmp_path / "data")
    out = tmp_path / "synth"
    # Broken: two good answers, then garbage (3 tries for the third dialogue), then the server goes down.
    with LoopbackLLM(plan=["ok", "ok", "garbage", "garbage", "garbage"], default="down") as llm:
        recipe = write_recipe(tmp_path / "synth.yaml", out=out, jsonl=jsonl, url=llm.url)
        assert main(["synth", str(recipe)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: the backend failed") and "rerun to resume" in err[0], err
        with sqlite3.connect(out / "llm_cache.sqlite") as db:
            assert db.execute("SELECT valid, COUNT(*) FROM answers GROUP BY valid").fetchall() == [(0, 3), (1, 2)]
        llm.default = "ok"  # the same endpoint, fixed
        before = len(llm.requests)
        assert main(["synth", str(recipe)]) == 0
        asked = len(llm.requests) - before
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == 8 and len(list(read_samples(out))) == 8  # max_candidates=8: no dialogue was lost
    # one caption2query per dialogue: each was asked (garbage included: asked again) or replayed (the 2 accepted ones
    # and repeats of a caption drawn twice)
    llm_answers = report["llm_answers"]
    assert llm_answers["asked"] == asked and llm_answers["asked"] + llm_answers["from_cache"] == 8
    assert llm_answers["from_cache"] >= 2
    assert f"LLM answers: {asked} asked, {llm_answers['from_cache']} from the cache" in capsys.readouterr().out


def test_accepted_answers_replay_per_endpoint_and_the_report_counts_them(tmp_path) -> None:
    cache_file = tmp_path / "llm.sqlite"
    with LoopbackLLM() as a, LoopbackLLM() as b:
        runs = []
        for server in (a, a, b):
            cache = AnswerCache(path=cache_file)
            runner = OpRunner(backend=OpenAIChatBackend(model="m", base_url=server.url, max_retries=0), cache=cache)
            runs.append([runner.run("caption2query", Caption2QueryIn(caption=c)).query for c in CAPTIONS[:3]])
            cache.close()
            runs[-1].append((runner.stats.calls, runner.stats.cache_hits))
    assert runs[0][3] == (3, 0)  # asked
    assert runs[1][3] == (0, 3) and runs[1][:3] == runs[0][:3]  # replayed from the cache
    assert runs[2][3] == (3, 0)  # another endpoint: its own answers
    cache = AnswerCache(path=cache_file, max_answer_chars=10)
    assert cache.put("k", "x" * 11) is False and cache.get("k") is None  # over the size cap: not stored


def test_a_synth_that_writes_nothing_exits_non_zero_with_one_line(tmp_path, capsys) -> None:
    jsonl = write_t2i(tmp_path / "data")
    with LoopbackLLM(default="garbage") as llm:
        recipe = write_recipe(tmp_path / "synth.yaml", out=tmp_path / "synth", jsonl=jsonl, url=llm.url)
        assert main(["synth", str(recipe)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "synth wrote 0 dialogues (8 dropped: caption2query:malformed_json 8)" in err[0], err


def test_jsonl_skips_reach_the_log_and_the_report(tmp_path, capsys, caplog) -> None:
    jsonl = write_t2i(tmp_path / "data", bad_rows=True)
    with LoopbackLLM() as llm:
        recipe = write_recipe(tmp_path / "synth.yaml", out=tmp_path / "synth", jsonl=jsonl, url=llm.url)
        assert main(["synth", str(recipe)]) == 0
    report = json.loads((tmp_path / "synth" / "report.json").read_text())
    want = {"malformed_json": 1, "missing_field": 1, "missing_image": 1, "corrupt_image": 1}
    assert report["source_skips"] == want and report["written"] == 8
    assert any("t2i.jsonl:9" in e and "malformed JSON" in e for e in report["source_skip_examples"])
    assert "skipped 4 source row(s)" in caplog.text
    assert "source rows skipped" in capsys.readouterr().out


def test_a_16_bit_png_through_jsonl_source_keeps_its_grey(tmp_path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    grey = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # mid grey, 16 bits (mode I;16)
    (folder / "g.png").write_bytes(_png(grey))
    (folder / "t.jsonl").write_text(json.dumps({"caption": "a grey square", "image": "g.png"}) + "\n")
    (record,) = list(JsonlSource(path=folder / "t.jsonl", kind="t2i"))
    pixels = record.image.tensor()
    assert pixels.shape == (3, 8, 8) and int(pixels.min()) == int(pixels.max()) == 128  # not 255 (all white)


def test_query2dep_q_shows_an_uncaptioned_picture_and_refuses_internal_keys(tmp_path) -> None:
    flower = ImageRef.from_bytes(_png(Image.new("RGB", (8, 8), (250, 220, 0))))
    inputs = Query2DepQIn(query="What colour is it?", target="", distance=2, target_image=flower)
    with LoopbackLLM() as llm:
        runner = OpRunner(backend=OpenAIChatBackend(model="m", base_url=llm.url, max_retries=0))
        out = runner.run("query2dep_q", inputs)
        content = llm.requests[0]["messages"][1]["content"]
    assert out.query.startswith("Back to the photo of the yellow flower")
    assert content[0]["type"] == "image_url" and content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "img" not in content[1]["text"].replace("image", "") and "attached image" in content[1]["text"]

    class SaysKey:
        model_id = "k"

        def answer(self, op, inputs, *, attempt, feedback):
            return json.dumps({"query": "Go back to img1: what colour is it?"})

    with pytest.raises(OpFailed) as e:
        OpRunner(backend=SaysKey()).run("query2dep_q", inputs)
    assert "internal id ('img1')" in str(e.value)
