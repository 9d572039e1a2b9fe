"""System turns in evaluated dialogues: an imported dialogue may hold system turns (instructions before a user turn,
SPEC §4.1); the replay enters them before the user turn they precede and never asks the model to answer them."""

from __future__ import annotations

import pytest
import torch

from chatumm_kit.data.dialogue import Dialogue, DialogueSample, Role
from chatumm_kit.eval.benchmark import DialogueReplay
from chatumm_kit.eval.metrics import TurnScore
from chatumm_kit.eval.turns import Reply, reference_turns


def _dialogue(turns, did="d0") -> DialogueSample:
    raw = {"id": did, "turns": [{"role": r, "segments": [{"type": "text", "text": t}]} for r, t in turns]}
    return DialogueSample(dialogue=Dialogue.from_dict(raw), images={})


class Recorder:
    """A responder that logs every call and answers each request with the text "ok"."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def start(self, dialogue_id: str) -> None:
        self.calls.append(("start", dialogue_id))

    def add_turn(self, role: Role, parts) -> None:
        self.calls.append((Role(role).value, *parts))

    def respond(self, *, seed: int) -> Reply:
        self.calls.append(("respond",))
        return Reply(parts=["ok"])

    def retract(self) -> None:
        self.calls.append(("retract",))


class Exact:
    """Success when the reply's text equals the reference's."""

    def score_many(self, requests):
        self.histories = [r.history for r in requests]
        return [
            TurnScore(dialogue_id=r.expected.dialogue_id, index=r.expected.index, task=r.expected.task,
                      distance=None, distractor=False, expected_output=r.expected.output,
                      predicted_output=r.reply.modality, intent=True, text_metric="chat",
                      text_correct=r.reply.text == r.expected.answer, caption_attr=None, image=None,
                      success=r.reply.text == r.expected.answer)
            for r in requests
        ]  # fmt: skip


def test_reference_turns_carry_the_system_turns_before_each_exchange():
    sample = _dialogue([("system", "Be brief."), ("system", "Use words."), ("user", "hi"), ("assistant", "ok"),
                        ("user", "colour?"), ("assistant", "red"), ("system", "Now in French."), ("user", "bye"),
                        ("assistant", "salut")])  # fmt: skip
    turns = reference_turns(sample)
    assert [t.system for t in turns] == [("Be brief.", "Use words."), (), ("Now in French.",)]
    assert [t.user for t in turns] == [["hi"], ["colour?"], ["bye"]]
    assert [t.answer for t in turns] == ["ok", "red", "salut"]


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([("user", "a"), ("user", "b"), ("assistant", "c")], "turn 0: the benchmark needs user/assistant exchanges"),
        ([("user", "a"), ("assistant", "b"), ("system", "c")], "ends with a system turn"),
        ([("user", "a")], "turn 0: the benchmark needs"),
    ],
)
def test_a_dialogue_that_is_not_exchanges_is_named(turns, message):
    with pytest.raises(ValueError, match=message):
        reference_turns(_dialogue(turns, did="bad"))


def test_replay_enters_system_turns_before_the_user_turn_and_in_the_history():
    sample = _dialogue([("system", "Be brief."), ("user", "hi"), ("assistant", "ok"), ("system", "Again."),
                        ("user", "more"), ("assistant", "fine")])  # fmt: skip
    scorer, responder = Exact(), Recorder()
    replay = DialogueReplay(expected=[reference_turns(sample)], scorer=scorer, batch_size=1)
    scores = replay.teacher_forced(responder)
    assert responder.calls == [
        ("start", "d0"), ("system", "Be brief."), ("user", "hi"), ("respond",), ("retract",), ("assistant", "ok"),
        ("system", "Again."), ("user", "more"), ("respond",),
    ]  # fmt: skip
    assert [s.success for s in scores] == [True, False]  # "ok" is right only for the first exchange
    assert scorer.histories[-1] == (
        (Role.SYSTEM, ("Be brief.",)), (Role.USER, ("hi",)), (Role.ASSISTANT, ("ok",)), (Role.SYSTEM, ("Again.",)),
    )  # fmt: skip


def test_replay_with_a_chat_session_keeps_the_system_turn_in_its_stream():
    """The real responder: a tiny chatumm model's session holds the system turn where the dialogue put it."""
    from chatumm_kit.components.tokenizer import ChatTokenizer
    from chatumm_kit.eval.responders import ChatSessionResponder, ReplySettings
    from chatumm_kit.inference.session import ChatSession, SessionConfig
    from chatumm_kit.presets import build_model

    texts = ["Answer in one word.", "what is it", "a circle"]
    tok = ChatTokenizer.train(texts * 5, vocab_size=300)
    torch.manual_seed(0)
    model = build_model({"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": tok.vocab_size}).eval()
    config = SessionConfig(vit_patch_size=8, vae_token_stride=8, max_image_side=32, image_size=(32, 32))
    session = ChatSession(model=model, tokenizer=tok, config=config)
    responder = ChatSessionResponder(session=session, settings=ReplySettings(max_new_tokens=3, max_segments=1))
    sample = _dialogue([("system", "Answer in one word."), ("user", "what is it"), ("assistant", "a circle")])
    DialogueReplay(expected=[reference_turns(sample)], scorer=Exact(), batch_size=1).teacher_forced(responder)
    turns = session.dialogue_sample().dialogue.turns
    assert [t.role for t in turns[:2]] == [Role.SYSTEM, Role.USER]
    assert turns[0].text == "Answer in one word." and turns[1].text == "what is it"
