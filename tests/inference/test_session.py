"""ChatSession: every cache equals the packer's layout of the same dialogue (with CFG dropout for the unconditional
contexts), the noised view matches training, rollback and save/load reproduce the caches, intents decide replies."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.packing import CFGDropRates, Packer
from chatumm_kit.flow import noise_latents
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.session import ChatSession, SessionConfig
from chatumm_kit.model import FlowInputs
from chatumm_kit.presets import build_model

TEXTS = ["draw a red circle", "what colour is it", "it is red", "make it blue", "a blue square"]
CONFIG = SessionConfig(vit_patch_size=8, vae_token_stride=8, max_image_side=32, image_size=(32, 32))
VIEW_TOKENS = 16 + 2  # a 32x32 image: 4x4 ViT patches or 4x4 VAE tokens, plus v_s / v_e
FAST = SamplerConfig(num_steps=2, seed=0)
ATOL = 1e-4


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.train(TEXTS * 5, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = build_model({"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": tok.vocab_size})
    with torch.no_grad():  # make the experts differ and the velocity head non-zero
        for p in [*m.backbone.parameters(), *m.vae.llm2vae.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def image(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def new_session(model, tok) -> ChatSession:
    return ChatSession(model=model, tokenizer=tok, config=CONFIG)


@contextmanager
def steer(model, plan: list[int]):
    """Add +100 to the logit of ``plan[i]`` at the i-th ``lm_head`` call (the last entry repeats)."""
    calls = []

    def hook(module, args, out):
        target = plan[min(len(calls), len(plan) - 1)]
        calls.append(target)
        bias = torch.zeros_like(out)
        bias[..., target] = 100.0
        return out + bias

    handle = model.backbone.lm_head.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


@contextmanager
def count_velocity_calls(model):
    calls = []
    handle = model.vae.llm2vae.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        yield calls
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- references
NO_DROP = CFGDropRates.disabled()
TEXT_UNCOND = CFGDropRates(text=1.0, vit=0.0, vae=0.0)  # forced CFG dropout of droppable text
IMAGE_UNCOND = CFGDropRates(text=0.0, vit=1.0, vae=1.0)  # forced CFG dropout of droppable image views


def packer(tok, drop: CFGDropRates = NO_DROP) -> Packer:
    return Packer(tokenizer=tok, vit_patch_size=8, vae_token_stride=8, max_image_side=32, drop_rates=drop)


def dialogue(
    turns: list[tuple[Role, list], ...], images, *, drop_text_of: set[int] = frozenset(), drop_images_of=frozenset()
):
    """Reference sample; ``drop_text_of`` / ``drop_images_of`` mark those turns' text / images droppable."""
    built = []
    for i, (role, segs) in enumerate(turns):
        out = []
        for s in segs:
            if isinstance(s, TextSegment):
                out.append(TextSegment(s.text, droppable=i in drop_text_of))
            else:
                out.append(ImageSegment(s.image, droppable=i in drop_images_of))
        built.append(Turn(role=role, segments=out, trainable=False))
    return DialogueSample(dialogue=Dialogue(id="ref", turns=built), images=images, key="ref")


@torch.no_grad()
def packed_run(model, pk: Packer, sample: DialogueSample):
    """One packed forward of the whole dialogue into a fresh cache: (cache, outputs, final position)."""
    batch = pk.pack([sample])
    flow = FlowInputs(timesteps=torch.zeros(0), noise=torch.zeros(0, model.vae.token_dim))
    hidden, _, _ = model.embed(batch, flow)
    cache = model.backbone.new_kv_cache()
    out = model.backbone(
        hidden,
        position_ids=batch.position_ids,
        und_indices=batch.und_indices,
        gen_indices=batch.gen_indices,
        attn_mask=model.mask_builder.dense(batch.splits),
        kv_cache=cache,
        commit=True,
    )
    return cache, out, int(batch.position_ids[-1]) + 1


