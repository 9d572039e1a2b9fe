"""The judge: versioned prompts as data, strict verdict parsing, and the synthesis backend's transport against loopback
judges that answer well, answer garbage, time out and return 500s (all bounded: tiny timeouts, few retries)."""

import pytest
import torch

from chatumm_kit.eval import Judge, JudgePrompt
from chatumm_kit.eval.judge import as_messages, judge_picture
from chatumm_kit.eval.loopback import LoopbackJudgeServer
from chatumm_kit.synth import OpenAIChatBackend
from chatumm_kit.synth.cache import AnswerCache
from chatumm_kit.synth.ops import OpOutputError


def backend(server, **kw):
    args = dict(model="loopback", base_url=server.base_url, timeout_s=2.0, max_retries=1, backoff_s=0.01,
                max_backoff_s=0.02, temperature=0.0)  # fmt: skip
    args.update(kw)
    return OpenAIChatBackend(**args)


def t2i_content(judge, prompt_text, colour=0):
    p = judge.prompt("t2i_adherence")
    picture = torch.full((3, 8, 8), colour, dtype=torch.uint8)
    return p.render({"prompt": prompt_text, "image": ["\n", judge_picture(picture)]})


def test_prompts_are_versioned_data_and_parsing_is_strict(tmp_path):
    p = JudgePrompt.load("gedit")
    assert p.label == "gedit@1" and p.scores == {"semantic_consistency": (0, 10), "perceptual_quality": (0, 10)}
    assert p.slots == ["source", "instruction", "edited"] and len(p.digest) == 16
    assert JudgePrompt.load("reply_quality").slots == ["history", "user", "reference", "candidate"]
    ok = p.parse('```json\n{"semantic_consistency": 7, "perceptual_quality": 0, "reason": " fine "}\n```')
    assert ok.scores == {"semantic_consistency": 7, "perceptual_quality": 0} and ok.reason == "fine"
    bad = {
        "Score: 7": "malformed_json",
        '{"semantic_consistency": 7.5, "perceptual_quality": 1, "reason": "x"}': "wrong_type",
        '{"semantic_consistency": "7", "perceptual_quality": 1, "reason": "x"}': "wrong_type",
        '{"semantic_consistency": true, "perceptual_quality": 1, "reason": "x"}': "wrong_type",
        '{"semantic_consistency": 11, "perceptual_quality": 1, "reason": "x"}': "out_of_range",
        '{"semantic_consistency": 7, "reason": "x"}': "missing_field",
        '{"semantic_consistency": 7, "perceptual_quality": 1, "reason": "x", "overall": 3}': "unexpected_field",
        '{"semantic_consistency": 7, "perceptual_quality": 1, "reason": ""}': "wrong_type",
        'Sure! {"semantic_consistency": 7, "perceptual_quality": 1, "reason": "x"}': "malformed_json",
    }
    for text, code in bad.items():
        with pytest.raises(OpOutputError) as err:
            p.parse(text)
        assert err.value.code == code, text
    # a changed prompt file is a different prompt: its digest (part of the cache key) changes
    own = tmp_path / "mine.yaml"
    own.write_text("name: mine\nversion: 2\nsystem: s\ntemplate: 'Rate {x}'\nscores: {score: [1, 5]}\n")
    a = JudgePrompt.load(own)
    own.write_text("name: mine\nversion: 2\nsystem: s\ntemplate: 'Rate this {x}'\nscores: {score: [1, 5]}\n")
    assert JudgePrompt.load(own).digest != a.digest and a.render({"x": "it"}) == ("Rate it",)
    with pytest.raises(FileNotFoundError, match="packaged prompts: .*gedit"):
        JudgePrompt.load("nonexistent")
    with pytest.raises(KeyError, match="missing slots"):
        a.render({})


def test_verdicts_are_cached_and_sent_with_pictures_as_data_urls(tmp_path):
    with LoopbackJudgeServer() as server:
        judge = Judge(backend=backend(server), cache=tmp_path / "cache.sqlite", max_concurrency=4)
        contents = [t2i_content(judge, "a red circle", 1), t2i_content(judge, "two blue squares", 2)]
        verdicts = judge.verdicts("t2i_adherence", contents)
        assert [v.scores for v in verdicts] == [{"score": len("a red circle") % 11}, {"score": 16 % 11}]
        assert verdicts[0].prompt == "t2i_adherence@1" and verdicts[0].reason == "prompt of 12 characters"
        assert server.hits == 2
        again = Judge(backend=backend(server), cache=tmp_path / "cache.sqlite")
        assert again.verdicts("t2i_adherence", contents) == verdicts and server.hits == 2  # from the cache
        # a different picture is a different question
        again.verdicts("t2i_adherence", [t2i_content(again, "a red circle", 3)])
        assert server.hits == 3
    payload = backend(server).payload(as_messages(judge.prompt("t2i_adherence"), contents[0]))
    parts = payload["messages"][1]["content"]
    assert any(p["type"] == "image_url" and p["image_url"]["url"].startswith("data:image/png;base64,") for p in parts)


def test_garbage_is_recorded_never_guessed(tmp_path):
    cache = AnswerCache(path=tmp_path / "c.sqlite")
    with LoopbackJudgeServer(mode="garbage") as server:
        judge = Judge(backend=backend(server), cache=cache, max_attempts=2)
        (v,) = judge.verdicts("t2i_adherence", [t2i_content(judge, "a red circle")])
        assert v.scores is None and v.reason is None and v.error == "unparseable:malformed_json"
        assert len(v.attempts) == 2 and all("malformed_json" in a for a in v.attempts)
        assert v.raw == "Honestly I'd rate this one a solid 7/10, nice work!"  # not read as a 7
        assert server.hits == 2 and len(cache) == 2  # both raw answers kept, marked rejected
        (again,) = judge.verdicts("t2i_adherence", [t2i_content(judge, "a red circle")])
        assert server.hits == 4 and again == v  # rejected answers are not replayed: a rerun asks the judge again


def test_500s_and_timeouts_become_recorded_backend_errors_and_are_retried_next_time(tmp_path):
    with LoopbackJudgeServer(mode="error") as server:
        judge = Judge(backend=backend(server), cache=tmp_path / "c.sqlite")
        (v,) = judge.verdicts("t2i_adherence", [t2i_content(judge, "x")])
        assert v.scores is None and v.error.startswith("backend: gave up after 2 tries: HTTP 500")
        assert server.hits == 2  # the first try and one retry, then it stops
        judge.verdicts("t2i_adherence", [t2i_content(judge, "x")])
        assert server.hits == 4  # a transport failure is not an answer: not cached, asked again
    with LoopbackJudgeServer(mode="slow", slow_s=1.0) as server:
        b = backend(server, timeout_s=0.2, max_retries=0)
        judge = Judge(backend=b)
        (v,) = judge.verdicts("t2i_adherence", [t2i_content(judge, "x")])
        assert v.error.startswith("backend: ") and "timed out" in v.error and b.stats.timeouts == 1


def test_the_shipped_suite_recipe_validates():
    from chatumm_kit.cli import main

    assert main(["validate", "eval/local_benchmarks"]) == 0
