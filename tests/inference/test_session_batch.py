"""respond_batch: several sessions replying together give the replies, images and caches of replying one by one;
one forward serves every session per step; sessions drop out when done; failures leave every session unchanged.

The equality tests run the model in float64, where the stacked forward's different summation order (matrix
products over more rows) is ~1e-16 and cannot move a ``uint8`` pixel, so replies must be *identical*; one test
states what float32 guarantees (same text, pixels within one level)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

import chatumm_kit.inference.batch as batch_module
from chatumm_kit.components.kv_cache import CacheChunk
from chatumm_kit.components.mot import MoTBackbone
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.inference.batch import respond_batch, run_together
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.session import ChatSession, SessionConfig
from chatumm_kit.inference.steps import TokenStep
from chatumm_kit.presets import build_model

TEXTS = ["draw a red circle", "what colour is it", "it is red", "make it blue", "a blue square"]
CONFIG = SessionConfig(vit_patch_size=8, vae_token_stride=8, max_image_side=32, image_size=(32, 32))
WIDE = replace(CONFIG, image_size=(16, 32), edits_at_input_size=False)  # a 2x4 latent grid instead of 4x4
EXACT = 1e-10  # float64


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.train(TEXTS * 5, vocab_size=300)


def jittered_model(tok, dtype):
    torch.manual_seed(0)
    m = build_model({"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": tok.vocab_size})
    with torch.no_grad():  # make the experts differ and the velocity head non-zero
        for p in [*m.backbone.parameters(), *m.vae.llm2vae.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return m.to(dtype).eval()


@pytest.fixture(scope="module")
def model(tok):
    return jittered_model(tok, torch.float64)


def image(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def chat(model, tok, history: str, config: SessionConfig = CONFIG) -> ChatSession:
    """A session ending with a user turn; ``history`` picks which contexts differ from ``full``."""
    s = ChatSession(model=model, tokenizer=tok, config=config)
    if history == "text":  # no image anywhere: the image-unconditional context is the full one
        s.add_user("draw a red circle")
    elif history == "image+text":
        s.add_user("what colour is it", images=[image(1)])
    elif history == "long":  # three turns, three images (the last one attached to the pending request)
        s.add_user("draw a red circle", images=[image(2)])
        s.add_assistant("it is red", images=[image(3)])
        s.add_user("make it blue", images=[image(5)])
    elif history == "image":  # a user block without text: the text-unconditional context is the full one
        s.add_user(images=[image(4)])
    else:
        raise ValueError(history)
    return s


HISTORIES = ["text", "image+text", "long", "image"]


@contextmanager
def forced(model, tok, kind: str):
    """Every intent opens ``kind`` ("text": ``im_e`` never chosen, so text runs to ``max_new_tokens``)."""
    bias = torch.zeros(model.backbone.lm_head.out_features, dtype=model.backbone.lm_head.weight.dtype)
    if kind == "text":
        bias[tok.im_start_id], bias[tok.im_end_id] = 100.0, -100.0
    else:
        bias[tok.vision_start_id] = 100.0
    handle = model.backbone.lm_head.register_forward_hook(lambda m, a, out: out + bias)
    try:
        yield
    finally:
        handle.remove()


def both_ways(make, samplers, **settings):
    """Reply one by one on fresh sessions and together on other fresh sessions: (alone, replies, batched, replies)."""
    alone, together = make(), make()
    alone_replies = [s.respond(sampler=c, **settings) for s, c in zip(alone, samplers)]
    batch_replies = respond_batch(together, samplers=samplers, **settings)
    return alone, alone_replies, together, batch_replies


def assert_same_cache(a, b, atol):
    assert a.num_tokens == b.num_tokens
    for layer in range(a.num_layers):
        torch.testing.assert_close(a.keys(layer), b.keys(layer), atol=atol, rtol=0)
        torch.testing.assert_close(a.values(layer), b.values(layer), atol=atol, rtol=0)


def assert_same_sessions(alone, alone_replies, together, batch_replies, *, atol=EXACT):
    for sa, ra, sb, rb in zip(alone, alone_replies, together, batch_replies, strict=True):
        assert (ra.turn_index, ra.intents, ra.finished, ra.text, ra.image_keys) == (
            rb.turn_index,
            rb.intents,
            rb.finished,
            rb.text,
            rb.image_keys,
        )
        assert all(torch.equal(x, y) for x, y in zip(ra.images, rb.images, strict=True))
        assert sa.dialogue.to_dict() == sb.dialogue.to_dict()
        assert sa.images.keys() == sb.images.keys() and all(torch.equal(sa.images[k], sb.images[k]) for k in sa.images)
        ca, cb = sa.contexts, sb.contexts
        for name in ("full", "text_uncond", "image_uncond"):
            a, b = getattr(ca, name), getattr(cb, name)
            assert (a is ca.full) == (b is cb.full), name  # shared with full in both or in neither
            assert a.position == b.position, name
            assert_same_cache(a.cache, b.cache, atol)
        torch.testing.assert_close(sa.next_token_logits(), sb.next_token_logits(), atol=atol, rtol=0)


@contextmanager
def count_velocity_rows(model):
    rows = []
    handle = model.vae.llm2vae.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        yield rows
    finally:
        handle.remove()


@contextmanager
def count_forwards():
    calls = []
    inner = MoTBackbone.forward_chunks  # run_together's stacked forward

    def counting(backbone, chunks):
        calls.append(len(chunks))
        return inner(backbone, chunks)

    MoTBackbone.forward_chunks = counting
    try:
        yield calls
    finally:
        MoTBackbone.forward_chunks = inner


# ---------------------------------------------------------------------------------------------- equality
def test_text_replies_equal_one_by_one_with_one_forward_per_token(model, tok):
    make = lambda: [chat(model, tok, h) for h in HISTORIES]  # noqa: E731
    samplers = [SamplerConfig(seed=i) for i in range(4)]
    with forced(model, tok, "text"), count_forwards() as calls:
        result = both_ways(make, samplers, max_new_tokens=5, max_segments=2)
    assert_same_sessions(*result)
    assert all(r.intents == ["text", "text"] for r in result[1])
    # per segment: im_s, 5 tokens, im_e; every forward carries all four sessions
    assert calls == [4] * (2 * 7)


def test_image_replies_equal_one_by_one_with_mixed_cfg_settings(model, tok):
    histories = ["text", "image+text", "long", "image", "long"]
    configs = [CONFIG, CONFIG, CONFIG, CONFIG, WIDE]
    make = lambda: [chat(model, tok, h, c) for h, c in zip(histories, configs)]  # noqa: E731
    samplers = [
        SamplerConfig(num_steps=3, seed=0, cfg_interval=(0.0, 1.0)),
        SamplerConfig(num_steps=3, seed=1, cfg_interval=(0.0, 1.0), cfg_renorm="token", cfg_image_scale=2.0),
        SamplerConfig(num_steps=3, seed=2, cfg_interval=(0.5, 1.0), cfg_renorm="none"),
        SamplerConfig(num_steps=3, seed=3, cfg_interval=(0.0, 1.0), cfg_text_scale=1.0),
        SamplerConfig(num_steps=3, seed=4, cfg_interval=(0.0, 1.0), renorm_min=0.5),
    ]
    with forced(model, tok, "image"), count_velocity_rows(model) as rows:
        alone = make()
        alone_replies = [s.respond(sampler=c, max_segments=1) for s, c in zip(alone, samplers)]
        n_alone = len(rows)
        together = make()
        batch_replies = respond_batch(together, samplers=samplers, max_segments=1)
    assert_same_sessions(alone, alone_replies, together, batch_replies)
    assert [len(r.images) for r in batch_replies] == [1] * 5 and batch_replies[4].images[0].shape == (3, 16, 32)
    # every step of this grid (t = 1, .86, .6) is guided; contexts run per session: "text" 2 (image-uncond is full),
    # "image+text" 3, "long" 3, "image" 2 (text scale 1, and text-uncond is full anyway), "long" at 2x4 tokens 3
    # alone: one stacked forward per session and step, over that session's contexts
    assert rows[:n_alone] == [16 * 2] * 3 + [16 * 3] * 3 + [16 * 3] * 3 + [16 * 2] * 3 + [8 * 3] * 3
    assert rows[n_alone:] == [16 * (2 + 3 + 3 + 2) + 8 * 3] * 3  # together: one per step


def test_sampled_intents_mix_text_images_and_interleaved_replies(model, tok):
    """Sessions at different stages share forwards (one decoding text while another samples an image)."""
    make = lambda: [chat(model, tok, HISTORIES[i % 4]) for i in range(6)]  # noqa: E731
    samplers = [SamplerConfig(num_steps=3, seed=i, cfg_interval=(0.0, 1.0)) for i in range(6)]
    result = both_ways(make, samplers, max_new_tokens=6, max_segments=3, temperature=1.0)
    assert_same_sessions(*result)
    kinds = {tuple(sorted(set(r.intents) - {"end"})) for r in result[1]}
    assert {("text",), ("image",), ("image", "text")} <= kinds, kinds


def test_a_session_that_finishes_early_drops_out(model, tok):
    make = lambda: [chat(model, tok, "image+text"), chat(model, tok, "long"), chat(model, tok, "text")]  # noqa: E731
    steps = [1, 4, 2]
    samplers = [SamplerConfig(num_steps=n, seed=n, cfg_interval=(0.0, 1.0)) for n in steps]
    with forced(model, tok, "image"), count_forwards() as calls:
        result = both_ways(make, samplers, max_segments=1)
    assert_same_sessions(*result)
    # contexts per session: 3, 3, 2 (no image: image-uncond is full). One by one: a stacked forward per session and
    # step (1, 4 and 2 steps); together: all sessions per step, each leaving after its last step
    assert calls[:7] == [3] + [3] * 4 + [2] * 2
    assert calls[7:] == [3 + 3 + 2, 3 + 2, 3, 3]


def test_batched_sessions_keep_chatting_and_roll_back_alike(model, tok):
    alone = [chat(model, tok, h) for h in HISTORIES[:3]]
    together = [chat(model, tok, h) for h in HISTORIES[:3]]
    samplers = [SamplerConfig(num_steps=2, seed=i) for i in range(3)]
    for round_ in range(2):
        ra = [s.respond(sampler=c, max_new_tokens=4, max_segments=2, temperature=1.0) for s, c in zip(alone, samplers)]
        rb = respond_batch(together, samplers=samplers, max_new_tokens=4, max_segments=2, temperature=1.0)
        assert_same_sessions(alone, ra, together, rb)
        for sessions in (alone, together):
            for s in sessions:
                s.add_user(TEXTS[round_ + 2], images=[image(10 + round_)])
    for s in alone + together:
        s.rollback(s.num_turns - 2)  # the last batched reply and the user turn after it
    assert_same_sessions(alone, ra, together, rb)  # the rolled-back turns were added alike


def test_float32_replies_agree_to_rounding(tok):
    """In float32 the stacked forward rounds differently (~1e-7): the text is the same and a generated image's pixel
    may move by at most one ``uint8`` level (which then shows in the caches at ~1e-3). One segment per reply, so no
    image is generated after a moved pixel."""
    model32 = jittered_model(tok, torch.float32)
    make = lambda: [chat(model32, tok, HISTORIES[i % 4]) for i in range(6)]  # noqa: E731
    samplers = [SamplerConfig(num_steps=3, seed=i, cfg_interval=(0.0, 1.0)) for i in range(6)]
    alone, ra, together, rb = both_ways(make, samplers, max_new_tokens=6, max_segments=1, temperature=1.0)
    assert {r.intents[0] for r in ra} == {"text", "image"}
    for sa, a, sb, b in zip(alone, ra, together, rb):
        assert (a.intents, a.text) == (b.intents, b.text)
        for x, y in zip(a.images, b.images, strict=True):
            assert (x.int() - y.int()).abs().max() <= 1
        for name in ("full", "text_uncond", "image_uncond"):
            assert_same_cache(getattr(sa.contexts, name).cache, getattr(sb.contexts, name).cache, atol=5e-3)


# ---------------------------------------------------------------------------------------------- the stacked forward
def test_stacked_forward_equals_each_chunk_alone(model, tok):
    sessions = [chat(model, tok, h) for h in HISTORIES[:3]]
    clones = [s.contexts.full.cache.clone() for s in sessions]
    backbone = model.backbone
    g = torch.Generator().manual_seed(0)
    chunks = []
    for i, (s, cache) in enumerate(zip(sessions, clones)):
        n = 2 + i
        is_gen = torch.zeros(n, dtype=torch.bool)
        is_gen[1:] = i > 0  # the first chunk is all und; the others end with gen tokens
        mask = torch.ones(n, n, dtype=torch.bool).tril() if i != 1 else torch.ones(n, n, dtype=torch.bool)
        hidden = torch.randn(n, backbone.config.hidden_size, generator=g, dtype=torch.float64)
        pos = torch.arange(n) + s.position
        chunks.append(CacheChunk(cache=cache, hidden=hidden, position_ids=pos, is_gen=is_gen, mask=mask, commit=i != 2))
    with torch.no_grad():
        outs = backbone.forward_chunks(chunks)
        for s, c, out in zip(sessions, chunks, outs):
            ref = backbone(
                c.hidden,
                position_ids=c.position_ids,
                und_indices=(~c.is_gen).nonzero().flatten(),
                gen_indices=c.is_gen.nonzero().flatten(),
                attn_mask=c.mask,
                kv_cache=s.contexts.full.cache,
                commit=c.commit,
            )
            torch.testing.assert_close(out, ref, atol=EXACT, rtol=0)
    for s, cache in zip(sessions, clones):
        assert_same_cache(cache, s.contexts.full.cache, EXACT)  # committed (or not) alike
    with pytest.raises(ValueError, match="a cache appears in two chunks"), torch.no_grad():
        backbone.forward_chunks([chunks[0], chunks[0]])
    with pytest.raises(RuntimeError, match="inference-only"):
        backbone.forward_chunks(chunks[:1])


def test_run_together_answers_token_steps_like_the_runner(model, tok):
    a, b = chat(model, tok, "text"), chat(model, tok, "long")
    ctx_a, ctx_b = a.contexts.full.fork(), b.contexts.full.fork()
    with torch.no_grad():
        out_a, out_b = run_together(model, tok, [TokenStep(ctx_a, tok.im_start_id), TokenStep(ctx_b, 7)])
        ref_a, ref_b = a.runner.step(a.contexts.full, tok.im_start_id), b.runner.step(b.contexts.full, 7)
    torch.testing.assert_close(out_a, ref_a, atol=EXACT, rtol=0)
    torch.testing.assert_close(out_b, ref_b, atol=EXACT, rtol=0)
    assert (ctx_a.position, ctx_b.position) == (a.position, b.position)


# ---------------------------------------------------------------------------------------------- errors
def test_sessions_must_share_model_and_tokenizer(model, tok):
    s1, s2 = chat(model, tok, "text"), chat(model, tok, "text")
    other_model = jittered_model(tok, torch.float64)
    with pytest.raises(ValueError, match="session 1 runs another model than session 0"):
        respond_batch([s1, ChatSession(model=other_model, tokenizer=tok, config=CONFIG)])
    other_tok = ChatTokenizer.train(TEXTS * 5, vocab_size=280)
    with pytest.raises(ValueError, match=r"session 2 has another tokenizer than session 0 \(vocab_size \d+ vs \d+\)"):
        respond_batch([s1, s2, ChatSession(model=model, tokenizer=other_tok, config=CONFIG)])
    twin = ChatTokenizer.train(TEXTS * 5, vocab_size=300)  # an equal tokenizer (another object) is fine
    s3 = ChatSession(model=model, tokenizer=twin, config=CONFIG)
    s3.add_user("draw a red circle")
    with forced(model, tok, "text"):
        assert len(respond_batch([s1, s3], max_new_tokens=2, max_segments=1)) == 2


def test_bad_calls_change_nothing(model, tok):
    s1, s2 = chat(model, tok, "text"), chat(model, tok, "long")
    before = [(s.num_turns, s.contexts.full.num_tokens) for s in (s1, s2)]
    with pytest.raises(ValueError, match="no sessions"):
        respond_batch([])
    with pytest.raises(ValueError, match="a session appears twice"):
        respond_batch([s1, s1])
    with pytest.raises(ValueError, match="3 samplers for 2 sessions"):
        respond_batch([s1, s2], samplers=[SamplerConfig()] * 3)
    s2.add_assistant("ok")
    with pytest.raises(RuntimeError, match="last turn must be a user turn"):
        respond_batch([s1, s2])
    s2.rollback(s2.num_turns - 1)
    assert [(s.num_turns, s.contexts.full.num_tokens) for s in (s1, s2)] == before


def test_a_failure_mid_batch_restores_every_session(model, tok, monkeypatch):
    sessions = [chat(model, tok, "image+text"), chat(model, tok, "long")]
    state = [(s.num_turns, s.contexts.full.num_tokens, s.next_token_logits()) for s in sessions]
    samplers = [SamplerConfig(num_steps=1, seed=0), SamplerConfig(num_steps=4, seed=1)]
    calls = []
    inner = batch_module.run_together

    def failing(model_, tok_, steps):
        calls.append(len(steps))
        if len(calls) == 3:  # the first session has finished its reply; the second is mid-image
            raise KeyboardInterrupt
        return inner(model_, tok_, steps)

    monkeypatch.setattr(batch_module, "run_together", failing)
    with forced(model, tok, "image"), pytest.raises(KeyboardInterrupt):
        respond_batch(sessions, samplers=samplers, max_segments=1)
    assert calls == [2, 1, 1]
    for s, (turns, tokens, logits) in zip(sessions, state):
        assert (s.num_turns, s.contexts.full.num_tokens) == (turns, tokens)
        assert torch.equal(s.next_token_logits(), logits)
    monkeypatch.undo()
    with forced(model, tok, "image"):  # and they still reply
        assert [r.intents for r in respond_batch(sessions, samplers=samplers, max_segments=1)] == [["image"]] * 2