def assert_same_cache(a, b, atol=ATOL):
    assert a.num_tokens == b.num_tokens, (a.num_tokens, b.num_tokens)
    for layer in range(a.num_layers):
        torch.testing.assert_close(a.keys(layer), b.keys(layer), atol=atol, rtol=0)
        torch.testing.assert_close(a.values(layer), b.values(layer), atol=atol, rtol=0)


def assert_same_contexts(a: ChatSession, b: ChatSession, atol=ATOL):
    for name in ("full", "text_uncond", "image_uncond"):
        ca, cb = getattr(a.contexts, name), getattr(b.contexts, name)
        assert ca.position == cb.position, name
        assert_same_cache(ca.cache, cb.cache, atol)


# ---------------------------------------------------------------------------------------------- three turns
THREE = [
    (Role.USER, [ImageSegment("a"), TextSegment("draw a red circle")]),
    (Role.ASSISTANT, [ImageSegment("b"), TextSegment("it is red")]),
    (Role.USER, [TextSegment("what colour is it")]),
]


def three_turns(model, tok) -> ChatSession:
    s = new_session(model, tok)
    s.add_user("draw a red circle", images=[image(1)])
    s.add_assistant("it is red", images=[image(2)])
    s.add_user("what colour is it")
    return s


def test_full_context_equals_one_packed_forward(model, tok):
    s = three_turns(model, tok)
    cache, out, position = packed_run(model, packer(tok), dialogue(THREE, {"a": image(1), "b": image(2)}))
    full = s.contexts.full
    assert_same_cache(full.cache, cache)
    assert full.position == s.position == position
    logits = s.next_token_logits()
    assert (logits - model.backbone.lm_head(out[-1])).abs().max() <= ATOL


def test_unconditional_contexts_equal_packing_with_forced_cfg_dropout(model, tok):
    s = three_turns(model, tok)
    images = {"a": image(1), "b": image(2)}
    # text-unconditional: the current user turn's text dropped (it advances nothing); all history kept
    cache, _, position = packed_run(model, packer(tok, TEXT_UNCOND), dialogue(THREE, images, drop_text_of={2}))
    assert_same_cache(s.contexts.text_uncond.cache, cache)
    assert s.contexts.text_uncond.position == position
    # image-unconditional: the current user block holds no image, so it is the full context (history images stay)
    assert s.contexts.image_uncond is s.contexts.full
    # a block with an image: that image's views dropped (each still advances the position by 1), history kept
    s.rollback(2)
    s.add_user("what colour is it", images=[image(3)])
    turns = [*THREE[:2], (Role.USER, [ImageSegment("c"), TextSegment("what colour is it")])]
    images["c"] = image(3)
    cache, _, position = packed_run(model, packer(tok, IMAGE_UNCOND), dialogue(turns, images, drop_images_of={2}))
    assert_same_cache(s.contexts.image_uncond.cache, cache)
    assert s.contexts.image_uncond.position == position == s.position


def test_context_sizes_differ_by_exactly_the_dropped_segments(model, tok):
    s = three_turns(model, tok)
    s.rollback(2)
    s.add_user("what colour is it", images=[image(3), image(4)])
    c = s.contexts
    user_text = len(tok.encode("what colour is it")) + 2
    assert c.full.num_tokens - c.text_uncond.num_tokens == user_text
    assert c.full.position - c.text_uncond.position == user_text
    assert c.full.num_tokens - c.image_uncond.num_tokens == 2 * 2 * VIEW_TOKENS  # the block's two images, two views
    assert c.image_uncond.position == c.full.position


def test_contexts_are_shared_until_they_differ(model, tok):
    s = new_session(model, tok)
    s.add_user("draw a red circle")
    c = s.contexts
    assert c.image_uncond is c.full  # no image anywhere yet
    assert c.text_uncond is not c.full and c.text_uncond.num_tokens == 0
    s.add_assistant("it is red")
    s.add_user(images=[image(3)])  # a new user block without text: text-unconditional is the full context
    c = s.contexts
    assert c.text_uncond is c.full and c.image_uncond is not c.full
    assert c.full.num_tokens - c.image_uncond.num_tokens == 2 * VIEW_TOKENS


