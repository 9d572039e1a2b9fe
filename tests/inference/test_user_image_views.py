"""User images as BAGEL's understanding mode feeds them (SPEC §4.1: the ViT view only) on a tiny BAGEL-format
release: the stream of such a turn against a reference written from SPEC §2–3, edits still getting the VAE view,
and the default a converted (not kit-trained) model's session takes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from chatumm_kit.cli import main
from chatumm_kit.convert.provenance import PROVENANCE_FILE, WeightsOrigin, write_weights_origin
from chatumm_kit.data.dialogue import ImageSegment
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.session import ChatSession, SessionConfig, user_image_views_for
from chatumm_kit.model import ChatUMM
from chatumm_kit.training.loading import load_model_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny_bagel import PATCH, VIT_SIDE, make_tiny_bagel  # noqa: E402

SIDE = PATCH * VIT_SIDE  # 16-pixel images: a 4×4 ViT grid and a 4×4 latent grid
FAST = SamplerConfig(num_steps=2, seed=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_tiny_bagel(tmp_path_factory.mktemp("bagel") / "release").folder


@pytest.fixture(scope="module")
def loaded(release):
    out = load_model_folder(release)
    with torch.no_grad():  # make the experts differ (the release's generation expert is a copy) and v non-zero
        g = torch.Generator().manual_seed(0)
        for p in out.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return out


def picture(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def session(loaded, views: str) -> ChatSession:
    config = SessionConfig.for_model(loaded.model, image_size=SIDE, user_image_views=views)
    return ChatSession(model=loaded.model, tokenizer=loaded.tokenizer, config=config)


def full_chunks(model: ChatUMM, s: ChatSession, action):
    """The chunks ``action`` prefills into the session's full context."""
    seen = []
    inner = model.forward_chunk

    def spy(chunk):
        seen.append(chunk)
        return inner(chunk)

    model.forward_chunk = spy
    try:
        action()
    finally:
        del model.forward_chunk
    return [c for c in seen if c.cache is s.contexts.full.cache]


def test_vit_only_user_turn_is_the_stream_spec_describes(loaded):
    model, tok = loaded.model, loaded.tokenizer
    assert loaded.weights_origin is WeightsOrigin.BAGEL_RELEASE and user_image_views_for(loaded.weights_origin) == "vit"
    text, img = "what colour is it", picture(1)
    s = session(loaded, "vit")
    chunks = full_chunks(model, s, lambda: s.add_user(text, images=[img]))
    # the kit's layout of the same image (VAE then ViT) gives the ViT view's embeddings to compare with
    kit = session(loaded, "vae+vit")
    kit_chunks = full_chunks(model, kit, lambda: kit.add_user(text, images=[img]))

    # Reference (SPEC §2-3, BAGEL's understanding input): v_s, 16 ViT tokens, v_e all at position 0 (one image
    # position, bidirectional inside), then im_s text im_e from position 1, causal; no VAE token, so no token of
    # the generation expert.
    ids = tok.encode_segment(text, role="user", first_in_turn=True)
    n_vit = VIT_SIDE * VIT_SIDE
    n_image, n_text = n_vit + 2, len(ids) + 2
    markers = [tok.vision_start_id, *([-1] * n_vit), tok.vision_end_id, tok.im_start_id, *ids, tok.im_end_id]
    positions = [0] * n_image + list(range(1, 1 + n_text))
    hidden = torch.cat([c.hidden for c in chunks])
    assert hidden.shape[0] == n_image + n_text == s.contexts.full.num_tokens
    assert torch.cat([c.position_ids for c in chunks]).tolist() == positions
    assert not torch.cat([c.is_gen for c in chunks]).any()
    known = torch.tensor([i for i in markers if i >= 0])
    rows = [i for i, m in enumerate(markers) if m >= 0]
    torch.testing.assert_close(hidden[rows], model.embed_text(known), atol=0, rtol=0)
    kit_hidden = torch.cat([c.hidden for c in kit_chunks])
    vit_rows = slice(n_image + 1, 2 * n_image - 1)  # the kit layout: VAE view (18 rows), then the ViT view
    torch.testing.assert_close(hidden[1 : n_image - 1], kit_hidden[vit_rows], atol=1e-6, rtol=0)
    assert s.position == 1 + n_text
    # one dense forward of the reference stream with the SPEC mask (image block bidirectional, text causal and
    # seeing the image) gives the session's cache and its next-token logits
    mask = torch.tril(torch.ones(len(markers), len(markers), dtype=torch.bool))
    mask[:n_image, :n_image] = True
    cache = model.backbone.new_kv_cache()
    n = len(markers)
    with torch.no_grad():
        out = model.backbone(
            hidden,
            position_ids=torch.tensor(positions),
            und_indices=torch.arange(n),
            gen_indices=torch.zeros(0, dtype=torch.long),
            attn_mask=mask,
            kv_cache=cache,
            commit=True,
        )
    for layer in range(cache.num_layers):
        torch.testing.assert_close(s.contexts.full.cache.keys(layer), cache.keys(layer), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.next_token_logits(), model.logits(out[-1]).float(), atol=1e-4, rtol=0)


