"""Worked examples of the serialized stream (SPEC §2–3), asserted token by token.

The main dialogue has three turn pairs: the user asks for a drawing and the assistant generates image A; the user
asks an unrelated question (a distractor) and gets a text answer; the user refers back to the cat from the start
and the assistant answers with text, then generates image B (an interleaved reply).

Images are 32x32 with ViT patch 16 and VAE token stride 16: every view is 2x2 = 4 tokens + 2 markers.
"""

from __future__ import annotations

import pytest
import torch

from chatumm_kit.components.splits import AttnMode, Modality
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.packing import CFGDropRates, Packer

TEXTS = ["draw a cat", "what is two plus two", "four", "make the cat from the start red", "ok"]
IM_S, IM_E, V_S, V_E, END, PAD = 0, 1, 2, 3, 4, 5
DRAW, A, CAT, WHAT, IS, TWO, PLUS, FOUR = 295, 288, 267, 287, 290, 269, 299, 296
MAKE, THE, FROM, ST, ART, RED, OK = 297, 268, 298, 293, 294, 292, 281
C, F, N = AttnMode.CAUSAL, AttnMode.FULL, AttnMode.NOISE
TXT, VIT, CLEAN, NOISED = Modality.TEXT, Modality.VIT, Modality.VAE_CLEAN, Modality.VAE_NOISED
VIEW = [V_S, PAD, PAD, PAD, PAD, V_E]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.train(TEXTS * 10, vocab_size=300)


@pytest.fixture(scope="module")
def packer(tok) -> Packer:
    return Packer(tokenizer=tok, vit_patch_size=16, vae_token_stride=16, drop_rates=CFGDropRates.disabled())


def image_a() -> torch.Tensor:  # solid (255, 0, 51)
    return torch.tensor([255, 0, 51], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32).contiguous()


def image_b() -> torch.Tensor:  # left half white, right half black
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    img[:, :, :16] = 255
    return img


def three_pairs(*, first_reply_trainable: bool = True) -> DialogueSample:
    turns = [
        Turn(role=Role.USER, segments=[TextSegment("draw a cat")]),
        Turn(role=Role.ASSISTANT, segments=[ImageSegment("A")], trainable=first_reply_trainable),
        Turn(role=Role.USER, segments=[TextSegment("what is two plus two")]),
        Turn(role=Role.ASSISTANT, segments=[TextSegment("four")]),
        Turn(role=Role.USER, segments=[TextSegment("make the cat from the start red")]),
        Turn(role=Role.ASSISTANT, segments=[TextSegment("ok"), ImageSegment("B")]),
    ]
    d = Dialogue(id="worked", turns=turns)
    return DialogueSample(dialogue=d, images={"A": image_a(), "B": image_b()}, key="w0")


def test_tokenizer_ids_of_the_worked_texts(tok) -> None:
    # If the tokenizers library ever trains differently, this fails first and names the cause.
    assert [tok.encode(t) for t in TEXTS] == [
        [DRAW, A, CAT],
        [WHAT, IS, TWO, PLUS, TWO],
        [FOUR],
        [MAKE, THE, CAT, FROM, THE, ST, ART, RED],
        [OK],
    ]


