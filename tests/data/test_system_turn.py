"""System turns and think text in the dialogue schema: JSON and shard round trips, the rules, and the packed stream
(a system turn is plain text — ``im_s`` + text + ``im_e``, no role prefix, SPEC §4.1 — and never a CE target)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import Dialogue, DialogueError, DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.packing import Packer
from chatumm_kit.data.shards import DialogueShardWriter, read_samples

TEXTS = ["draw a red circle", "what colour is it", "it is red", "answer briefly", "<think> plan </think>"]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.train(TEXTS * 5, vocab_size=300, user_prefix="User: ", assistant_prefix="Assistant: ")


def dialogue() -> Dialogue:
    return Dialogue(
        id="s0",
        turns=[
            Turn(role=Role.SYSTEM, segments=[TextSegment(text="answer briefly")]),
            Turn(role=Role.USER, segments=[TextSegment(text="draw a red circle")]),
            Turn(
                role=Role.ASSISTANT,
                segments=[TextSegment(text="<think> plan </think>", think=True), ImageSegment(image="out")],
            ),
            Turn(role=Role.SYSTEM, segments=[TextSegment(text="answer briefly")]),
            Turn(role=Role.USER, segments=[TextSegment(text="what colour is it")]),
            Turn(role=Role.ASSISTANT, segments=[TextSegment(text="it is red")]),
        ],
    )


def test_json_round_trip_keeps_system_turns_and_think_text() -> None:
    d = dialogue()
    raw = d.to_dict()
    assert raw["turns"][0] == {"role": "system", "segments": [{"type": "text", "text": "answer briefly"}]}
    assert raw["turns"][2]["segments"][0] == {"type": "text", "text": "<think> plan </think>", "think": True}
    assert "think" not in raw["turns"][5]["segments"][0]  # false is the default and is not written
    back = Dialogue.from_json(d.to_json())
    assert back == d and back.turns[0].role is Role.SYSTEM and back.turns[2].segments[0].think


@pytest.mark.parametrize(
    "turns, says",
    [
        ([(Role.SYSTEM, [ImageSegment("a")]), (Role.USER, [TextSegment("hi")])], "system turn holds text only"),
        ([(Role.SYSTEM, [TextSegment("s")]), (Role.ASSISTANT, [TextSegment("x")])], "cannot follow a system turn"),
        ([(Role.SYSTEM, [TextSegment("s")]), (Role.ASSISTANT, [TextSegment("x")])], "turn 1"),
        ([(Role.USER, [TextSegment("hi", think=True)])], "think text belongs to assistant turns"),
        ([(Role.SYSTEM, [TextSegment("s")]), (Role.USER, [TextSegment("hi")]), (Role.USER, [TextSegment("x")])], None),
    ],
)
def test_rules_name_the_turn(turns, says) -> None:
    d = Dialogue(id="bad", turns=[Turn(role=r, segments=s) for r, s in turns])
    if says is None:
        d.validate()  # a system turn first, then user turns: fine
        return
    with pytest.raises(DialogueError, match=says):
        d.validate()
    with pytest.raises(DialogueError, match=says):
        Dialogue.from_dict(d.to_dict())
    with pytest.raises(DialogueError, match="unknown role 'tool'"):
        Dialogue.from_dict({"id": "x", "turns": [{"role": "tool", "segments": [{"type": "text", "text": "a"}]}]})
    with pytest.raises(DialogueError, match="'think' must be true or false"):
        Dialogue.from_dict(
            {"id": "x", "turns": [{"role": "user", "segments": [{"type": "text", "text": "a", "think": "yes"}]}]}
        )


def test_shard_round_trip(tmp_path: Path) -> None:
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sample = DialogueSample(dialogue=dialogue(), images={"out": image})
    with DialogueShardWriter(directory=tmp_path) as writer:
        writer.write(sample)
    (back,) = read_samples(tmp_path)
    assert back.dialogue == sample.dialogue and torch.equal(back.images["out"], image)


def test_packed_stream_of_a_system_turn_is_plain_text_and_never_a_target(tok) -> None:
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sample = DialogueSample(dialogue=dialogue(), images={"out": image})
    batch = Packer(tokenizer=tok, vit_patch_size=8, vae_token_stride=8, max_image_side=16).pack([sample])
    ids = batch.input_ids.tolist()
    # Written out from SPEC §2–3: system text (no role prefix) → user text (prefix) → think text (assistant prefix)
    # → noised VAE, clean VAE, ViT views (2×2 tokens + markers each) → system text → user text → assistant text.
    s, e, vs, ve = tok.im_start_id, tok.im_end_id, tok.vision_start_id, tok.vision_end_id
    system = [s, *tok.encode("answer briefly"), e]
    user1 = [s, *tok.encode("User: draw a red circle"), e]
    think = [s, *tok.encode("Assistant: <think> plan </think>"), e]
    user2 = [s, *tok.encode("User: what colour is it"), e]
    answer = [s, *tok.encode("Assistant: it is red"), e]
    head = system + user1 + think
    view = 4 + 2
    n = len(head) + 3 * view + len(system) + len(user2) + len(answer)
    assert ids[: len(head)] == head
    assert ids[len(head)] == vs and ids[len(head) + view - 1] == ve
    assert ids[len(head) + 3 * view : n] == system + user2 + answer
    positions = batch.position_ids.tolist()
    # text +1 per token; the noised view shares the clean copy's position; each clean view advances by 1
    p_img = len(head)
    assert positions[: len(head)] == list(range(len(head)))
    assert set(positions[p_img : p_img + 2 * view]) == {p_img}
    assert set(positions[p_img + 2 * view : p_img + 3 * view]) == {p_img + 1}
    assert positions[len(head) + 3 * view] == p_img + 2
    # CE: no label inside either system turn; the user turns hand over to their replies as before
    ce = dict(zip(batch.ce_indices.tolist(), batch.ce_labels.tolist()))
    second_system = range(len(head) + 3 * view, len(head) + 3 * view + len(system))
    assert not any(i in ce for i in range(len(system))) and not any(i in ce for i in second_system)
    assert ce[len(system) + len(user1) - 1] == s  # user 1's last token → the reply opens a text (the think text)
    assert ce[len(head) - 1] == vs  # the think text's im_e → the image follows
    last_user = len(head) + 3 * view + len(system) + len(user2) - 1
    assert ce[last_user] == s