# ---------------------------------------------------------------------------------------------- generation
def test_noised_view_velocity_matches_the_training_forward(model, tok):
    s = new_session(model, tok)
    s.add_user("draw a red circle", images=[image(1)])
    target = image(7)
    g = torch.Generator().manual_seed(3)
    x0 = model.vae.patchify(model.vae.encode([target.float() / 127.5 - 1.0])[0])
    eps = torch.randn(x0.shape, generator=g)
    x_t = noise_latents(x0, eps, torch.full((x0.shape[0],), 0.7))
    with torch.no_grad():
        ours = s.runner.noised_velocity(s.contexts.full, x_t, 0.7, (4, 4))
        turns = [THREE[0], (Role.ASSISTANT, [ImageSegment("x")])]
        sample = dialogue(turns, {"a": image(1), "x": target})
        sample.dialogue.turns[1] = Turn(role=Role.ASSISTANT, segments=[ImageSegment("x")], trainable=True)
        out = model(packer(tok).pack([sample]), flow=FlowInputs(timesteps=torch.tensor([0.7]), noise=eps))
    torch.testing.assert_close(ours, out.velocity, atol=ATOL, rtol=0)
    n_text = len(tok.encode("draw a red circle")) + 2
    assert s.contexts.full.num_tokens == n_text + 2 * VIEW_TOKENS  # commit=False left nothing behind


def test_generated_image_reenters_like_a_packed_untrained_assistant_image(model, tok):
    s = new_session(model, tok)
    s.add_user("draw a red circle", images=[image(1)])
    with steer(model, [tok.vision_start_id, tok.end_id]):
        reply = s.respond(sampler=FAST)
    assert reply.intents == ["image", "end"] and reply.finished
    gen = reply.images[0]
    assert gen.dtype == torch.uint8 and gen.shape == (3, 32, 32)
    assert s.images[reply.image_keys[0]] is gen
    images = {"a": image(1), "g": gen}
    turns = [THREE[0], (Role.ASSISTANT, [ImageSegment("g")])]
    for drop, kwargs, name in [
        (NO_DROP, {}, "full"),
        (TEXT_UNCOND, {"drop_text_of": {0}}, "text_uncond"),
        (IMAGE_UNCOND, {"drop_images_of": {0}}, "image_uncond"),  # the user's image dropped, the generated kept
    ]:
        cache, out, _ = packed_run(model, packer(tok, drop), dialogue(turns, images, **kwargs))
        assert_same_cache(getattr(s.contexts, name).cache, cache)
        if name == "full":
            assert (s.next_token_logits() - model.backbone.lm_head(out[-1])).abs().max() <= ATOL
    # positions (dropped views advance too) show in the next turn's tokens
    s.add_user("make it blue")
    turns.append((Role.USER, [TextSegment("make it blue")]))
    for drop, kwargs, name in [
        (NO_DROP, {}, "full"),
        (TEXT_UNCOND, {"drop_text_of": {2}}, "text_uncond"),
        (IMAGE_UNCOND, {}, "image_uncond"),  # a new block without images: nothing dropped
    ]:
        cache, _, position = packed_run(model, packer(tok, drop), dialogue(turns, images, **kwargs))
        ctx = getattr(s.contexts, name)
        assert_same_cache(ctx.cache, cache)
        assert ctx.position == position, name


@pytest.mark.parametrize(
    "with_image,interval,expected",
    [
        (True, (0.8, 1.0), 2 * 3 + 2 * 1),  # grid 1, .9, .75, .5: two guided steps of three contexts
        (True, (0.0, 1.0), 4 * 3),
        (False, (0.0, 1.0), 4 * 2),  # no image in the dialogue: image-unconditional is the full context
    ],
)
def test_image_reply_runs_the_right_number_of_velocity_calls(model, tok, with_image, interval, expected):
    s = new_session(model, tok)
    s.add_user("draw a red circle", images=[image(1)] if with_image else [])
    cfg = SamplerConfig(num_steps=4, shift=3.0, cfg_interval=interval, seed=0)
    with steer(model, [tok.vision_start_id, tok.end_id]), count_velocity_calls(model) as calls:
        s.respond(sampler=cfg)
    # one stacked forward per Euler step; its rows are 16 latent tokens per context that ran
    assert len(calls) == 4 and sum(calls) == expected * 16 and all(c % 16 == 0 for c in calls)


