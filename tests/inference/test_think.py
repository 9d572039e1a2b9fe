"""Think mode and system turns of `ChatSession` on a tiny BAGEL-format release (SPEC §4.1).

The references are written out here from SPEC §2–4.1 and BAGEL's published behaviour, not taken from the session: the
token ids of each context (system prompt, request, reasoning) are spelled by hand and run through the backbone as one
plain causal sequence, with the positions SPEC §3 gives (text +1 per token, an image view shares one position and a
dropped one still advances by 1). What BAGEL's inferencer does with think on: its system prompt goes before the
request (into the full and the image-unconditional context, and into the text-unconditional one, which is the context
before the trailing text), the reasoning is decoded and put into the full context only, and then the image is sampled
with those three contexts.
"""

# ruff: noqa: F811
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch
from test_session import assert_same_cache, dialogue, packed_run, steer

from _tiny_bagel import make_tiny_bagel
from chatumm_kit.convert.bagel import load_bagel
from chatumm_kit.data.dialogue import Dialogue, ImageSegment, Role, TextSegment
from chatumm_kit.data.packing import CFGDropRates, Packer
from chatumm_kit.inference.batch import respond_batch
from chatumm_kit.inference.chat_loop import interactive
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.session import ChatSession, SessionConfig
from chatumm_kit.inference.steps import VelocityStep, drive, run_alone
from chatumm_kit.inference.think import BAGEL_THINK_IMAGE_PROMPT, BAGEL_THINK_TEXT_PROMPT

FAST = SamplerConfig(num_steps=2, seed=0)
SIDE = 16  # the tiny release's images: 4×4 ViT patches, 4×4 VAE tokens
VIEW = 16 + 2


@pytest.fixture(scope="module")
def bagel(tmp_path_factory):
    tiny = make_tiny_bagel(tmp_path_factory.mktemp("think") / "release")
    loaded = load_bagel(tiny.folder, attn_backend="sdpa")
    return loaded.model.eval(), loaded.tokenizer


@pytest.fixture(scope="module")
def model(bagel):
    return bagel[0]


@pytest.fixture(scope="module")
def tok(bagel):
    return bagel[1]


def new_session(model, tok, **kwargs) -> ChatSession:
    return ChatSession(model=model, tokenizer=tok, config=SessionConfig.for_model(model, image_size=SIDE), **kwargs)


