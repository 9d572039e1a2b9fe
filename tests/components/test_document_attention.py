"""Per-document SDPA attention (``DocumentMask``) against the full dense-mask path, on real packed batches."""

from __future__ import annotations

import pytest
import torch

from chatumm_kit.components import mot_attention
from chatumm_kit.components.batch import PackedBatch
from chatumm_kit.components.masks import DocumentMask, MaskBuilder, reference_mask
from chatumm_kit.components.mot import MoTBackbone, MoTConfig
from chatumm_kit.components.splits import AttnMode, Modality, SplitTable
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.packing import CFGDropRates, Packer
from chatumm_kit.model import ChatUMM, FlowInputs
from chatumm_kit.presets import build_model

TEXTS = ["draw a red circle", "what colour is it", "it is red", "make it blue", "a blue square", "hello there"]
TABLE = SplitTable.from_rows(
    [
        (0, 5, AttnMode.CAUSAL, 0, Modality.TEXT),
        (5, 4, AttnMode.NOISE, 0, Modality.VAE_NOISED),
        (9, 4, AttnMode.FULL, 0, Modality.VAE_CLEAN),
        (13, 3, AttnMode.CAUSAL, 0, Modality.TEXT),
        (16, 6, AttnMode.CAUSAL, 1, Modality.TEXT),
        (22, 4, AttnMode.FULL, 1, Modality.VIT),
        (26, 3, AttnMode.CAUSAL, 2, Modality.PAD),  # padding: a document of its own
    ]
)


def _images(seed: int, *keys: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g) for k in keys}


def _generation_dialogue(key: str, seed: int) -> DialogueSample:
    """Two generated images (noised + clean VAE + ViT views) and text replies."""
    turns = [
        Turn(role=Role.USER, segments=[TextSegment(text="draw a red circle")]),
        Turn(role=Role.ASSISTANT, segments=[ImageSegment(image="a")]),
        Turn(role=Role.USER, segments=[TextSegment(text="what colour is it")]),
        Turn(role=Role.ASSISTANT, segments=[TextSegment(text="it is red"), ImageSegment(image="b")]),
    ]
    return DialogueSample(dialogue=Dialogue(id=key, turns=turns), images=_images(seed, "a", "b"), key=key)


def _text_dialogue(key: str) -> DialogueSample:
    turns = [
        Turn(role=Role.USER, segments=[TextSegment(text="hello there")]),
        Turn(role=Role.ASSISTANT, segments=[TextSegment(text="a blue square")]),
    ]
    return DialogueSample(dialogue=Dialogue(id=key, turns=turns), images={}, key=key)


def _user_image_dialogue(key: str, seed: int) -> DialogueSample:
    """A user-supplied image (clean VAE + ViT views) and a text answer."""
    turns = [
        Turn(role=Role.USER, segments=[ImageSegment(image="u"), TextSegment(text="what colour is it")]),
        Turn(role=Role.ASSISTANT, segments=[TextSegment(text="it is red")]),
    ]
    return DialogueSample(dialogue=Dialogue(id=key, turns=turns), images=_images(seed, "u"), key=key)


@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    return ChatTokenizer.train(TEXTS * 5, vocab_size=300)


@pytest.fixture(scope="module")
def packer(tokenizer) -> Packer:
    return Packer(tokenizer=tokenizer, vit_patch_size=8, vae_token_stride=8, max_image_side=32,
                  drop_rates=CFGDropRates.disabled())  # fmt: skip


