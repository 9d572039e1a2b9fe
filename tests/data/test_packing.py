"""Packer: random dialogues against a per-token reference of SPEC §2–3, image views, dropout, multi-document
packing, errors, and the token-budget batcher."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatumm_kit.components.batch import PackedBatch
from chatumm_kit.components.splits import AttnMode, Modality
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import Dialogue, DialogueError, DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.image_views import fit_size, grid_rc, resize_image, vae_pixels, vit_patches
from chatumm_kit.data.packing import (
    CFGDropRates,
    Packer,
    PackingError,
    PackingStats,
    TokenBudgetBatcher,
)

WORDS = ["draw", "a", "cat", "red", "blue", "what", "is", "two", "plus", "four", "ok", "make", "the", "<|im_end|>"]
CORPUS = [" ".join(WORDS[i : i + 4]) for i in range(len(WORDS))] * 20
P = 16  # ViT patch = VAE token stride in these tests: a 32x48 image is a 2x3 grid in both views
NONE = CFGDropRates.disabled()
ALL = CFGDropRates(text=1.0, vit=1.0, vae=1.0)


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.train(CORPUS, vocab_size=320, user_prefix="U: ")


def make_packer(tok: ChatTokenizer, drop: CFGDropRates | dict = NONE, **kw) -> Packer:
    return Packer(tokenizer=tok, vit_patch_size=P, vae_token_stride=P, max_image_side=64, drop_rates=drop, **kw)


# ---------------------------------------------------------------------- reference (one token at a time)
@dataclass
class RefToken:
    id: int
    pos: int
    split: int  # running split number inside the document
    modality: Modality
    turn: int
    image: str | None = None
    label: int | None = None


def reference_stream(sample: DialogueSample, tok: ChatTokenizer, *, drop_droppable: bool) -> list[RefToken]:
    """SPEC §2–3 written token by token, for images whose sides are multiples of P (grid = side / P).

    With ``drop_droppable`` every droppable text and every droppable clean/ViT view is removed (rate 1).
    """
    out: list[RefToken] = []
    pos, split = 0, 0
    turns = sample.dialogue.turns
    units_of_turn: list[list[tuple[int, int | None]]] = []  # per turn: (opening id, index of intent holder)
    for t, turn in enumerate(turns):
        sup = turn.role is Role.ASSISTANT and turn.trainable
        units: list[tuple[int, int | None]] = []
        first_text = True
        for seg in turn.segments:
            if isinstance(seg, TextSegment):
                content = tok.encode_segment(seg.text, role=turn.role.value, first_in_turn=first_text)
                first_text = False
                if drop_droppable and seg.droppable:
                    continue
                ids = [tok.im_start_id, *content, tok.im_end_id]
                for k, i in enumerate(ids):
                    label = ids[k + 1] if sup and k + 1 < len(ids) else None
                    out.append(RefToken(i, pos + k, split, Modality.TEXT, t, label=label))
                pos += len(ids)
                split += 1
                units.append((tok.im_start_id, len(out) - 1))
                continue
            h, w = sample.images[seg.image].shape[1:]
            n = (h // P) * (w // P)
            views = ([Modality.VAE_NOISED] if sup else []) + [Modality.VAE_CLEAN, Modality.VIT]
            holder = None
            for m in views:
                if m is not Modality.VAE_NOISED and drop_droppable and seg.droppable:
                    pos += 1
                    continue
                ids = [tok.vision_start_id, *[tok.pad_id] * n, tok.vision_end_id]
                out.extend(RefToken(i, pos, split, m, t, image=seg.image) for i in ids)
                split += 1
                if m is not Modality.VAE_NOISED:
                    pos += 1
                if m is Modality.VIT:
                    holder = len(out) - 1
            units.append((tok.vision_start_id, holder))
        units_of_turn.append(units)
        if sup:
            for u, (_, holder) in enumerate(units):
                if holder is not None:
                    out[holder].label = units[u + 1][0] if u + 1 < len(units) else tok.end_id
            prev = [x for x in out if x.turn == t - 1]
            if units and t > 0 and turns[t - 1].role is Role.USER and prev:
                if prev[-1].modality in (Modality.TEXT, Modality.VIT):
                    prev[-1].label = units[0][0]
    return out


def check_against_reference(batch: PackedBatch, ref: list[RefToken], tok: ChatTokenizer, start: int = 0) -> None:
    n = len(ref)
    sl = slice(start, start + n)
    assert batch.input_ids[sl].tolist() == [r.id for r in ref]
    assert batch.position_ids[sl].tolist() == [r.pos for r in ref]
    ce = dict(zip(batch.ce_indices.tolist(), batch.ce_labels.tolist()))
    got = {i - start: y for i, y in ce.items() if start <= i < start + n}
    assert got == {k: r.label for k, r in enumerate(ref) if r.label is not None}
    # Split rows: one per reference split, with the mode implied by the modality.
    mode = {Modality.TEXT: AttnMode.CAUSAL, Modality.VIT: AttnMode.FULL}
    mode |= {Modality.VAE_CLEAN: AttnMode.FULL, Modality.VAE_NOISED: AttnMode.NOISE}
    rows = [r for r in batch.splits.rows() if start <= r[0] < start + n]
    want = []
    for k, r in enumerate(ref):
        if k == 0 or ref[k - 1].split != r.split:
            want.append([start + k, 0, mode[r.modality], r.modality])
        want[-1][1] += 1
    assert [[s, ln, md, mo] for s, ln, md, _, mo in rows] == want


# ---------------------------------------------------------------------- random dialogues
@st.composite
def samples(draw, *, max_turns: int = 6) -> DialogueSample:
    n_turns = draw(st.integers(1, max_turns))
    turns = []
    for t in range(n_turns):
        role = Role.USER if t == 0 else draw(st.sampled_from([Role.USER, Role.ASSISTANT, Role.ASSISTANT]))
        segs = []
        for _ in range(draw(st.integers(1, 3))):
            drop = draw(st.booleans())
            if draw(st.booleans()):
                text = " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=5)))
                segs.append(TextSegment(text=text, droppable=drop))
            else:
                segs.append(ImageSegment(image=draw(st.sampled_from(["i0", "i1", "i2"])), droppable=drop))
        turns.append(Turn(role=role, segments=segs, trainable=draw(st.booleans())))
    dialogue = Dialogue(id=f"d{draw(st.integers(0, 999))}", turns=turns)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    images = {}
    for key in dialogue.image_keys:
        h, w = draw(st.sampled_from([(16, 16), (32, 48), (48, 32)]))
        images[key] = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
    return DialogueSample(dialogue=dialogue, images=images, key=f"k{draw(st.integers(0, 999))}")


def check_structure(batch: PackedBatch, tok: ChatTokenizer) -> None:
    """Invariants that hold for any packing, with or without dropout."""
    L = batch.seq_len
    assert batch.splits.seq_len == L and batch.position_ids.numel() == L
    every = torch.arange(L)
    und, gen = batch.und_indices, batch.gen_indices
    assert torch.equal(torch.sort(torch.cat([und, gen])).values, every)  # und ∪ gen partitions [0, L)
    assert torch.equal(gen, batch.vae_indices)
    assert torch.equal(torch.sort(torch.cat([batch.text_indices, batch.vit_indices, batch.vae_indices])).values, every)
    assert torch.equal(und, torch.sort(torch.cat([batch.text_indices, batch.vit_indices])).values)
    image_inner = torch.cat([batch.vit_indices, batch.vae_indices])
    assert bool((batch.input_ids[image_inner] == tok.pad_id).all())
    assert tok.end_id not in batch.input_ids.tolist()  # <|end|> is a label only
    docs = batch.splits.docs.tolist()
    assert docs == sorted(docs)
    ce = dict(zip(batch.ce_indices.tolist(), batch.ce_labels.tolist()))
    assert batch.ce_indices.tolist() == sorted(ce)
    assert tok.pad_id not in ce.values()
    vit_i = vae_i = 0
    modes = {Modality.TEXT: AttnMode.CAUSAL, Modality.VIT: AttnMode.FULL, Modality.PAD: AttnMode.CAUSAL}
    modes |= {Modality.VAE_CLEAN: AttnMode.FULL, Modality.VAE_NOISED: AttnMode.NOISE}
    for s, n, mode, doc, mod in batch.splits.rows():
        assert mode is modes[mod]
        ids = batch.input_ids[s : s + n].tolist()
        pos = batch.position_ids[s : s + n]
        if mod is Modality.TEXT:
            assert ids[0] == tok.im_start_id and ids[-1] == tok.im_end_id
            assert not set(ids[1:-1]) & set(tok.special_ids.values())  # typed markers never become markers
            assert torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + n))
        elif mod is Modality.PAD:
            assert set(ids) == {tok.pad_id} and doc == len(batch.sample_keys)
        else:
            assert ids[0] == tok.vision_start_id and ids[-1] == tok.vision_end_id
            assert bool((pos == pos[0]).all())  # one position per image view, markers included
            assert not set(range(s, s + n - 1)) & set(ce)  # CE at most on the closing marker...
            if mod is not Modality.VIT:
                assert s + n - 1 not in ce  # ...and never in a VAE view
            inner = torch.arange(s + 1, s + n - 1)
            if mod is Modality.VIT:
                assert torch.equal(batch.vit_indices[vit_i : vit_i + n - 2], inner)
                vit_i += n - 2
            else:
                assert torch.equal(batch.vae_indices[vae_i : vae_i + n - 2], inner)
                vae_i += n - 2
    # Per-view grids agree with the token tables.
    assert batch.vit_patch_rc.shape[0] == int(batch.vit_grid_hw.prod(1).sum()) == batch.vit_indices.numel()
    assert batch.vae_token_rc.shape[0] == int(batch.vae_grid_hw.prod(1).sum()) == batch.vae_indices.numel()
    counts = torch.bincount(batch.vae_token_view, minlength=len(batch.vae_view_image))
    assert torch.equal(counts, batch.vae_grid_hw.prod(1))
    assert batch.vit_patches.shape == (batch.vit_indices.numel(), P * P * 3)


def noised_followed_by_clean_copy(batch: PackedBatch) -> None:
    rows = batch.splits.rows()
    view = 0
    for k, (s, _, _, _, mod) in enumerate(rows):
        if mod is Modality.VAE_NOISED:
            nxt = rows[k + 1]
            assert nxt[4] is Modality.VAE_CLEAN
            assert int(batch.position_ids[nxt[0]]) == int(batch.position_ids[s])
            assert int(batch.vae_view_image[view]) == int(batch.vae_view_image[view + 1])
            assert not bool(batch.vae_view_noised[view + 1])
        view += mod in (Modality.VAE_CLEAN, Modality.VAE_NOISED)


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(sample=samples())
def test_random_dialogue_matches_reference_without_dropout(tok, sample) -> None:
    packer = make_packer(tok)
    batch = packer.pack([sample])
    ref = reference_stream(sample, tok, drop_droppable=False)
    check_against_reference(batch, ref, tok)
    check_structure(batch, tok)
    noised_followed_by_clean_copy(batch)
    assert batch.num_real_tokens == batch.seq_len == packer.measure(sample) == len(ref)
    # One VAE image per distinct image of the document; noised views exactly for trainable assistant images.
    assert len(batch.vae_images) == len(sample.dialogue.image_keys)
    n_targets = sum(len(t.image_keys) for t in sample.dialogue.turns if t.role is Role.ASSISTANT and t.trainable)
    assert batch.num_noised_views == n_targets


@SETTINGS
@given(sample=samples())
def test_rate_one_drops_every_droppable_segment(tok, sample) -> None:
    batch = make_packer(tok, drop=ALL).pack([sample], generator=torch.Generator().manual_seed(0))
    check_against_reference(batch, reference_stream(sample, tok, drop_droppable=True), tok)
    check_structure(batch, tok)


@SETTINGS
@given(sample=samples(), seed=st.integers(0, 2**31))
def test_random_dropout_is_seeded_and_keeps_invariants(tok, sample, seed) -> None:
    packer = make_packer(tok, drop=CFGDropRates(text=0.5, vit=0.5, vae=0.5))
    a = packer.pack([sample], generator=torch.Generator().manual_seed(seed))
    b = packer.pack([sample], generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.ce_labels, b.ce_labels)
    check_structure(a, tok)
    assert a.num_real_tokens <= packer.measure(sample)
    assert a.num_noised_views == make_packer(tok).pack([sample]).num_noised_views  # targets are never dropped


# ---------------------------------------------------------------------- dropout details
def _dialogue(*turns: Turn) -> DialogueSample:
    d = Dialogue(id="dd", turns=list(turns))
    keys = d.image_keys
    return DialogueSample(dialogue=d, images={k: torch.zeros(3, 32, 32, dtype=torch.uint8) for k in keys}, key="kk")


def test_dropped_user_image_keeps_later_positions_and_dropped_text_shifts_them(tok) -> None:
    sample = _dialogue(
        Turn(role=Role.USER, segments=[ImageSegment("x", droppable=True), TextSegment("red cat", droppable=True)]),
        Turn(role=Role.ASSISTANT, segments=[TextSegment("ok")]),
    )
    full = make_packer(tok).pack([sample])
    img_only = make_packer(tok, drop=CFGDropRates(text=0.0, vit=1.0, vae=1.0)).pack([sample])
    both = make_packer(tok, drop=ALL).pack([sample])
    n_text, n_ok = 2 + len(tok.encode("U: red cat")), 2 + len(tok.encode("ok"))
    # Dropping both views: 12 tokens gone, but the text starts at position 2 as before.
    assert img_only.seq_len == full.seq_len - 12
    assert torch.equal(img_only.position_ids, full.position_ids[12:])
    # Dropping the user text too: the assistant reply moves back by exactly the text's length.
    assert both.position_ids.tolist() == list(range(2, 2 + n_ok))
    assert full.position_ids[-n_ok:].tolist() == list(range(2 + n_text, 2 + n_text + n_ok))
    # No hand-over label: the user turn has no kept token left; the reply is fully supervised.
    assert both.ce_indices.tolist() == list(range(n_ok))


def test_a_vit_only_user_image_has_one_view_at_one_position(tok) -> None:
    """``ImageSegment(views="vit")`` (BAGEL's understanding input, SPEC §4.1): v_s + 4 ViT tokens + v_e at position
    0, the text from position 1 — one clean view fewer than the default, so one position fewer."""
    turns = lambda views: (  # noqa: E731
        Turn(role=Role.USER, segments=[ImageSegment("x", views=views), TextSegment("red cat")]),
        Turn(role=Role.ASSISTANT, segments=[TextSegment("ok")]),
    )
    both, vit = (make_packer(tok).pack([_dialogue(*turns(v))]) for v in ("vae+vit", "vit"))
    assert vit.seq_len == both.seq_len - 6 and torch.equal(vit.position_ids[6:], both.position_ids[12:] - 1)
    assert vit.position_ids[:7].tolist() == [0] * 6 + [1]
    assert torch.equal(vit.input_ids[:6], both.input_ids[6:12])  # the same ViT view (markers and placeholders)
    assert vit.gen_indices.numel() == 0 and both.gen_indices.numel() == 4  # no VAE token: no generation expert
    assert vit.ce_indices.numel() == both.ce_indices.numel()
    d = Dialogue(id="v", turns=list(turns("vit")))
    assert Dialogue.from_dict(d.to_dict()) == d and d.to_dict()["turns"][0]["segments"][0]["views"] == "vit"
    with pytest.raises(DialogueError, match="'views' must be one of"):
        Dialogue.from_dict(
            {"id": "v", "turns": [{"role": "user", "segments": [{"type": "image", "image": "x", "views": "vae"}]}]}
        )
    with pytest.raises(DialogueError, match="assistant image enters as 'vae\\+vit' only"):
        Dialogue(
            id="v", turns=[turns("vae+vit")[0], Turn(role=Role.ASSISTANT, segments=[ImageSegment("y", views="vit")])]
        ).validate()


def test_rate_zero_draws_nothing_from_the_generator(tok) -> None:
    sample = _dialogue(Turn(role=Role.USER, segments=[TextSegment("cat", droppable=True), ImageSegment("x", True)]))
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    make_packer(tok).pack([sample], generator=g)
    assert torch.equal(g.get_state(), state)


def test_dropped_generated_vit_view_loses_its_intent_label_only(tok) -> None:
    sample = _dialogue(
        Turn(role=Role.USER, segments=[TextSegment("draw")]),
        Turn(role=Role.ASSISTANT, segments=[ImageSegment("y", droppable=True), TextSegment("ok")]),
    )
    full = make_packer(tok).pack([sample])
    dropped = make_packer(tok, drop=ALL).pack([sample])
    nu = 2 + len(tok.encode("U: draw"))
    # full: user text (nu) noised (6) clean (6) vit (6) text; dropped: user text (nu) noised (6) text
    assert [r[4] for r in dropped.splits.rows()] == [Modality.TEXT, Modality.VAE_NOISED, Modality.TEXT]
    assert dropped.num_noised_views == 1
    full_ce = dict(zip(full.ce_indices.tolist(), full.ce_labels.tolist()))
    drop_ce = dict(zip(dropped.ce_indices.tolist(), dropped.ce_labels.tolist()))
    assert full_ce[nu - 1] == drop_ce[nu - 1] == tok.vision_start_id  # hand-over: the reply opens with an image
    assert full_ce[nu + 17] == tok.im_start_id  # ViT v_e of the generated image → the text that follows
    assert not set(range(nu, nu + 6)) & set(drop_ce)  # the intent is not moved into the noised view
    assert dropped.position_ids[nu + 6 :].tolist() == full.position_ids[nu + 18 :].tolist()  # views still advance


# ---------------------------------------------------------------------- image views
def test_fit_size_keeps_aspect_and_caps() -> None:
    assert fit_size(32, 48, multiple=14, max_side=980) == (28, 42)
    assert fit_size(2000, 1000, multiple=14, max_side=980) == (980, 490)
    assert fit_size(10, 1000, multiple=16, max_side=512) == (16, 512)
    assert fit_size(5, 5, multiple=16, max_side=512) == (16, 16)
    with pytest.raises(ValueError, match="smaller than one grid cell"):
        fit_size(32, 32, multiple=16, max_side=8)


def test_vit_patches_order_and_normalisation() -> None:
    img = torch.randint(0, 256, (3, 28, 42), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = img.float()
    patches = vit_patches(x, patch=14, mean=(0.5, 0.4, 0.3), std=(0.5, 0.25, 0.2))
    assert patches.shape == (6, 14 * 14 * 3)
    norm = (x / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.5, 0.25, 0.2]).view(3, 1, 1)
    for r in range(2):
        for c in range(3):
            block = norm[:, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14]  # [C, p_row, p_col]
            assert torch.allclose(patches[r * 3 + c], block.permute(1, 2, 0).reshape(-1))
    # (row-in-patch, col-in-patch, channel): element 1 is channel 1 of pixel (0, 0), element 3 is pixel (0, 1).
    assert torch.isclose(patches[0, 1], norm[1, 0, 0]) and torch.isclose(patches[0, 3], norm[0, 0, 1])
    assert grid_rc(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_vae_pixels_range_and_resize_identity() -> None:
    img = torch.tensor([0, 255, 51], dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16).contiguous()
    px = vae_pixels(resize_image(img, (16, 16)))
    assert px[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])
    up = resize_image(img, (32, 48))
    assert up.shape == (3, 32, 48) and torch.allclose(up[:, 5, 7], img[:, 0, 0].float(), atol=1e-3)


def test_packer_resizes_views_independently(tok) -> None:
    packer = Packer(tokenizer=tok, vit_patch_size=14, vae_token_stride=16, max_image_side=64, drop_rates=NONE)
    img = torch.randint(0, 256, (3, 40, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    sample = DialogueSample(
        dialogue=Dialogue(id="r", turns=[Turn(role=Role.USER, segments=[ImageSegment("z")])]), images={"z": img}
    )
    batch = packer.pack([sample])
    # scale = 56 / 100 (ViT cap 56) → 22.4 x 56 → 2 x 4 patches; VAE cap 64: 25.6 x 64 → 2 x 4 tokens.
    assert batch.vit_grid_hw.tolist() == [[2, 4]] and batch.vae_grid_hw.tolist() == [[2, 4]]
    assert batch.vae_images[0].shape == (3, 32, 64)
    assert float(batch.vae_images[0].min()) >= -1.0 and float(batch.vae_images[0].max()) <= 1.0
    expected = vit_patches(resize_image(img, (28, 56)), patch=14, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert torch.equal(batch.vit_patches, expected)
    assert batch.vit_patch_rc.tolist() == grid_rc(2, 4).tolist() == batch.vae_token_rc.tolist()
    assert packer.measure(sample) == 2 * (2 + 8)


# ---------------------------------------------------------------------- several documents, padding, errors
def test_two_documents_end_to_end_with_padding(tok) -> None:
    a = _dialogue(
        Turn(role=Role.USER, segments=[TextSegment("draw")]), Turn(role=Role.ASSISTANT, segments=[ImageSegment("p")])
    )
    b = _dialogue(
        Turn(role=Role.USER, segments=[ImageSegment("q"), TextSegment("what")]),
        Turn(role=Role.ASSISTANT, segments=[TextSegment("ok")]),
    )
    b.key = "kb"
    packer = make_packer(tok, pad_to_multiple=8)
    one_a, one_b = packer.pack([a]), packer.pack([b])
    na, nb = packer.measure(a), packer.measure(b)
    batch = packer.pack([a, b], token_budget=256)
    assert batch.seq_len == 256 and batch.token_budget == 256 and batch.num_real_tokens == na + nb
    assert batch.sample_keys == ["kk", "kb"]
    check_structure(batch, tok)
    check_against_reference(batch, reference_stream(a, tok, drop_droppable=False), tok)
    check_against_reference(batch, reference_stream(b, tok, drop_droppable=False), tok, start=na)
    assert batch.position_ids[na] == 0  # each document starts at position 0
    assert batch.splits.rows()[-1] == (na + nb, 256 - na - nb, AttnMode.CAUSAL, 2, Modality.PAD)
    assert batch.position_ids[na + nb :].tolist() == list(range(256 - na - nb))
    # Image slots are global: b's images come after a's.
    assert batch.vae_view_image.tolist() == [0, 0, 1] and len(batch.vae_images) == 2
    assert torch.equal(batch.ce_indices[: one_a.ce_indices.numel()], one_a.ce_indices)
    assert torch.equal(batch.ce_indices[one_a.ce_indices.numel() :], one_b.ce_indices[: one_b.ce_indices.numel()] + na)
    # Without a budget: padded to the next multiple of 8.
    plain = packer.pack([a, b])
    assert plain.seq_len % 8 == 0 and plain.seq_len - 8 < na + nb <= plain.seq_len
    assert plain.token_budget == plain.seq_len


def test_errors_name_the_sample_and_turn(tok) -> None:
    packer = make_packer(tok)
    d = Dialogue(id="dlg", turns=[Turn(role=Role.USER, segments=[TextSegment("hi"), ImageSegment("gone")])])
    with pytest.raises(PackingError, match=r"sample 's7' \(dialogue 'dlg'\).*turn 0 segment 1.*'gone'"):
        packer.pack([DialogueSample(dialogue=d, images={}, key="s7")])
    bad = DialogueSample(dialogue=d, images={"gone": torch.zeros(3, 8, 8)}, key="s8")
    with pytest.raises(PackingError, match=r"sample 's8'.*turn 0 \(user\) segment 1: image 'gone' must be uint8"):
        packer.pack([bad])
    ok = _dialogue(Turn(role=Role.USER, segments=[TextSegment("draw a cat")]))
    with pytest.raises(PackingError, match=r"exceed token_budget=4 \('kk': "):
        packer.pack([ok], token_budget=4)
    with pytest.raises(PackingError, match="multiple of pad_to_multiple=8"):
        make_packer(tok, pad_to_multiple=8).pack([ok], token_budget=12)
    with pytest.raises(ValueError, match=r"CFGDropRates.vit must be in \[0, 1\]"):
        CFGDropRates(vit=1.5)
    assert make_packer(tok, drop={"text": 0.5, "vit": 0.0, "vae": 1.0}).drop_rates == CFGDropRates(0.5, 0.0, 1.0)


# ---------------------------------------------------------------------- token-budget batcher
def _synthetic_stream(n: int, seed: int, n_huge: int = 0, mu: float = 4.3) -> list[DialogueSample]:
    """Chats with a long-tailed length mix (a few words to a few hundred tokens), some with a 32x32 image."""
    rng = random.Random(seed)
    out = []
    for i in range(n + n_huge):
        words = int(min(1200, rng.lognormvariate(mu, 0.8))) + 1 if i < n else 3000
        turns = [Turn(role=Role.USER, segments=[TextSegment(" ".join(rng.choices(WORDS[:-1], k=max(1, words // 3))))])]
        reply: list = [TextSegment(" ".join(rng.choices(WORDS[:-1], k=max(1, words - words // 3))))]
        if rng.random() < 0.3:
            reply.append(ImageSegment("im"))
        turns.append(Turn(role=Role.ASSISTANT, segments=reply))
        images = {"im": torch.zeros(3, 32, 32, dtype=torch.uint8)} if len(reply) == 2 else {}
        out.append(DialogueSample(dialogue=Dialogue(id=f"d{i}", turns=turns), images=images, key=f"s{i}"))
    rng.shuffle(out)
    return out


def test_batcher_fills_budget_skips_over_cap_and_loses_nothing(tok) -> None:
    packer = make_packer(tok, pad_to_multiple=64)
    stream = _synthetic_stream(500, seed=0, n_huge=5, mu=5.0)
    batcher = TokenBudgetBatcher(packer=packer, token_budget=2048, max_sample_tokens=1024, overflow_size=32)
    lengths = {s.key: packer.measure(s) for s in stream}
    over = sorted(k for k, n in lengths.items() if n > 1024)
    seen: list[str] = []
    for batch in batcher(stream, generator=torch.Generator().manual_seed(0)):
        assert batch.seq_len == batch.token_budget == 2048
        assert batch.num_real_tokens == sum(lengths[k] for k in batch.sample_keys)
        seen.extend(batch.sample_keys)
    stats = batcher.stats
    assert len(over) >= 5 and stats.skipped_over_cap == len(over) and sorted(stats.skipped_keys) == over
    assert sorted(seen) == sorted(set(lengths) - set(over))  # every packable sample exactly once
    assert stats.samples == len(seen) and stats.batches > 40
    assert stats.real_tokens == sum(lengths[k] for k in seen)
    assert stats.efficiency >= 0.95, stats
    assert batcher.pending_keys == []


def test_batcher_state_dict_and_cap_by_budget(tok) -> None:
    packer = make_packer(tok)
    stream = _synthetic_stream(40, seed=1)
    batcher = TokenBudgetBatcher(packer=packer, token_budget=300, max_sample_tokens=10_000, overflow_size=4)
    it = batcher(stream)
    first = next(it)
    state = batcher.state_dict()
    assert state["stats"]["batches"] == 1 and len(state["pending_keys"]) >= 1
    assert not set(state["pending_keys"]) & set(first.sample_keys)
    rest = list(it)
    over = [s.key for s in stream if packer.measure(s) > 300]  # the budget caps too
    assert batcher.stats.skipped_over_cap == len(over)
    assert sorted(first.sample_keys + [k for b in rest for k in b.sample_keys] + over) == sorted(s.key for s in stream)
    fresh = TokenBudgetBatcher(packer=packer, token_budget=300, max_sample_tokens=10_000)
    fresh.load_state_dict(batcher.state_dict())
    assert fresh.stats == batcher.stats and isinstance(fresh.stats, PackingStats)
    with pytest.raises(ValueError, match="saved token_budget=300 != 400"):
        TokenBudgetBatcher(packer=packer, token_budget=400, max_sample_tokens=10).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of packer.pad_to_multiple=64"):
        TokenBudgetBatcher(packer=make_packer(tok, pad_to_multiple=64), token_budget=100, max_sample_tokens=10)
