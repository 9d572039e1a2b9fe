"""Chat sessions under a view sizing policy: BAGEL's views with a BAGEL-strided tiny model, 1024² and 4:3 / 16:9
outputs, edits answered at the input's (VAE-resized) size, the position tables checked, and the setting saved."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.view_sizing import ViewRule, ViewSizing
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.session import ChatSession, SessionConfig
from chatumm_kit.presets import build_model

TEXTS = ["draw a kite", "make it night", "a kite at night"]
ONE_STEP = SamplerConfig(num_steps=2, seed=0, cfg_text_scale=1.0, cfg_image_scale=1.0)


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.train(TEXTS * 5, vocab_size=280)


@pytest.fixture(scope="module")
def bagel_strided(tok):
    """chatumm_tiny with BAGEL's strides and tables: ViT patch 14 (70 per side), VAE 8× × latent patch 2 (64)."""
    torch.manual_seed(0)
    spec = {"preset": "chatumm_tiny", "vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64,
            "num_layers": 1, "vit_patch_size": 14, "vit_hidden": 32, "vit_layers": 1, "vit_max_side": 70,
            "vae_downsample": 8, "max_latent_side": 64}  # fmt: skip
    return build_model(spec).eval()


@contextmanager
def answer_with_an_image(model, tok):
    """Force the intents ``v_s`` then ``<|end|>`` (the random model would choose anything)."""
    calls = []

    def hook(module, args, out):
        bias = torch.zeros_like(out)
        bias[..., tok.vision_start_id if not calls else tok.end_id] = 100.0
        calls.append(1)
        return out + bias

    handle = model.backbone.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _photo(width: int, height: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(width))


@pytest.mark.slow  # a 1024² image through the tiny autoencoder takes about a minute on a loaded CPU
def test_bagel_session_generates_a_1024_square_image(bagel_strided, tok):
    session = ChatSession(
        model=bagel_strided, tokenizer=tok, config=SessionConfig(view_sizing="bagel", image_size=(1024, 1024))
    )
    session.add_user("draw a kite")
    with answer_with_an_image(bagel_strided, tok):
        reply = session.respond(sampler=ONE_STEP)
    assert tuple(reply.images[0].shape) == (3, 1024, 1024)


def test_bagel_session_answers_edits_at_the_input_size(bagel_strided, tok):
    session = ChatSession(
        model=bagel_strided, tokenizer=tok, config=SessionConfig(view_sizing="bagel", image_size=(1024, 1024))
    )
    session.add_user("draw a kite")
    assert session.reply_image_size() == (1024, 1024)
    # 1024² is reachable: its ViT copy re-enters at 980 × 980, 70 × 70 patches (the table's limit), 64² latents
    assert session.packer.view_sizes(1024, 1024) == ((980, 980), (1024, 1024))
    session.add_user("make it night", images=[_photo(600, 800)])  # an edit: width 600, height 800
    assert session.reply_image_size() == (800, 608)
    session.add_user("a kite at night")  # same user block: the block's image still decides
    assert session.reply_image_size() == (800, 608)


def test_an_edit_reply_is_generated_at_the_input_size(tok):
    """End to end on chatumm_tiny (capped sizing, cheap pixels): a 24 × 48 input is answered with a 24 × 48 image,
    a text-only request with the configured 32 × 32."""
    torch.manual_seed(0)
    model = build_model({"preset": "chatumm_tiny", "vocab_size": tok.vocab_size}).eval()
    config = SessionConfig(vit_patch_size=8, vae_token_stride=8, max_image_side=64, image_size=(32, 32))
    session = ChatSession(model=model, tokenizer=tok, config=config)
    session.add_user("make it night", images=[_photo(48, 24)])
    with answer_with_an_image(model, tok):
        edited = session.respond(sampler=ONE_STEP)
    session.add_user("draw a kite")
    with answer_with_an_image(model, tok):
        drawn = session.respond(sampler=ONE_STEP)
    assert tuple(edited.images[0].shape) == (3, 24, 48) and tuple(drawn.images[0].shape) == (3, 32, 32)


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [((768, 1024), (768, 1024)), ((1024, 768), (1024, 768)), ((576, 1024), (576, 1024)), ((1024, 576), (1024, 576))],
)
def test_4_3_and_16_9_outputs_are_reachable(bagel_strided, tok, image_size, expected):
    session = ChatSession(
        model=bagel_strided, tokenizer=tok, config=SessionConfig(view_sizing="bagel", image_size=image_size)
    )
    session.add_user("draw a kite")
    assert session.reply_image_size() == expected


def test_edits_at_input_size_can_be_switched_off(bagel_strided, tok):
    config = SessionConfig(view_sizing="bagel", image_size=(1024, 1024), edits_at_input_size=False)
    session = ChatSession(model=bagel_strided, tokenizer=tok, config=config)
    session.add_user("make it night", images=[_photo(1000, 250)])
    assert session.reply_image_size() == (1024, 1024)


def test_position_tables_and_strides_are_checked(bagel_strided, tok):
    wide = ViewSizing(vit=ViewRule(max_side=1024, stride=14), vae=ViewRule(max_side=1024, stride=16))
    with pytest.raises(ValueError, match="position table has 70"):
        ChatSession(model=bagel_strided, tokenizer=tok, config=SessionConfig(view_sizing=wide))
    with pytest.raises(ValueError, match="vit_patch_size=8 disagrees"):
        SessionConfig(view_sizing="bagel", vit_patch_size=8)


def test_view_sizing_survives_save_and_load(bagel_strided, tok, tmp_path):
    session = ChatSession(model=bagel_strided, tokenizer=tok, config=SessionConfig(view_sizing="bagel"))
    session.add_user("draw a kite")
    loaded = ChatSession.load(session.save(tmp_path / "chat"), model=bagel_strided, tokenizer=tok)
    assert loaded.config == session.config and loaded.config.sizing == ViewSizing.bagel()
    assert loaded.reply_image_size() == (512, 512)  # SessionConfig's default image_size, under BAGEL's VAE rule