def test_text_reply_is_decoded_token_by_token_and_ends_on_prediction(model, tok):
    s = new_session(model, tok)
    s.add_user("what colour is it", images=[image(1)])
    before = s.contexts
    n_full, n_text, n_image = before.full.num_tokens, before.text_uncond.num_tokens, before.image_uncond.num_tokens
    it, red = tok.encode("it")[0], tok.encode("red")[0]
    with steer(model, [tok.im_start_id, it, red, tok.im_end_id, tok.end_id]) as calls:
        reply = s.respond()
    assert reply.intents == ["text", "end"] and reply.finished and reply.images == []
    assert reply.text == tok.decode([it, red])
    assert len(calls) == 5  # intent, two tokens, im_end, intent
    c = s.contexts
    # im_s it red im_e reached every context
    assert (c.full.num_tokens - n_full, c.text_uncond.num_tokens - n_text, c.image_uncond.num_tokens - n_image) == (
        4,
        4,
        4,
    )
    # and the cache equals a packed replay of the same dialogue
    turns = [(Role.USER, [ImageSegment("a"), TextSegment("what colour is it")]), (Role.ASSISTANT, reply.segments)]
    cache, _, _ = packed_run(model, packer(tok), dialogue(turns, {"a": image(1)}))
    assert_same_cache(c.full.cache, cache)


def test_first_intent_is_restricted_and_limits_are_enforced(model, tok):
    s = new_session(model, tok)
    s.add_user("draw a red circle")
    a = tok.encode("a")[0]
    # <|end|> is not allowed as the first marker: the runner-up among {im_s, v_s} wins
    with steer(model, [tok.end_id]):
        hook = model.backbone.lm_head.register_forward_hook(
            lambda m, args, out: out + 50.0 * torch.nn.functional.one_hot(torch.tensor(tok.im_start_id), out.shape[-1])
        )
        try:
            reply = s.respond(max_new_tokens=3, max_segments=1)
        finally:
            hook.remove()
    assert reply.intents == ["text"] and not reply.finished
    s.rollback(1)
    n = s.contexts.full.num_tokens
    # never predicts im_end: each segment is capped at 3 tokens, then im_end is appended (no lm_head call for it)
    with steer(model, [tok.im_start_id, a, a, a, tok.im_start_id, a]):
        reply = s.respond(max_new_tokens=3, max_segments=2)
    assert reply.intents == ["text", "text"] and not reply.finished
    assert [seg.text for seg in reply.segments] == [tok.decode([a] * 3)] * 2
    assert s.contexts.full.num_tokens - n == 2 * (3 + 2)


def test_respond_needs_a_pending_user_turn(model, tok):
    s = three_turns(model, tok)
    s.add_assistant("ok")
    with pytest.raises(RuntimeError, match="last turn must be a user turn"):
        s.respond()


# ---------------------------------------------------------------------------------------------- rollback, save
def test_rollback_and_replay_reproduce_logits_and_caches(model, tok):
    s = three_turns(model, tok)
    logits = s.next_token_logits()
    s.rollback(2)
    assert s.num_turns == 2 and set(s.images) == {"img0", "img1"}
    s.add_user("what colour is it")
    assert torch.equal(s.next_token_logits(), logits)
    assert_same_contexts(s, three_turns(model, tok), atol=0)
    # back into the first user block: its text-unconditional context is rebuilt (the later block replaced it)
    s.rollback(1)
    fresh = new_session(model, tok)
    fresh.add_user("draw a red circle", images=[image(1)])
    assert s.num_turns == 1 and list(s.images) == ["img0"]
    assert_same_contexts(s, fresh, atol=1e-5)
    assert torch.equal(s.next_token_logits(), fresh.next_token_logits())