def test_three_turn_pairs_exactly(packer) -> None:
    b = packer.pack([three_pairs()])
    # fmt: off
    ids = (
        [IM_S, DRAW, A, CAT, IM_E]                     # 0-4    user: draw a cat
        + VIEW + VIEW + VIEW                           # 5-22   assistant: A noised, A clean VAE, A ViT
        + [IM_S, WHAT, IS, TWO, PLUS, TWO, IM_E]       # 23-29  user: distractor question
        + [IM_S, FOUR, IM_E]                           # 30-32  assistant: four
        + [IM_S, MAKE, THE, CAT, FROM, THE, ST, ART, RED, IM_E]  # 33-42 user: refers back to A
        + [IM_S, OK, IM_E]                             # 43-45  assistant: ok ...
        + VIEW + VIEW + VIEW                           # 46-63  ... then B noised, B clean VAE, B ViT
    )
    pos = (
        [0, 1, 2, 3, 4]
        + [5] * 6 + [5] * 6 + [6] * 6                  # noised A does not advance; clean A reuses 5
        + list(range(7, 14))
        + [14, 15, 16]
        + list(range(17, 27))
        + [27, 28, 29]
        + [30] * 6 + [30] * 6 + [31] * 6
    )
    rows = [
        (0, 5, C, 0, TXT), (5, 6, N, 0, NOISED), (11, 6, F, 0, CLEAN), (17, 6, F, 0, VIT),
        (23, 7, C, 0, TXT), (30, 3, C, 0, TXT), (33, 10, C, 0, TXT),
        (43, 3, C, 0, TXT), (46, 6, N, 0, NOISED), (52, 6, F, 0, CLEAN), (58, 6, F, 0, VIT),
    ]
    ce = {
        4: V_S,                      # user's last token → the reply opens with an image
        22: END,                     # A's last clean view (ViT) closes the turn
        29: IM_S,                    # user's last token → the reply is text
        30: FOUR, 31: IM_E, 32: END,  # next tokens, then the turn ends
        42: IM_S,
        43: OK, 44: IM_E, 45: V_S,   # im_e of "ok" → an image follows
        63: END,                     # B's ViT v_e closes the turn
    }
    # fmt: on
    assert b.input_ids.tolist() == ids
    assert b.position_ids.tolist() == pos
    assert b.splits.rows() == rows
    assert dict(zip(b.ce_indices.tolist(), b.ce_labels.tolist())) == ce
    assert b.ce_indices.tolist() == sorted(ce)

    vae_tok = [*range(6, 10), *range(12, 16), *range(47, 51), *range(53, 57)]
    vit_tok = [*range(18, 22), *range(59, 63)]
    assert b.vae_indices.tolist() == b.gen_indices.tolist() == vae_tok
    assert b.vit_indices.tolist() == vit_tok
    assert b.text_indices.tolist() == [i for i in range(64) if i not in vae_tok + vit_tok]
    assert b.und_indices.tolist() == [i for i in range(64) if i not in vae_tok]

    rc = [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert b.vae_view_image.tolist() == [0, 0, 1, 1]
    assert b.vae_view_noised.tolist() == [True, False, True, False]
    assert b.vae_grid_hw.tolist() == [[2, 2]] * 4 and b.vit_grid_hw.tolist() == [[2, 2]] * 2
    assert b.vae_token_view.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert b.vae_token_rc.tolist() == rc * 4 and b.vit_patch_rc.tolist() == rc * 2
    assert b.mse_indices.tolist() == [6, 7, 8, 9, 47, 48, 49, 50]

    assert len(b.vae_images) == 2
    assert torch.equal(b.vae_images[0], image_a().float() / 127.5 - 1)
    assert b.vae_images[0][:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 51 / 127.5 - 1])
    assert torch.equal(b.vae_images[1][:, :, :16], torch.ones(3, 32, 16))
    # ViT patches: A is one colour everywhere; B's left patch column is white (+1), right column black (-1).
    a_pixel = torch.tensor([1.0, -1.0, (51 / 255 - 0.5) / 0.5])
    assert torch.allclose(b.vit_patches[:4], a_pixel.repeat(256).expand(4, 768))
    assert b.vit_patches[4:].mean(1).tolist() == [1.0, -1.0, 1.0, -1.0]

    assert b.sample_keys == ["w0"] and b.num_real_tokens == b.token_budget == b.seq_len == 64
    assert packer.measure(three_pairs()) == 64


def test_untrained_first_reply_is_context_only(packer) -> None:
    full = packer.pack([three_pairs()])
    b = packer.pack([three_pairs(first_reply_trainable=False)])
    # No noised view for A, no label on the user's first question nor on A's ViT view; positions are unchanged.
    assert b.splits.rows()[:3] == [(0, 5, C, 0, TXT), (5, 6, F, 0, CLEAN), (11, 6, F, 0, VIT)]
    keep = [i for i in range(64) if not 5 <= i < 11]
    assert b.input_ids.tolist() == full.input_ids[keep].tolist()
    assert b.position_ids.tolist() == full.position_ids[keep].tolist()
    want = {29: IM_S, 30: FOUR, 31: IM_E, 32: END, 42: IM_S, 43: OK, 44: IM_E, 45: V_S, 63: END}
    assert dict(zip(b.ce_indices.tolist(), b.ce_labels.tolist())) == {i - 6: y for i, y in want.items()}
    assert b.vae_view_noised.tolist() == [False, True, False]
    assert b.vae_view_image.tolist() == [0, 1, 1]


def test_user_image_question_exactly(packer) -> None:
    d = Dialogue(
        id="vqa",
        turns=[
            Turn(role=Role.USER, segments=[TextSegment("what is two plus two"), ImageSegment("B")]),
            Turn(role=Role.ASSISTANT, segments=[TextSegment("four")]),
        ],
    )
    b = packer.pack([DialogueSample(dialogue=d, images={"B": image_b()})], token_budget=24)
    assert b.input_ids.tolist() == [IM_S, WHAT, IS, TWO, PLUS, TWO, IM_E, *VIEW, *VIEW, IM_S, FOUR, IM_E, PAD, PAD]
    assert b.position_ids.tolist() == [*range(7), *[7] * 6, *[8] * 6, 9, 10, 11, 0, 1]
    assert b.splits.rows() == [
        (0, 7, C, 0, TXT),
        (7, 6, F, 0, CLEAN),
        (13, 6, F, 0, VIT),
        (19, 3, C, 0, TXT),
        (22, 2, C, 1, Modality.PAD),
    ]
    # The user's last token is the ViT view's v_e: it predicts that the reply opens with text.
    assert dict(zip(b.ce_indices.tolist(), b.ce_labels.tolist())) == {18: IM_S, 19: FOUR, 20: IM_E, 21: END}
    assert b.vae_view_noised.tolist() == [False] and b.num_noised_views == 0
    assert b.sample_keys == ["vqa"] and (b.num_real_tokens, b.token_budget) == (22, 24)
    assert b.und_indices.tolist() == [*range(8), *range(12, 24)]
