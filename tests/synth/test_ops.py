"""Atomic operations: strict parsing, validation, retries and drops (SPEC §6: LLM output is data)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from chatumm_kit.synth.cache import AnswerCache
from chatumm_kit.synth.ops import (
    OPERATIONS,
    Caption2QueryIn,
    CaptionRequestIn,
    Edit2QueryIn,
    Image2QAIn,
    MakeDistractorIn,
    Operation,
    OpFailed,
    OpOutputError,
    QAOut,
    Query2DepQIn,
    QueryOut,
    Vqa2QueryIn,
    get_op,
    register_op,
)
from chatumm_kit.synth.records import ImageRef
from chatumm_kit.synth.runner import OpRunner

IMG = ImageRef.from_tensor(torch.zeros(3, 4, 4, dtype=torch.uint8))

# (op, inputs, a good raw answer, the parsed output)
GOOD = [
    (
        "caption2query",
        Caption2QueryIn(caption="a red circle in the top left"),
        '{"query": "Could you draw a red circle in the top left?"}',
        QueryOut("Could you draw a red circle in the top left?"),
    ),
    (
        "edit2query",
        Edit2QueryIn(instruction="make the cat black", context="previous"),
        '```json\n{"query": "Now make the cat black."}\n```',
        QueryOut("Now make the cat black."),
    ),
    (
        "vqa2query",
        Vqa2QueryIn(question="What colour is the bus?", answer="yellow"),
        '{"query": "What colour is the bus in this photo?"}',
        QueryOut("What colour is the bus in this photo?"),
    ),
    ("caption_request", CaptionRequestIn(), '{"query": "Describe this picture."}', QueryOut("Describe this picture.")),
    (
        "query2dep_q",
        Query2DepQIn(query="Make it night-time.", target="a cat on a sofa", others=("a red bicycle",), distance=3),
        '{"query": "Go back to the cat picture from the start and make it night-time."}',
        QueryOut("Go back to the cat picture from the start and make it night-time."),
    ),
    (
        "make_distractor",
        MakeDistractorIn(topic="cooking", avoid=("a cat on a sofa",)),
        '{"question": "How long should I boil an egg?", "answer": "About nine minutes."}',
        QAOut("How long should I boil an egg?", "About nine minutes."),
    ),
    (
        "image2qa",
        Image2QAIn(image=IMG, description="a black square"),
        '{"question": "What colour is the square?", "answer": "black"}',
        QAOut("What colour is the square?", "black"),
    ),
]


@pytest.mark.parametrize("name,inputs,raw,expected", GOOD, ids=[g[0] for g in GOOD])
def test_good_answers_parse_and_validate(name, inputs, raw, expected):
    assert get_op(name)(raw, inputs) == expected


@pytest.mark.parametrize(
    "raw,code",
    [
        ('{"query": "Draw a red circle."', "malformed_json"),  # truncated
        ("Sure! Here it is: Draw a red circle.", "malformed_json"),  # prose, no JSON
        ('["Draw a red circle."]', "malformed_json"),  # not an object
        ('{"prompt": "Draw a red circle."}', "missing_field"),
        ('{"query": 3}', "wrong_type"),
        ('{"query": "Draw a red circle.", "note": "ok"}', "unexpected_field"),
        ("I'm sorry, but I can't help with that request.", "refusal"),
        ('{"query": "I cannot create images of that."}', "refusal"),
        ('{"query": ""}', "invalid"),
        ('{"query": "Draw {caption}."}', "invalid"),  # template slot left unfilled
    ],
)
def test_bad_answers_are_rejected_with_a_code(raw, code):
    op = get_op("caption2query")
    with pytest.raises(OpOutputError) as e:
        op(raw, Caption2QueryIn(caption="a red circle"))
    assert e.value.code == code


@pytest.mark.parametrize(
    "name,inputs,raw,code",
    [
        (
            "caption2query",
            Caption2QueryIn(caption="a red circle on a blue square"),
            '{"query": "Draw a dog."}',
            "invalid",
        ),
        (
            "edit2query",
            Edit2QueryIn(instruction="make the cat black", context="uploaded"),
            '{"query": "Make the sky pink."}',
            "invalid",
        ),
        (
            "vqa2query",
            Vqa2QueryIn(question="What colour is the bus?", answer="yellow"),
            '{"query": "Is the bus yellow?"}',
            "leaks_answer",
        ),
        (  # names the bicycle (another picture) instead of the cat
            "query2dep_q",
            Query2DepQIn(query="Make it night-time.", target="a cat on a sofa", others=("a red bicycle",)),
            '{"query": "Go back to the red bicycle and make it night-time."}',
            "wrong_reference",
        ),
        (  # names nothing
            "query2dep_q",
            Query2DepQIn(query="Make it night-time.", target="a cat on a sofa", others=("a red bicycle",)),
            '{"query": "Go back to the earlier one and make it night-time."}',
            "invalid",
        ),
        (  # unchanged
            "query2dep_q",
            Query2DepQIn(query="Make it night-time.", target="a cat on a sofa"),
            '{"query": "Make it night-time!"}',
            "invalid",
        ),
        (
            "make_distractor",
            MakeDistractorIn(topic="animals", avoid=("a cat on a sofa",)),
            '{"question": "Do cats sleep a lot?", "answer": "Yes."}',
            "invalid",
        ),
        ("image2qa", Image2QAIn(image=IMG), '{"question": "Describe the colour.", "answer": "black"}', "invalid"),
        (
            "image2qa",
            Image2QAIn(image=IMG),
            json.dumps({"question": "What is it?", "answer": " ".join(["word"] * 40)}),
            "invalid",
        ),
    ],
)
def test_validators_reject_wrong_content(name, inputs, raw, code):
    with pytest.raises(OpOutputError) as e:
        get_op(name)(raw, inputs)
    assert e.value.code == code


class Scripted:
    """Returns scripted answers in order; records the feedback each call received."""

    model_id = "scripted"

    def __init__(self, answers):
        self.answers = list(answers)
        self.feedback = []

    def answer(self, op, inputs, *, attempt, feedback):
        self.feedback.append((attempt, [m.text for m in feedback]))
        return self.answers.pop(0)


def test_runner_retries_with_feedback_then_succeeds():
    backend = Scripted(['{"query": oops', "I'm sorry, I can't.", '{"query": "Could you draw a red circle?"}'])
    runner = OpRunner(backend=backend, max_attempts=3)
    out = runner.run("caption2query", Caption2QueryIn(caption="a red circle"))
    assert out.query == "Could you draw a red circle?"
    assert runner.stats.retries == 2 and runner.stats.calls == 3
    assert runner.stats.rejected == {"caption2query:malformed_json": 1, "caption2query:refusal": 1}
    # the second call saw the first bad answer and why it was rejected
    attempt, fb = backend.feedback[1]
    assert attempt == 1 and fb[0] == '{"query": oops' and "malformed_json" in fb[1]


def test_runner_drops_after_max_attempts_with_reason():
    runner = OpRunner(backend=Scripted(["I'm sorry, I can't."] * 2), max_attempts=2)
    with pytest.raises(OpFailed) as e:
        runner.run("caption2query", Caption2QueryIn(caption="a red circle"))
    assert e.value.reason == "caption2query:refusal" and len(e.value.errors) == 2
    assert runner.stats.failed == {"caption2query:refusal": 1}


def test_cache_replays_accepted_answers_and_asks_again_for_rejected_ones(tmp_path):
    answers = ['{"query": 1}', '{"query": "Draw a red circle."}']
    cache = AnswerCache(path=tmp_path / "c.sqlite")
    first = OpRunner(backend=Scripted(answers), cache=cache).run(
        "caption2query", Caption2QueryIn(caption="a red circle")
    )
    cache.close()
    # attempt 0 was rejected: it is asked again (the endpoint may be fixed now); attempt 1 was accepted: it replays
    replay_backend = Scripted(['{"query": "Please draw a red circle."}'])  # raises IndexError on a second call
    cache2 = AnswerCache(path=tmp_path / "c.sqlite")
    runner = OpRunner(backend=replay_backend, cache=cache2)
    again = runner.run("caption2query", Caption2QueryIn(caption="a red circle"))
    assert again.query == "Please draw a red circle." != first.query
    assert runner.stats.calls == 1 and runner.stats.cache_hits == 0
    third = OpRunner(backend=Scripted([]), cache=cache2)
    assert third.run("caption2query", Caption2QueryIn(caption="a red circle")) == again
    assert third.stats.calls == 0 and third.stats.cache_hits == 1
    # a different model does not see those answers
    other = Scripted(['{"query": "Paint a red circle."}'])
    other.model_id = "other-model"
    assert OpRunner(backend=other, cache=cache2).run(
        "caption2query", Caption2QueryIn(caption="a red circle")
    ).query == ("Paint a red circle.")


def test_registry_accepts_user_ops_and_refuses_silent_replacement():
    @dataclass(frozen=True)
    class ShoutIn:
        text: str

    class Shout(Operation):
        name = "shout_test"
        input_type = ShoutIn
        instruction = "Repeat in capitals: {text}"

        def validate(self, inputs, output):
            if output.query != inputs.text.upper():
                raise OpOutputError("invalid", "not the text in capitals")

    register_op(Shout())
    try:
        with pytest.raises(ValueError, match="exists"):
            register_op(Shout())
        assert "Repeat in capitals: hi" in Shout().messages(ShoutIn("hi"))[1].text
        runner = OpRunner(backend=Scripted(['{"query": "hi"}', '{"query": "HI"}']))
        assert runner.run("shout_test", ShoutIn("hi")).query == "HI"
        with pytest.raises(TypeError, match="ShoutIn"):
            runner.run("shout_test", Caption2QueryIn(caption="x"))
    finally:
        OPERATIONS.pop("shout_test")
    with pytest.raises(KeyError, match="unknown operation"):
        get_op("shout_test")


def test_prompt_carries_the_image_for_image2qa():
    msgs = get_op("image2qa").messages(Image2QAIn(image=IMG, description="a black square"))
    assert msgs[0].role == "system" and msgs[1].content[0] is IMG and "a black square" in msgs[1].text