def test_regenerating_a_reply_after_rollback_is_deterministic(model, tok):
    s = new_session(model, tok)
    s.add_user("draw a red circle", images=[image(1)])
    with steer(model, [tok.vision_start_id, tok.end_id]):
        first = s.respond(sampler=FAST)
    s.rollback(1)
    with steer(model, [tok.vision_start_id, tok.end_id]):
        again = s.respond(sampler=FAST)
    s.rollback(1)
    with steer(model, [tok.vision_start_id, tok.end_id]):
        other = s.respond(sampler=SamplerConfig(num_steps=2, seed=1))
    assert torch.equal(first.images[0], again.images[0])
    assert not torch.equal(first.images[0], other.images[0])


def test_save_load_round_trip_reproduces_the_caches(model, tok, tmp_path):
    s = new_session(model, tok)
    s.add_user("draw a red circle", images=[image(1)])
    chars = [tok.encode(c)[0] for c in "draw"]
    assert tok.encode(tok.decode(chars)) != chars  # the generated ids are not the canonical encoding
    plan = [tok.vision_start_id, tok.im_start_id, *chars, tok.im_end_id, tok.end_id]
    with steer(model, plan):
        reply = s.respond(sampler=FAST)
    assert reply.intents == ["image", "text", "end"] and reply.text == "draw"
    s.add_user("make it blue")
    folder = s.save(tmp_path / "chat")
    loaded = ChatSession.load(folder, model=model, tokenizer=tok)
    assert loaded.dialogue.to_dict() == s.dialogue.to_dict()
    assert set(loaded.images) == set(s.images) and all(torch.equal(loaded.images[k], s.images[k]) for k in s.images)
    assert_same_contexts(loaded, s)
    assert (loaded.next_token_logits() - s.next_token_logits()).abs().max() <= 1e-5


def test_load_rejects_another_tokenizer(model, tok, tmp_path):
    s = three_turns(model, tok)
    s.save(tmp_path / "chat")
    other = ChatTokenizer.train(TEXTS * 5, vocab_size=280)
    with pytest.raises(ValueError, match="vocab_size"):
        ChatSession.load(tmp_path / "chat", model=model, tokenizer=other)


def test_settings_must_fit_the_model(model, tok):
    with pytest.raises(ValueError, match="vit_patch_size=14"):
        ChatSession(model=model, tokenizer=tok, config=SessionConfig(vit_patch_size=14, vae_token_stride=8))
    with pytest.raises(ValueError, match="vae_token_stride=16"):
        ChatSession(model=model, tokenizer=tok, config=SessionConfig(vit_patch_size=8, vae_token_stride=16))


def test_consecutive_user_turns_form_one_block_for_text_guidance(model, tok):
    s = new_session(model, tok)
    s.add_user("draw a red circle", images=[image(1)])
    s.add_user("make it blue", images=[image(2)])
    turns = [
        (Role.USER, [ImageSegment("a"), TextSegment("draw a red circle")]),
        (Role.USER, [ImageSegment("b"), TextSegment("make it blue")]),
    ]
    images = {"a": image(1), "b": image(2)}
    cache, _, _ = packed_run(model, packer(tok, TEXT_UNCOND), dialogue(turns, images, drop_text_of={0, 1}))
    assert_same_cache(s.contexts.text_uncond.cache, cache)
    s.rollback(1)  # back inside the block: truncation is enough
    cache, _, _ = packed_run(model, packer(tok, TEXT_UNCOND), dialogue(turns[:1], images, drop_text_of={0}))
    assert_same_cache(s.contexts.text_uncond.cache, cache)


def test_a_failing_turn_leaves_the_session_unchanged(model, tok):
    s = three_turns(model, tok)
    before = {name: (c.num_tokens, c.position) for name, c in vars(s.contexts).items()}
    logits = s.next_token_logits()
    with pytest.raises(ValueError, match="expected uint8"):
        s.add_user("make it blue", images=[torch.zeros(3, 32, 32)])
    assert s.num_turns == 3 and set(s.images) == {"img0", "img1"}
    assert {name: (c.num_tokens, c.position) for name, c in vars(s.contexts).items()} == before
    assert torch.equal(s.next_token_logits(), logits)


