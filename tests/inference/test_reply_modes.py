"""Task modes of `ChatSession.respond` (SPEC §4.1): the forced markers, the reply's stream in all three contexts
(checked against one packed forward of the dialogue, SPEC §2–3), output sizes, and `respond_batch` with modes."""

# ruff: noqa: F811  (pytest fixtures imported from test_session)
from __future__ import annotations

import pytest
import torch
from test_session import (  # noqa: F401, F811  (fixtures)
    FAST,
    IMAGE_UNCOND,
    NO_DROP,
    TEXT_UNCOND,
    assert_same_cache,
    dialogue,
    image,
    model,
    new_session,
    packed_run,
    packer,
    steer,
    tok,
)

from chatumm_kit.data.dialogue import ImageSegment, Role, TextSegment
from chatumm_kit.inference.batch import respond_batch


def _assert_contexts_match_packing(s, turns, images):
    """full / text-unconditional / image-unconditional == the packer's stream with CFG dropout forced (SPEC §4, §4.1:
    text-uncond drops the trailing user text, image-uncond the trailing user block's image views — none here). A next
    user turn is added first, so that positions show in its tokens."""
    s.add_user("it is red")
    turns = [*turns, (Role.USER, [TextSegment("it is red")])]
    user_turn = len(turns) - 1
    for drop, kwargs, name in [
        (NO_DROP, {}, "full"),
        (TEXT_UNCOND, {"drop_text_of": {user_turn}}, "text_uncond"),
        (IMAGE_UNCOND, {}, "image_uncond"),
    ]:
        cache, out, position = packed_run(s.model, packer(s.tokenizer, drop), dialogue(turns, images, **kwargs))
        ctx = getattr(s.contexts, name)
        assert_same_cache(ctx.cache, cache)
        assert ctx.position == position, name


def test_text_mode_forces_im_start_and_ends_after_one_segment(model, tok):
    s = new_session(model, tok)
    s.add_user("what colour is it", images=[image(1)])
    it, red = tok.encode("it")[0], tok.encode("red")[0]
    with steer(model, [it, red, tok.im_end_id, tok.vision_start_id]) as calls:
        reply = s.respond(mode="text", sampler=FAST)
    assert reply.intents == ["text", "end"] and reply.finished and not reply.images
    assert reply.segments == [TextSegment(text=tok.decode([it, red]))]
    # No intent was predicted (auto would have spent a head call before "it" and after im_e): the head ran only
    # for the two tokens and im_e, and the v_s the model would have chosen next never came.
    assert len(calls) == 3
    turns = [(Role.USER, [ImageSegment("a"), TextSegment("what colour is it")]), (Role.ASSISTANT, reply.segments)]
    assert s.dialogue.turns[-1].segments == reply.segments
    _assert_contexts_match_packing(s, turns, {"a": image(1)})


@pytest.mark.parametrize("mode", ["image", "edit"])
def test_image_and_edit_modes_force_vision_start_and_size_the_output(model, tok, mode):
    s = new_session(model, tok)
    edited = torch.randint(0, 256, (3, 24, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    s.add_user("make it blue", images=[edited])
    session_rule = s.reply_image_size()
    with steer(model, [tok.im_start_id]) as calls:  # the model would answer with text
        reply = s.respond(mode=mode, sampler=FAST)
    assert calls == []  # the opening marker was forced, nothing was predicted
    assert reply.intents == ["image", "end"] and reply.finished
    # edit: the edited image's VAE view size (24×16); image: the session's sizing rule
    assert tuple(reply.images[0].shape) == ((3, 24, 16) if mode == "edit" else (3, *session_rule))
    key = reply.image_keys[0]
    turns = [(Role.USER, [ImageSegment("a"), TextSegment("make it blue")]), (Role.ASSISTANT, [ImageSegment(key)])]
    _assert_contexts_match_packing(s, turns, {"a": edited, key: reply.images[0]})


def test_explicit_image_size_and_bad_modes(model, tok):
    s = new_session(model, tok)
    s.add_user("draw a red circle")
    with pytest.raises(ValueError, match="has no image to edit"):
        s.respond(mode="edit", sampler=FAST)
    with pytest.raises(ValueError, match="mode must be one of"):
        s.respond(mode="picture")
    with pytest.raises(ValueError, match="image_size must be two integers"):
        s.respond(mode="image", image_size=(0, 8))
    assert s.num_turns == 1  # nothing was added by the failed calls
    reply = s.respond(mode="image", image_size=(16, 24), sampler=FAST)
    assert tuple(reply.images[0].shape) == (3, 16, 24)
    assert s.contexts.full.position == s.contexts.image_uncond.position


def test_respond_batch_modes_equal_one_by_one(model, tok):
    def sessions():
        out = []
        for text in ("what colour is it", "draw a red circle"):
            s = new_session(model, tok)
            s.add_user(text, images=[image(1)])
            out.append(s)
        return out

    alone = [s.respond(mode=m, max_new_tokens=3, sampler=FAST) for s, m in zip(sessions(), ["text", "edit"])]
    together = respond_batch(sessions(), modes=["text", "edit"], max_new_tokens=3, samplers=FAST)
    assert [r.intents for r in together] == [r.intents for r in alone] == [["text", "end"], ["image", "end"]]
    assert together[0].text == alone[0].text
    assert (together[1].images[0].int() - alone[1].images[0].int()).abs().max() <= 2
    with pytest.raises(ValueError, match="1 modes for 2 sessions"):
        respond_batch(sessions(), modes=["text"])