def same_full_context(a: ChatSession, b: ChatSession) -> None:
    x, y = a.contexts.full, b.contexts.full
    assert (x.num_tokens, x.position) == (y.num_tokens, y.position)
    for layer in range(x.cache.num_layers):
        torch.testing.assert_close(x.cache.keys(layer), y.cache.keys(layer), atol=1e-5, rtol=0)


def test_text_reply_keeps_the_vit_view_and_an_edit_gets_vae_and_vit(loaded, tmp_path):
    model, tok = loaded.model, loaded.tokenizer
    s = session(loaded, "vit")
    s.add_user("what colour is it", images=[picture(1)])
    s.respond(mode="text", max_new_tokens=2)
    assert s.dialogue.turns[0].segments[0] == ImageSegment(image="img0", views="vit")
    assert s.dialogue.to_dict()["turns"][0]["segments"][0] == {"type": "image", "image": "img0", "views": "vit"}
    reloaded = ChatSession.load(s.save(tmp_path / "text"), model=model, tokenizer=tok)
    assert reloaded.dialogue.to_dict() == s.dialogue.to_dict()
    same_full_context(reloaded, s)

    s.add_user("make it blue", images=[picture(2)])
    replies = []
    chunks = full_chunks(model, s, lambda: replies.append(s.respond(mode="edit", sampler=FAST)))
    # BAGEL's edit input is VAE + ViT (SPEC §4.1): the request's image was laid out again before the edit (its clean
    # VAE view: 16 latent tokens of the generation expert), then the edited image entered (VAE view too)
    assert [int(c.is_gen.sum()) for c in chunks if c.is_gen.any()] == [VIT_SIDE * VIT_SIDE] * 2
    assert chunks[0].is_gen.any()  # the first thing the edit did
    views = [seg.views for t in s.dialogue.turns for seg in t.segments if isinstance(seg, ImageSegment)]
    assert views == ["vit", "vae+vit", "vae+vit"]  # the first image stays as it entered; the generated one is VAE+ViT
    assert tuple(replies[0].images[0].shape) == (3, SIDE, SIDE)  # the edited image's size
    reloaded = ChatSession.load(s.save(tmp_path / "edit"), model=model, tokenizer=tok)
    same_full_context(reloaded, s)
    s.rollback(2)  # back before the edit request: its image is gone, the first turn as it was
    same_full_context(s, ChatSession.load(tmp_path / "text", model=model, tokenizer=tok))


def test_converted_folders_default_to_vit_and_kit_trained_ones_to_vae_and_vit(release, tmp_path, capsys):
    kit = tmp_path / "kit"
    assert main(["convert", "bagel-to-kit", str(release), str(kit)]) == 0
    assert json.loads((kit / PROVENANCE_FILE).read_text()) == {"weights": "bagel_release"}
    write_png(picture(3), str(tmp_path / "p.png"))
    script = tmp_path / "s.jsonl"
    script.write_text(json.dumps({"user": "what colour is it", "images": ["p.png"]}) + "\n")
    flags = ["--script", str(script), "--out", str(tmp_path / "o"), "--mode", "text", "--max-new-tokens", "2"]
    flags += ["--image-size", str(SIDE), str(SIDE)]
    for folder in (release, kit):
        assert main(["chat", str(folder), *flags]) == 0, capsys.readouterr().err
        assert "user images enter as: vit (bagel_release weights" in capsys.readouterr().out
    assert main(["chat", str(kit), *flags, "--user-image-views", "vae+vit"]) == 0
    assert "user images enter as: vae+vit" in capsys.readouterr().out
    write_weights_origin(kit, WeightsOrigin.KIT_TRAINED)  # e.g. what `chatumm adapter merge` writes
    assert main(["chat", str(kit), *flags]) == 0
    assert "user images enter as: vae+vit (kit_trained" in capsys.readouterr().out
    out = tmp_path / "bagel_again"
    assert main(["convert", "kit-to-bagel", str(kit), str(out)]) == 0  # the record travels with the weights
    assert json.loads((out / PROVENANCE_FILE).read_text()) == {"weights": "kit_trained"}


def test_think_edit_also_gets_the_vae_view(loaded):
    s = session(loaded, "vit")
    s.add_user("make it blue", images=[picture(2)])
    reply = s.respond(mode="think_edit", sampler=FAST, max_new_tokens=2)
    assert reply.intents[-2:] == ["image", "end"]
    roles = [t.role.value for t in s.dialogue.turns]
    assert roles == ["system", "user", "assistant"]  # BAGEL's think prompt before the request (SPEC §4.1)
    assert s.dialogue.turns[1].segments[0].views == "vae+vit"
    assert tuple(reply.images[0].shape) == (3, SIDE, SIDE)
