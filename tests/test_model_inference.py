"""ChatUMM's inference surface: the noised-view chunk, the clean-chunk embedding, and the one routing loop that every
forward runs through (training, prefill, decoding, an Euler step's stacked CFG contexts, batched sessions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from chatumm_kit.components.layers import grid_rc
from chatumm_kit.components.mot import MoTBackbone, MoTDecoderLayer
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.packing import Packer
from chatumm_kit.inference.batch import respond_batch
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.session import ChatSession, SessionConfig
from chatumm_kit.model import NoisedView
from chatumm_kit.presets import build_model

TEXTS = ["draw a red circle", "what colour is it", "it is red", "make it blue", "a blue square"]
CONFIG = SessionConfig(vit_patch_size=8, vae_token_stride=8, max_image_side=32, image_size=(32, 32))


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.train(TEXTS * 5, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = build_model({"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": tok.vocab_size})
    with torch.no_grad():  # a non-zero velocity head, experts that differ
        for p in [*m.backbone.parameters(), *m.vae.llm2vae.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def image(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_noised_views_are_framed_by_vision_markers_and_embedded_in_one_call(model, tok):
    g = torch.Generator().manual_seed(0)
    views = [
        NoisedView(x_t=torch.randn(6, model.latent_token_dim, generator=g), t=0.7, grid=(2, 3)),
        NoisedView(x_t=torch.randn(4, model.latent_token_dim, generator=g), t=0.2, grid=(2, 2)),
    ]
    ids = (tok.vision_start_id, tok.vision_end_id)
    with torch.no_grad():
        both = model.embed_noised_views(views, vision_ids=ids)
        alone = [model.embed_noised_views([v], vision_ids=ids)[0] for v in views]
        markers = model.backbone.embed_tokens(torch.tensor(ids))
        for view, got, single in zip(views, both, alone):
            n = view.x_t.shape[0]
            assert got.hidden.shape == (n + 2, model.hidden_size)
            assert got.is_gen.tolist() == [False] + [True] * n + [False]  # markers und, latents gen (SPEC §4)
            assert torch.equal(got.hidden[0], markers[0]) and torch.equal(got.hidden[-1], markers[1])
            expected = model.vae.embed(view.x_t, torch.full((n,), view.t), grid_rc(*view.grid))
            torch.testing.assert_close(got.hidden[1:-1], expected, rtol=0, atol=1e-6)
            torch.testing.assert_close(got.hidden, single.hidden, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"view 0 has 6 latent tokens, its 2x2 grid needs 4"):
        model.embed_noised_views([NoisedView(x_t=views[0].x_t, t=0.5, grid=(2, 2))], vision_ids=ids)


def test_view_velocities_read_the_latent_tokens_only(model):
    g = torch.Generator().manual_seed(1)
    outs = [torch.randn(8, model.hidden_size, generator=g), torch.randn(3, model.hidden_size, generator=g)]
    with torch.no_grad():
        v = model.view_velocities(outs)
        assert [x.shape for x in v] == [(6, model.latent_token_dim), (1, model.latent_token_dim)]
        assert all(x.dtype == torch.float32 for x in v)
        torch.testing.assert_close(v[0], model.vae.velocity(outs[0][1:-1]), rtol=0, atol=1e-6)
        torch.testing.assert_close(v[1], model.vae.velocity(outs[1][1:2]), rtol=0, atol=1e-6)


def test_embed_without_flow_is_for_clean_chunks_only(model, tok):
    packer = Packer(tokenizer=tok, vit_patch_size=8, vae_token_stride=8, max_image_side=32)
    turns = [
        Turn(role=Role.USER, segments=[TextSegment(text="draw a red circle")]),
        Turn(role=Role.ASSISTANT, segments=[ImageSegment(image="a")]),
    ]
    generated = packer.pack([DialogueSample(dialogue=Dialogue(id="d", turns=turns), images={"a": image(0)}, key="d")])
    assert generated.num_noised_views == 1
    with pytest.raises(ValueError, match="the batch has 1 noised views; pass their flow"):
        model.embed_stream(generated)
    replay = [turns[0], Turn(role=Role.ASSISTANT, segments=[ImageSegment(image="a")], trainable=False)]
    clean = packer.pack([DialogueSample(dialogue=Dialogue(id="d", turns=replay), images={"a": image(0)}, key="d")])
    with torch.no_grad():
        inputs = model.embed_stream(clean)
    assert inputs.hidden.shape == (clean.seq_len, model.hidden_size)
    assert inputs.is_gen.nonzero().flatten().tolist() == clean.gen_indices.tolist()  # the clean VAE view's latents


def test_every_forward_runs_the_one_routing_loop(model, tok, monkeypatch):
    """Training, prefill, decoding, an Euler step's stacked CFG contexts and batched sessions all run the backbone's
    ``_route``: no caller runs the decoder layers through a loop of its own."""
    routes, layer_calls = [], []
    route = MoTBackbone._route

    def counting_route(self, hidden, *args, **kwargs):
        routes.append(hidden.shape[0])
        return route(self, hidden, *args, **kwargs)

    monkeypatch.setattr(MoTBackbone, "_route", counting_route)
    handles = [layer.register_forward_hook(lambda *a: layer_calls.append(1)) for layer in model.backbone.layers]
    try:
        packer = Packer(tokenizer=tok, vit_patch_size=8, vae_token_stride=8, max_image_side=32)
        turns = [
            Turn(role=Role.USER, segments=[TextSegment(text="draw a red circle")]),
            Turn(role=Role.ASSISTANT, segments=[ImageSegment(image="a"), TextSegment(text="a blue square")]),
        ]
        sample = DialogueSample(dialogue=Dialogue(id="d", turns=turns), images={"a": image(0)}, key="d")
        out = model(packer.pack([sample]))  # training forward (with autograd)
        assert out.mse_count == 16 and out.ce_count > 0 and len(routes) == 1
        sessions = [ChatSession(model=model, tokenizer=tok, config=CONFIG) for _ in range(2)]
        for i, s in enumerate(sessions):
            s.add_user("draw a red circle", images=[image(i)])
        sampler = SamplerConfig(num_steps=2, seed=0, cfg_interval=(0.0, 1.0))
        sessions[0].respond(sampler=sampler, max_new_tokens=3, max_segments=2, temperature=1.0)
        for s in sessions:
            s.add_user("make it blue")
        respond_batch(sessions, samplers=sampler, max_new_tokens=3, max_segments=2, temperature=1.0)
    finally:
        for h in handles:
            h.remove()
    assert isinstance(model.backbone.layers[0], MoTDecoderLayer)
    assert len(routes) > 10
    assert len(layer_calls) == len(routes) * len(model.backbone.layers)


def test_inference_reaches_the_model_only_through_its_public_surface():
    """``inference/`` drives a ChatUMM through its inference methods, never through its parts (issue 17): any
    attribute access named like a part of the model fails here with the file and line."""
    parts = {"backbone", "vae", "vit", "mask_builder", "lm_head", "embed_tokens", "layers"}
    package = Path(__file__).resolve().parents[1] / "src" / "chatumm_kit" / "inference"
    reaches = [
        f"{path.name}:{node.lineno} .{node.attr}"
        for path in sorted(package.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Attribute) and node.attr in parts
    ]
    assert len(list(package.glob("*.py"))) >= 10
    assert reaches == []