def picture(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def text(tok, s: str) -> list[int]:
    """A text segment as SPEC §2 lays it out (the tiny release's tokenizer has no role prefixes)."""
    return [tok.im_start_id, *tok.encode(s), tok.im_end_id]


@torch.no_grad()
def text_cache(model, ids: list[int], positions: list[int]):
    """The KV cache of a text-only stream: one causal pass of the understanding expert at ``positions``."""
    n = len(ids)
    cache = model.new_kv_cache()
    model.backbone(
        model.embed_text(torch.tensor(ids)),
        position_ids=torch.tensor(positions),
        und_indices=torch.arange(n),
        gen_indices=torch.zeros(0, dtype=torch.long),
        attn_mask=torch.ones(n, n, dtype=torch.bool).tril(),
        kv_cache=cache,
        commit=True,
    )
    return cache


class Frozen:
    """A copy of a context's cache and position at one moment."""

    def __init__(self, ctx) -> None:
        self.position, self.num_tokens, self.num_layers = ctx.position, ctx.num_tokens, ctx.cache.num_layers
        self._k = [ctx.cache.keys(i).clone() for i in range(self.num_layers)]
        self._v = [ctx.cache.values(i).clone() for i in range(self.num_layers)]

    def keys(self, i):
        return self._k[i]

    def values(self, i):
        return self._v[i]


def think_reply(session, mode: str, **kwargs):
    """Run a reply, keeping a frozen copy of its three CFG contexts at the first Euler step."""
    seen: dict[str, Frozen] = {}

    def answer(step):
        if isinstance(step, VelocityStep) and not seen:
            seen.update(full=Frozen(step.full))
            seen.update(text_uncond=Frozen(step.text_uncond or step.full))
            seen.update(image_uncond=Frozen(step.image_uncond or step.full))
        return run_alone(session.runner, step)

    return drive(session.reply_steps(mode=mode, sampler=FAST, **kwargs), answer), seen


def tiny_packer(tok, drop: CFGDropRates | None = None) -> Packer:
    drop = drop or CFGDropRates.disabled()
    return Packer(tokenizer=tok, vit_patch_size=4, vae_token_stride=4, max_image_side=SIDE, drop_rates=drop)


# ---------------------------------------------------------------------------------------------- system turns
def test_system_prompt_enters_as_plain_text_before_the_request(model, tok):
    s = new_session(model, tok, system="answer briefly")
    s.add_user("what colour is it")
    system, user = text(tok, "answer briefly"), text(tok, "what colour is it")
    ids = system + user
    assert_same_cache(s.contexts.full.cache, text_cache(model, ids, list(range(len(ids)))))
    assert s.position == len(ids)
    # text-unconditional: the context before the trailing user text — the system prompt stays (SPEC §4.1)
    assert_same_cache(s.contexts.text_uncond.cache, text_cache(model, system, list(range(len(system)))))
    assert s.contexts.text_uncond.position == len(system)
    assert s.contexts.image_uncond is s.contexts.full  # no image: shared
    assert [t.role for t in s.dialogue.turns] == [Role.SYSTEM, Role.USER]
    assert s.dialogue_sample().dialogue.turns[0].segments == [TextSegment(text="answer briefly")]


def test_system_turn_rules(model, tok):
    s = new_session(model, tok)
    with pytest.raises(ValueError, match="must start with a user turn"):
        s.add_assistant("it is red")
    s.add_system("answer briefly")
    with pytest.raises(ValueError, match="must start with a user turn"):
        s.add_assistant("it is red")
    with pytest.raises(ValueError, match="holds text only"):
        s.add_turn(Role.SYSTEM, [picture(0)])
    s.add_user("what colour is it")
    with pytest.raises(ValueError, match="not inside a user block"):
        s.add_system("and be kind")
    assert s.num_turns == 2
    s.add_assistant("it is red")
    assert s.add_system("now draw") == 3  # after an assistant turn: fine
    with pytest.raises(ValueError, match="cannot follow a system turn"):
        s.add_assistant("it is red")


# ---------------------------------------------------------------------------------------------- think → image
def test_think_image_stream_and_cfg_contexts_follow_bagel(model, tok):
    s = new_session(model, tok)
    s.add_user("draw a red circle")
    reasoning = tok.encode("<think> red </think>")
    with steer(model, [*reasoning, tok.encode("blue")[0]]) as calls:
        reply, seen = think_reply(s, "think_image")
    # decoding stopped at `</think>` (the steered "blue" after it was never asked for)
    assert len(calls) == len(reasoning)
    assert reply.intents == ["text", "image", "end"] and reply.finished
    assert reply.think == "<think> red </think>" and reply.text == "" and len(reply.images) == 1
    assert reply.system_turn == 0 and reply.turn_index == 2
    turns = s.dialogue.turns
    assert [t.role for t in turns] == [Role.SYSTEM, Role.USER, Role.ASSISTANT]
    assert turns[0].segments == [TextSegment(text=BAGEL_THINK_IMAGE_PROMPT)]
    assert turns[2].segments[0] == TextSegment(text="<think> red </think>", think=True)
    assert turns[2].meta["mode"] == "think_image"

    system, user = text(tok, BAGEL_THINK_IMAGE_PROMPT), text(tok, "draw a red circle")
    think = [tok.im_start_id, *reasoning, tok.im_end_id]
    expected = {
        "full": system + user + think,  # the reasoning in the full context only
        "text_uncond": system,  # BAGEL: the context before the trailing text — system prompt, no reasoning
        "image_uncond": system + user,  # every text input, the system prompt included; no reasoning
    }
    for name, ids in expected.items():
        got = seen[name]
        assert got.num_tokens == len(ids) and got.position == len(ids), name
        assert_same_cache(got, text_cache(model, ids, list(range(len(ids)))))
    # afterwards the reasoning is history like any assistant text: full and text-unconditional equal the packer's
    # stream of the dialogue (the next user text dropped, SPEC §4)
    s.add_user("it is red")
    key = reply.image_keys[0]
    ref_turns = [
        (Role.SYSTEM, [TextSegment(BAGEL_THINK_IMAGE_PROMPT)]),
        (Role.USER, [TextSegment("draw a red circle")]),
        (Role.ASSISTANT, [TextSegment("<think> red </think>"), ImageSegment(key)]),
        (Role.USER, [TextSegment("it is red")]),
    ]
    images = {key: reply.images[0]}
    cache, _, position = packed_run(model, tiny_packer(tok), dialogue(ref_turns, images))
    assert_same_cache(s.contexts.full.cache, cache)
    assert s.position == position
    drop = CFGDropRates(text=1.0, vit=0.0, vae=0.0)
    cache, _, position = packed_run(model, tiny_packer(tok, drop), dialogue(ref_turns, images, drop_text_of={3}))
    assert_same_cache(s.contexts.text_uncond.cache, cache)
    assert s.contexts.text_uncond.position == position


def test_think_edit_contexts_hold_the_image_where_bagel_does(model, tok):
    s = new_session(model, tok)
    s.add_user("make it blue", images=[picture(1)])
    with steer(model, tok.encode("<think> blue </think>")):
        reply, seen = think_reply(s, "think_edit")
    assert tuple(reply.images[0].shape) == (3, SIDE, SIDE) and reply.intents == ["text", "image", "end"]
    system, user = text(tok, BAGEL_THINK_IMAGE_PROMPT), text(tok, "make it blue")
    think = [tok.im_start_id, *tok.encode("<think> blue </think>"), tok.im_end_id]
    # full = system, the input image (clean VAE view then ViT view, one position each), request, reasoning
    assert seen["full"].num_tokens == len(system) + 2 * VIEW + len(user) + len(think)
    assert seen["full"].position == len(system) + 2 + len(user) + len(think)
    ref = [(Role.SYSTEM, [TextSegment(BAGEL_THINK_IMAGE_PROMPT)]), (Role.USER, [ImageSegment("a")])]
    cache, _, position = packed_run(model, tiny_packer(tok), dialogue(ref, {"a": picture(1)}))
    assert_same_cache(seen["text_uncond"], cache)  # system + image; no request, no reasoning
    assert seen["text_uncond"].position == position == len(system) + 2
    # image-unconditional: the text only; the two dropped views still advance the position by 1 each (SPEC §3)
    positions = [*range(len(system)), *range(len(system) + 2, len(system) + 2 + len(user))]
    assert_same_cache(seen["image_uncond"], text_cache(model, system + user, positions))
    assert seen["image_uncond"].position == len(system) + 2 + len(user)


def test_think_text_decodes_reasoning_and_answer_in_one_segment(model, tok):
    s = new_session(model, tok)
    s.add_user("what colour is it", images=[picture(2)])
    said = tok.encode("<think> red </think> it is red")
    with steer(model, [*said, tok.im_end_id]):
        reply = s.respond(mode="think_text", max_new_tokens=40)
    assert reply.intents == ["text", "end"] and not reply.images
    assert reply.segments == [TextSegment(text="<think> red </think> it is red")]  # one segment, as BAGEL decodes
    assert reply.think == "<think> red </think>"
    assert s.dialogue.turns[0].segments == [TextSegment(text=BAGEL_THINK_TEXT_PROMPT)]


@pytest.mark.parametrize("predicted, prompt", [("image", BAGEL_THINK_IMAGE_PROMPT), ("text", BAGEL_THINK_TEXT_PROMPT)])
def test_think_follows_the_predicted_intent(model, tok, predicted, prompt):
    s = new_session(model, tok)
    s.add_user("draw a red circle")
    opening = tok.vision_start_id if predicted == "image" else tok.im_start_id
    with steer(model, [opening, *tok.encode("<think> x </think>"), tok.im_end_id]):
        reply = s.respond(mode="think", max_new_tokens=8, sampler=FAST)
    assert s.dialogue.turns[0].text == prompt
    assert reply.intents == (["text", "image", "end"] if predicted == "image" else ["text", "end"])
    assert s.dialogue.turns[-1].meta["mode"] == f"think_{predicted}"


def test_configured_prompts_and_no_second_system_turn(model, tok):
    config = dataclasses.replace(SessionConfig.for_model(model, image_size=SIDE), think_text_prompt="why")
    s = ChatSession(model=model, tokenizer=tok, config=config)
    s.add_user("what colour is it")
    first = s.respond(mode="think_text", max_new_tokens=3)
    assert s.dialogue.turns[0].text == "why" and first.system_turn == 0
    s.rollback(first.turn_index)  # the reply goes, the system turn stays: a retry does not put a second one
    again = s.respond(mode="think_text", max_new_tokens=3)
    assert again.system_turn is None and [t.role for t in s.dialogue.turns] == [Role.SYSTEM, Role.USER, Role.ASSISTANT]
    assert again.text == first.text
    s.undo(again)
    assert [t.role for t in s.dialogue.turns] == [Role.SYSTEM, Role.USER]


# ---------------------------------------------------------------------------------------------- a conversation
def three_exchanges(model, tok) -> ChatSession:
    """edit → think_image → text, each with its own seed."""
    s = new_session(model, tok)
    s.add_user("make it blue", images=[picture(3)])
    s.respond(mode="edit", sampler=SamplerConfig(num_steps=2, seed=1))
    s.add_user("draw a red circle")
    s.respond(mode="think_image", max_new_tokens=5, sampler=SamplerConfig(num_steps=2, seed=2))
    s.add_user("what colour is it")
    s.respond(mode="text", max_new_tokens=4)
    return s


def frozen(s: ChatSession) -> dict[str, Frozen]:
    return {name: Frozen(getattr(s.contexts, name)) for name in ("full", "text_uncond", "image_uncond")}


def assert_same(a: dict[str, Frozen], b: dict[str, Frozen]) -> None:
    for name in a:
        assert a[name].position == b[name].position, name
        assert_same_cache(a[name], b[name], atol=1e-5)


def next_reply(s: ChatSession):
    s.add_user("make it blue")
    return s.respond(mode="think_edit", max_new_tokens=5, sampler=SamplerConfig(num_steps=2, seed=7))


def test_edit_think_text_conversation_rolls_back_and_saves_exactly(model, tok, tmp_path: Path):
    s = three_exchanges(model, tok)
    dialogue_then = Dialogue.from_dict(s.dialogue.to_dict())
    roles = [t.role for t in s.dialogue.turns]
    assert roles == [Role.USER, Role.ASSISTANT, Role.SYSTEM, Role.USER, Role.ASSISTANT, Role.USER, Role.ASSISTANT]
    assert s.dialogue.turns[4].segments[0].think and s.dialogue.turns[4].meta["mode"] == "think_image"
    end = frozen(s)

    # save / load: the same dialogue (system turn and think flag included), caches and next reply
    loaded = ChatSession.load(s.save(tmp_path / "chat"), model=model, tokenizer=tok)
    assert loaded.dialogue == s.dialogue and loaded.config == s.config
    assert_same(frozen(loaded), end)
    a, b = next_reply(s), next_reply(loaded)
    assert a.think == b.think and a.text == b.text and torch.equal(a.images[0], b.images[0])
    after = frozen(s)
    assert_same(frozen(loaded), after)

    # rollback over the think_edit reply and the system turn it put in, then the same reply again
    s.rollback(7)
    assert [t.role for t in s.dialogue.turns] == roles
    assert_same({"full": Frozen(s.contexts.full)}, {"full": end["full"]})
    c = next_reply(s)
    assert c.think == a.think and torch.equal(c.images[0], a.images[0])
    assert_same(frozen(s), after)

    # rollback into the think_image exchange (before its system turn) and replay it: the same turns and caches
    s.rollback(2)
    assert [t.role for t in s.dialogue.turns] == [Role.USER, Role.ASSISTANT]
    s.add_user("draw a red circle")
    s.respond(mode="think_image", max_new_tokens=5, sampler=SamplerConfig(num_steps=2, seed=2))
    s.add_user("what colour is it")
    s.respond(mode="text", max_new_tokens=4)
    assert s.dialogue == dialogue_then
    assert_same(frozen(s), end)
    d = next_reply(s)
    assert d.think == a.think and torch.equal(d.images[0], a.images[0])
    assert_same(frozen(s), after)


def test_respond_batch_with_think_modes_equals_one_by_one_and_undoes_all(model, tok):
    def sessions():
        out = []
        for prompt in ("draw a red circle", "what colour is it"):
            s = new_session(model, tok)
            s.add_user(prompt, images=[picture(4)])
            out.append(s)
        return out

    modes = ["think_edit", "think_text"]
    alone = [s.respond(mode=m, max_new_tokens=4, sampler=FAST) for s, m in zip(sessions(), modes)]
    batch = sessions()
    together = respond_batch(batch, modes=modes, max_new_tokens=4, samplers=FAST)
    assert [r.think for r in together] == [r.think for r in alone] and together[1].text == alone[1].text
    assert (together[0].images[0].int() - alone[0].images[0].int()).abs().max() <= 2
    assert [r.system_turn for r in together] == [0, 0]

    # all or nothing: a failure at the first Euler step (the reasoning done, the system turns in place) leaves every
    # session as it was before the call
    batch = sessions()
    before = [frozen(s) for s in batch]

    def fail(module, args, out):
        raise RuntimeError("boom")

    handle = model.vae.llm2vae.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            respond_batch(batch, modes=modes, max_new_tokens=4, samplers=FAST)
    finally:
        handle.remove()
    for s, then in zip(batch, before):
        assert [t.role for t in s.dialogue.turns] == [Role.USER]
        assert_same(frozen(s), then)


def test_prompt_put_first_is_the_same_stream_without_a_second_prefill(model, tok):
    inserted, first = new_session(model, tok), new_session(model, tok)
    inserted.add_user("make it blue", images=[picture(5)])
    assert first.think_prompt("think_edit") == BAGEL_THINK_IMAGE_PROMPT and first.think_prompt("think") is None
    first.add_system(first.think_prompt("think_edit"))
    first.add_user("make it blue", images=[picture(5)])
    a = inserted.respond(mode="think_edit", max_new_tokens=4, sampler=FAST)
    b = first.respond(mode="think_edit", max_new_tokens=4, sampler=FAST)
    assert a.system_turn == 0 and b.system_turn is None and inserted.dialogue == first.dialogue
    assert a.think == b.think and torch.equal(a.images[0], b.images[0])
    assert_same(frozen(inserted), frozen(first))


def test_interactive_chat_puts_the_prompt_first_and_prints_reasoning_apart(model, tok, tmp_path: Path):
    s = new_session(model, tok)
    written = io.StringIO()
    with steer(model, [*tok.encode("<think> red </think> it is red"), tok.im_end_id]):
        interactive(
            s,
            sampler=FAST,
            out=tmp_path,
            lines=["what colour is it", "/quit"],
            write=written,
            respond_kwargs={"mode": "think_text", "max_new_tokens": 40},
        )
    assert [t.role for t in s.dialogue.turns] == [Role.SYSTEM, Role.USER, Role.ASSISTANT]
    assert s.dialogue.turns[0].text == BAGEL_THINK_TEXT_PROMPT
    lines = written.getvalue().splitlines()
    assert "assistant (think): <think> red </think>" in lines and "assistant: it is red" in lines


def test_think_edit_in_the_middle_of_a_chat_guides_with_the_history(model, tok):
    """Turn 2 of a chat: the CFG contexts of the think_edit image hold the whole history (an edit exchange), the
    system prompt, and what each drops of the current block (SPEC §4): text-unconditional its text and the reasoning,
    image-unconditional its image views and the reasoning — each equal to the packer's stream of the dialogue so far
    with that CFG dropout forced."""
    s = new_session(model, tok)
    s.add_user("draw a red circle", images=[picture(6)])
    first = s.respond(mode="edit", sampler=SamplerConfig(num_steps=2, seed=3))
    s.add_user("make it blue", images=[picture(7)])
    with steer(model, tok.encode("<think> blue </think>")):
        reply, seen = think_reply(s, "think_edit")
    assert reply.system_turn == 2 and s.dialogue.turns[2].text == BAGEL_THINK_IMAGE_PROMPT
    k1 = first.image_keys[0]
    images = {"a": picture(6), k1: first.images[0], "b": picture(7)}
    history = [
        (Role.USER, [ImageSegment("a"), TextSegment("draw a red circle")]),
        (Role.ASSISTANT, [ImageSegment(k1)]),
        (Role.SYSTEM, [TextSegment(BAGEL_THINK_IMAGE_PROMPT)]),
        (Role.USER, [ImageSegment("b"), TextSegment("make it blue")]),
    ]
    reasoning = (Role.ASSISTANT, [TextSegment("<think> blue </think>")])
    full, _, position = packed_run(model, tiny_packer(tok), dialogue([*history, reasoning], images))
    assert_same_cache(seen["full"], full)
    assert seen["full"].position == position
    drop_text = tiny_packer(tok, CFGDropRates(text=1.0, vit=0.0, vae=0.0))
    cache, _, position = packed_run(model, drop_text, dialogue(history, images, drop_text_of={3}))
    assert_same_cache(seen["text_uncond"], cache)
    assert seen["text_uncond"].position == position
    drop_images = tiny_packer(tok, CFGDropRates(text=0.0, vit=1.0, vae=1.0))
    cache, _, position = packed_run(model, drop_images, dialogue(history, images, drop_images_of={3}))
    assert_same_cache(seen["image_uncond"], cache)
    assert seen["image_uncond"].position == position