# ---------------------------------------------------------------------------------------------- CFG contexts = training
def test_image_unconditional_context_is_what_cfg_training_dropout_removes(model, tok):
    """SPEC §4: the image-unconditional context of a reply image is the one CFG training dropout shows that image.

    The training form of the dialogue: every assistant turn trainable, droppable segments marked by the kit's default
    policy (``data/droppable.py``). The reference is the packed training sequence with the dropout draw that removes
    the views of the current request's image; the keys the noised target's first token may attend (the GCA mask row,
    SPEC §3) must be the session's image-unconditional cache, and its position the session's."""
    from chatumm_kit.components.splits import Modality
    from chatumm_kit.data.droppable import DroppablePolicy, mark_droppable

    a, b, c, d = image(1), image(2), image(3), image(4)
    s = new_session(model, tok)
    s.add_user("draw a red circle", images=[a])
    s.add_assistant(images=[b])
    s.add_user("make it blue", images=[c])
    keys = dict(zip(("a", "b", "c"), s.images, strict=True))
    images = {keys["a"]: a, keys["b"]: b, keys["c"]: c, "d": d}
    training = Dialogue(
        id="ref",
        turns=[
            Turn(role=Role.USER, segments=[ImageSegment(keys["a"]), TextSegment("draw a red circle")]),
            Turn(role=Role.ASSISTANT, segments=[ImageSegment(keys["b"])]),
            Turn(role=Role.USER, segments=[ImageSegment(keys["c"]), TextSegment("make it blue")]),
            Turn(role=Role.ASSISTANT, segments=[ImageSegment("d")]),
        ],
    )
    marked = mark_droppable(training, DroppablePolicy.IMAGE_REPLIES)
    pk = packer(tok)
    plan = pk.plan(DialogueSample(dialogue=marked, images=images, key="ref"))
    views = (Modality.VAE_CLEAN, Modality.VIT)
    # the draw that drops the current request's (turn 2) image views, and nothing else
    keep = [not (p.droppable and p.turn == 2 and p.modality in views) for p in plan.pieces]
    # what the dropout may ever remove: the views of both user images; never the generated image b
    droppable_views = {(p.turn, p.image) for p in plan.pieces if p.droppable and p.modality in views}
    assert droppable_views == {(0, keys["a"]), (2, keys["c"])}
    pk._keep_mask = lambda plan, generator: keep  # force that draw
    batch = pk.pack([DialogueSample(dialogue=marked, images=images, key="ref")])
    n_noised = sum(p.num_tokens - 2 for p in plan.pieces if p.modality is Modality.VAE_NOISED)
    flow = FlowInputs(timesteps=torch.full((2,), 0.5), noise=torch.randn(n_noised, model.vae.token_dim))
    with torch.no_grad():
        hidden, _, _ = model.embed(batch, flow)
        cache = model.backbone.new_kv_cache()
        mask = model.mask_builder.dense(batch.splits)
        model.backbone(
            hidden,
            position_ids=batch.position_ids,
            und_indices=batch.und_indices,
            gen_indices=batch.gen_indices,
            attn_mask=mask,
            kv_cache=cache,
            commit=True,
        )
    # the noised view of d (the last noised split): its first token's mask row, without its own split
    target, length = [(start, n) for start, n, *_, modality in batch.splits.rows() if modality is Modality.VAE_NOISED][
        -1
    ]
    row = mask.reshape(mask.shape[-2], mask.shape[-1])[target]
    visible = [k for k in range(row.shape[0]) if bool(row[k]) and not target <= k < target + length]
    ctx = s.contexts.image_uncond
    assert ctx is not s.contexts.full and ctx.num_tokens == len(visible)
    assert ctx.position == int(batch.position_ids[target]) == s.position
    for layer in range(cache.num_layers):
        torch.testing.assert_close(ctx.cache.keys(layer), cache.keys(layer)[..., visible, :], atol=ATOL, rtol=0)
        torch.testing.assert_close(ctx.cache.values(layer), cache.values(layer)[..., visible, :], atol=ATOL, rtol=0)