def _packs(packer: Packer) -> dict[str, PackedBatch]:
    mixed = [_generation_dialogue("g0", 0), _text_dialogue("t0"), _user_image_dialogue("u0", 1),
             _text_dialogue("t1"), _generation_dialogue("g1", 2)]  # fmt: skip
    budget = -(-sum(packer.measure(s) for s in mixed) // 64) * 64 + 64  # room for a padding document
    return {
        "mixed": packer.pack(mixed, token_budget=budget),
        "text_only": packer.pack([_text_dialogue("t0"), _text_dialogue("t1"), _text_dialogue("t2")]),
        "single": packer.pack([_generation_dialogue("g0", 0)]),
    }


@pytest.fixture(scope="module")
def packs(packer) -> dict[str, PackedBatch]:
    return _packs(packer)


def _model(tokenizer: ChatTokenizer) -> ChatUMM:
    """``chatumm_tiny`` with every weight perturbed (experts differ, ``llm2vae`` is not zero)."""
    torch.manual_seed(0)
    model = build_model({"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": tokenizer.vocab_size})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _flow(model: ChatUMM, batch: PackedBatch) -> FlowInputs:
    g = torch.Generator().manual_seed(3)
    return FlowInputs(timesteps=torch.rand(batch.num_noised_views, generator=g),
                      noise=torch.randn(int(batch.mse_token_mask.sum()), model.vae.token_dim, generator=g))  # fmt: skip


def _step(model: ChatUMM, batch: PackedBatch, flow: FlowInputs) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Forward outputs and the gradient of every parameter after backward of CE + MSE."""
    model.zero_grad(set_to_none=True)
    out = model(batch, flow=flow)
    (out.ce_sum / max(out.ce_count, 1) + out.mse_sum / max(out.mse_count, 1)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [out.logits, out.velocity, out.ce_sum, out.mse_sum], grads


# ---------------------------------------------------------------------------------------------- the mask


def test_document_mask_blocks_are_the_diagonal_of_the_dense_mask():
    builder = MaskBuilder()
    docs = builder.documents(TABLE)
    dense = builder.dense(TABLE)
    assert docs.lengths == (16, 10, 3) and docs.seq_len == 29
    start = 0
    for n, block in zip(docs.lengths, docs.blocks):
        assert torch.equal(block, dense[start : start + n, start : start + n])
        assert not dense[start : start + n, start + n :].any() and not dense[start + n :, start : start + n].any()
        start += n
    assert torch.equal(docs.dense(), reference_mask(TABLE))


def test_document_mask_rejects_non_contiguous_documents_and_bad_blocks():
    table = SplitTable.from_rows([(0, 2, AttnMode.CAUSAL, 0, Modality.TEXT), (2, 2, AttnMode.CAUSAL, 1, Modality.TEXT),
                                  (4, 2, AttnMode.CAUSAL, 0, Modality.TEXT)])  # fmt: skip
    with pytest.raises(ValueError, match="not contiguous"):
        MaskBuilder().documents(table)
    with pytest.raises(ValueError, match="block"):
        DocumentMask(lengths=(2,), blocks=(torch.ones(2, 3, dtype=torch.bool),))
    with pytest.raises(ValueError, match="block"):
        DocumentMask(lengths=(2,), blocks=(torch.ones(2, 2),))


# ---------------------------------------------------------------------------------------------- backbone


TINY = MoTConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                 intermediate_size=48)  # fmt: skip


def _backbone_inputs(table: SplitTable):
    modality = table.modalities[table.token_split_ids()]
    is_gen = (modality == Modality.VAE_NOISED) | (modality == Modality.VAE_CLEAN)
    hidden = torch.randn(table.seq_len, TINY.hidden_size, requires_grad=True)
    return hidden, dict(position_ids=torch.arange(table.seq_len), und_indices=(~is_gen).nonzero()[:, 0],
                        gen_indices=is_gen.nonzero()[:, 0])  # fmt: skip


def test_backbone_document_mask_equals_dense_mask_forward_and_backward():
    torch.manual_seed(0)
    model = MoTBackbone.from_config(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hidden, kw = _backbone_inputs(TABLE)
    builder = MaskBuilder()
    results = []
    for mask in (builder.dense(TABLE), builder.documents(TABLE)):
        model.zero_grad(set_to_none=True)
        hidden.grad = None
        out = model(hidden, attn_mask=mask, **kw)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), hidden.grad.clone(), grads))
    (out_d, h_d, g_d), (out_p, h_p, g_p) = results
    torch.testing.assert_close(out_p, out_d, rtol=0, atol=1e-5)
    torch.testing.assert_close(h_p, h_d, rtol=0, atol=1e-5)
    assert g_p.keys() == g_d.keys() and len(g_p) == len(list(model.parameters())) - 2  # all but embed / lm_head
    for name, g in g_p.items():
        torch.testing.assert_close(g, g_d[name], rtol=0, atol=1e-5, msg=name)


def test_backbone_rejects_a_document_mask_of_the_wrong_length_or_backend():
    model = MoTBackbone.from_config(TINY)
    hidden, kw = _backbone_inputs(TABLE)
    short = MaskBuilder().documents(SplitTable.from_rows([(0, 4, AttnMode.CAUSAL, 0, Modality.TEXT)]))
    with pytest.raises(ValueError, match="DocumentMask covers 4 tokens, sequence is 29"):
        model(hidden, attn_mask=short, **kw)
    flex = MoTBackbone.from_config(MoTConfig(**{**TINY.__dict__, "attn_backend": "flex"}))
    with pytest.raises(ValueError, match="needs a BlockMask"):
        flex(hidden, attn_mask=MaskBuilder().documents(TABLE), **kw)
    with torch.no_grad(), pytest.raises(ValueError, match="dense bool mask"):
        model(hidden, attn_mask=MaskBuilder().documents(TABLE), kv_cache=model.new_kv_cache(), commit=True, **kw)


def test_text_lm_causal_mask_is_per_document():
    model = MoTBackbone.from_config(TINY)
    mask = model.causal_mask(torch.tensor([0, 0, 0, 1, 1, 2]))
    assert isinstance(mask, DocumentMask) and mask.lengths == (3, 2, 1)
    doc = torch.tensor([0, 0, 0, 1, 1, 2])
    assert torch.equal(mask.dense(), (doc[:, None] == doc[None, :]) & torch.ones(6, 6, dtype=torch.bool).tril())


# ---------------------------------------------------------------------------------------------- ChatUMM


@pytest.mark.parametrize("pack", ["mixed", "text_only", "single"])
def test_chatumm_per_document_path_equals_full_mask_forward_and_backward(tokenizer, packs, pack, monkeypatch):
    batch = packs[pack]
    model = _model(tokenizer)
    flow = _flow(model, batch)
    docs = model.attention_mask(batch)
    assert isinstance(docs, DocumentMask) and len(docs.lengths) == {"mixed": 6, "text_only": 3, "single": 1}[pack]
    out_doc, grads_doc = _step(model, batch, flow)
    monkeypatch.setattr(model, "attention_mask", lambda b: model.mask_builder.dense(b.splits))  # the full mask
    out_full, grads_full = _step(model, batch, flow)
    for a, b in zip(out_doc, out_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grads_doc.keys() == grads_full.keys()
    experts = {"_moe_gen" in n for n in grads_doc if n.startswith("backbone.layers.")}
    assert experts == ({False} if pack == "text_only" else {False, True})  # both experts trained where images are
    for name, g in grads_doc.items():
        torch.testing.assert_close(g, grads_full[name], rtol=0, atol=1e-5, msg=name)


def test_chatumm_packed_batch_never_builds_a_full_mask(tokenizer, packs, monkeypatch):
    batch = packs["mixed"]
    model = _model(tokenizer)

    def no_dense(*args, **kwargs):
        raise AssertionError("MaskBuilder.dense was called on the per-document path")

    mask_shapes: list[tuple[int, ...]] = []
    sdpa = mot_attention.sdpa

    def spy(q, k, v, mask):
        mask_shapes.append(tuple(mask.shape))
        return sdpa(q, k, v, mask)

    monkeypatch.setattr(MaskBuilder, "dense", no_dense)
    monkeypatch.setattr(mot_attention, "sdpa", spy)
    out = model(batch, flow=_flow(model, batch))
    (out.ce_sum + out.mse_sum).backward()
    lengths = model.attention_mask(batch).lengths
    assert len(lengths) == 6 and sum(lengths) == batch.seq_len
    assert mask_shapes == [(n, n) for n in lengths] * model.backbone.config.num_layers  # one SDPA per document
