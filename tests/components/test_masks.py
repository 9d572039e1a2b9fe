"""Generalized Causal Attention masks (SPEC §3): dense == literal rules, BlockMask == create_block_mask, pictures."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from chatumm_kit.components.masks import MaskBuilder, reference_mask
from chatumm_kit.components.splits import AttnMode, Modality, SplitTable

C, F_, N = AttnMode.CAUSAL, AttnMode.FULL, AttnMode.NOISE
MODALITY_OF = {C: (Modality.TEXT, Modality.PAD), F_: (Modality.VIT, Modality.VAE_CLEAN), N: (Modality.VAE_NOISED,)}
BLOCKMASK_FIELDS = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)
HYPOTHESIS = settings(max_examples=40, deadline=None, derandomize=True, database=None)


def table_of(*splits: tuple[int, AttnMode, int] | tuple[int, AttnMode, int, Modality]) -> SplitTable:
    """``(length, mode, doc[, modality])`` per split → a contiguous SplitTable."""
    rows, start = [], 0
    for length, mode, doc, *modality in splits:
        rows.append((start, length, mode, doc, modality[0] if modality else MODALITY_OF[mode][0]))
        start += length
    return SplitTable.from_rows(rows)


@st.composite
def split_tables(draw, *, max_len: int = 300, contiguous_docs: bool = True) -> SplitTable:
    splits, total, doc = [], 0, 0
    for i in range(draw(st.integers(1, 14))):
        length = draw(st.integers(1, min(40, max_len - total)))
        mode = draw(st.sampled_from([C, F_, N]))
        if contiguous_docs:
            doc += int(i > 0 and draw(st.integers(0, 3)) == 0)
        else:
            doc = draw(st.integers(0, 2))
        splits.append((length, mode, doc, draw(st.sampled_from(MODALITY_OF[mode]))))
        total += length
        if total >= max_len:
            break
    return table_of(*splits)


def expand_block_mask(bm, mask_mod, length: int) -> torch.Tensor:
    """Token-level ``[L, L]`` mask a flex kernel computes: full blocks all True, partial blocks ``mask_mod``."""
    q_block, kv_block = bm.BLOCK_SIZE
    n_q, n_kv = bm.kv_indices.shape[-2:]
    partial = torch.zeros(n_q, n_kv, dtype=torch.bool)
    full = torch.zeros(n_q, n_kv, dtype=torch.bool)
    for row in range(n_q):
        partial[row, bm.kv_indices[0, 0, row, : bm.kv_num_blocks[0, 0, row]].long()] = True
        full[row, bm.full_kv_indices[0, 0, row, : bm.full_kv_num_blocks[0, 0, row]].long()] = True
    assert not (partial & full).any(), "a block is both partial and full"

    def to_tokens(blocks: torch.Tensor) -> torch.Tensor:
        return blocks.repeat_interleave(q_block, 0).repeat_interleave(kv_block, 1)[:length, :length]

    idx = torch.arange(length)
    evaluated = mask_mod(torch.tensor(0), torch.tensor(0), idx[:, None], idx[None, :])
    return to_tokens(full) | (to_tokens(partial) & evaluated)


# --- worked examples (SPEC §3) -------------------------------------------------------------------------------

ONE_DOC = table_of((3, C, 0), (2, N, 0), (2, F_, 0, Modality.VAE_CLEAN), (2, F_, 0, Modality.VIT), (2, C, 0))
ONE_DOC_EXPECTED = [  # text(0-2) noise(3-4) clean VAE(5-6) ViT(7-8) text(9-10)
    "10000000000",
    "11000000000",
    "11100000000",
    "11111000000",  # noise sees the clean prefix and its own split
    "11111000000",
    "11100110000",  # clean copy: not the noised view, bidirectional inside
    "11100110000",
    "11100111100",
    "11100111100",
    "11100111110",  # later text: everything but the noise
    "11100111111",
]


def as_bool(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


@pytest.mark.parametrize("build", ["reference", "dense", "block"])
def test_one_document_worked_example(build: str) -> None:
    builder = MaskBuilder(block_size=4)
    if build == "reference":
        mask = reference_mask(ONE_DOC)
    elif build == "dense":
        mask = builder.dense(ONE_DOC)
    else:
        mask = expand_block_mask(builder.block_mask(ONE_DOC), builder.mask_mod(ONE_DOC), 11)
    assert torch.equal(mask, as_bool(ONE_DOC_EXPECTED))


def test_two_documents_are_isolated_and_noise_never_sees_noise() -> None:
    table = table_of((3, C, 0), (2, F_, 0), (2, C, 1), (2, N, 1), (2, N, 1), (1, C, 1))
    mask = MaskBuilder().dense(table)
    assert torch.equal(mask, reference_mask(table))
    assert not mask[5:, :5].any() and not mask[:5, 5:].any()  # documents see nothing of each other
    assert mask[3:5, :5].all()  # full split of doc 0: bidirectional, sees its text prefix
    assert mask[9:11, 5:7].all() and not mask[9:11, 7:9].any()  # 2nd noised image: prefix yes, 1st noised no
    assert mask[7:9, 7:9].all() and mask[9:11, 9:11].all()
    assert mask[11, 5:7].all() and not mask[11, 7:11].any() and mask[11, 11]


def test_block_mask_for_length_not_multiple_of_block() -> None:
    bm = MaskBuilder(block_size=4).block_mask(ONE_DOC)
    assert bm.seq_lengths == (11, 11)
    assert bm.shape == (1, 1, 11, 11)
    assert bm.kv_num_blocks.shape == (1, 1, 3) and bm.kv_indices.shape == (1, 1, 3, 3)
    # Rows 8-10 (last q-block, padded) with keys 0-3: visible, but padding keeps the tile partial, never full.
    assert bm.full_kv_num_blocks[0, 0, 2] == 0 and bm.kv_num_blocks[0, 0, 2] == 3
    # Rows 0-3: keys 0-3 causal → partial; keys 4-7 seen only by noise row 3 → partial; keys 8-10 never.
    assert bm.kv_num_blocks[0, 0, 0] == 2 and bm.kv_indices[0, 0, 0, :2].tolist() == [0, 1]
    # Rows 4-7 see keys 0-3 only partly: noise key 3 is hidden from the clean VAE and ViT rows 5-7.
    assert bm.kv_num_blocks[0, 0, 1] == 3 and bm.full_kv_num_blocks.sum() == 0


def test_block_mask_rejects_noncontiguous_documents() -> None:
    table = table_of((2, C, 0), (2, C, 1), (2, C, 0))
    with pytest.raises(ValueError, match="document 0 is not contiguous.*split 2"):
        MaskBuilder(block_size=2).block_mask(table)


# --- properties over random split tables ----------------------------------------------------------------------


@HYPOTHESIS
@given(table=split_tables(contiguous_docs=False))
def test_dense_equals_reference(table: SplitTable) -> None:
    assert torch.equal(MaskBuilder().dense(table, rows_per_chunk=37), reference_mask(table))


@HYPOTHESIS
@given(table=split_tables(), block_size=st.sampled_from([1, 3, 8, 16, 32]))
def test_block_mask_expands_to_dense(table: SplitTable, block_size: int) -> None:
    builder = MaskBuilder(block_size=block_size)
    expanded = expand_block_mask(builder.block_mask(table), builder.mask_mod(table), table.seq_len)
    assert torch.equal(expanded, builder.dense(table))


@HYPOTHESIS
@given(table=split_tables(), block_size=st.sampled_from([2, 8, 16, 64]))
def test_block_mask_identical_to_create_block_mask(table: SplitTable, block_size: int) -> None:
    builder = MaskBuilder(block_size=block_size)
    length = table.seq_len
    ours = builder.block_mask(table)
    theirs = create_block_mask(builder.mask_mod(table), None, None, length, length, device="cpu", BLOCK_SIZE=block_size)
    assert ours.seq_lengths == theirs.seq_lengths and ours.BLOCK_SIZE == theirs.BLOCK_SIZE
    for name in BLOCKMASK_FIELDS:
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(ours.to_dense(), theirs.to_dense())


# --- attention ------------------------------------------------------------------------------------------------


def random_qkv(length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, length, 16, generator=g) for _ in range(3))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_eager_matches_sdpa_dense() -> None:
    # Eager flex on CPU runs (unfused: it evaluates mask_mod everywhere), so it checks mask_mod semantics;
    # block structure is checked by test_block_mask_expands_to_dense and the compiled test below.
    table = table_of((5, C, 0), (6, N, 0), (6, F_, 0), (4, F_, 0, Modality.VIT), (5, C, 0), (7, C, 1), (3, F_, 1))
    builder = MaskBuilder(block_size=8)
    q, k, v = random_qkv(table.seq_len)
    out = flex_attention(q, k, v, block_mask=builder.block_mask(table))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=builder.dense(table))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_flex_attention_compiled_cpu_uses_block_structure() -> None:
    # The compiled CPU kernel skips empty tiles and skips mask_mod on full tiles, so a wrong block class would
    # change the output. ~10 s of compilation, hence slow.
    table = table_of((20, C, 0), (32, N, 0), (32, F_, 0), (16, F_, 0, Modality.VIT), (9, C, 0), (30, C, 1))
    builder = MaskBuilder(block_size=16)
    q, k, v = random_qkv(table.seq_len)
    out = torch.compile(flex_attention)(q, k, v, block_mask=builder.block_mask(table))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=builder.dense(table))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_attention_cuda_matches_sdpa_dense() -> None:
    table = table_of((100, C, 0), (256, N, 0), (256, F_, 0), (64, F_, 0, Modality.VIT), (77, C, 0), (300, C, 1))
    builder = MaskBuilder(block_size=128)
    q, k, v = (t.cuda() for t in random_qkv(table.seq_len))
    out = torch.compile(flex_attention)(q, k, v, block_mask=builder.block_mask(table, device="cuda"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=builder.dense(table, device="cuda"))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# --- pictures -------------------------------------------------------------------------------------------------


def test_mask_image_colours_and_black() -> None:
    image = MaskBuilder().mask_image(ONE_DOC)
    assert image.shape == (3, 11, 11) and image.dtype == torch.uint8
    assert image[:, 9, 3].tolist() == [0, 0, 0]  # later text → noise key: masked
    assert image[:, 0, 1].tolist() == [0, 0, 0]  # causal: future key masked
    assert image[:, 3, 4].tolist() == [234, 67, 53]  # noise row, noise key: red
    assert image[:, 9, 0].tolist() == [66, 133, 244]  # text key: blue
    assert image[:, 9, 5].tolist() == [251, 188, 5]  # clean VAE key: amber
    assert image[:, 9, 7].tolist() == [52, 168, 83]  # ViT key: green


def test_mask_image_downsamples_with_interval_arithmetic(tmp_path) -> None:
    table = table_of((300, C, 0), (200, N, 0), (200, F_, 0), (300, C, 1))  # L = 1000
    builder = MaskBuilder()
    image = builder.mask_image(table, max_side=100)  # 10×10 token cells
    assert image.shape == (3, 100, 100)
    assert image[:, 80, 10].tolist() == [0, 0, 0]  # doc 1 row, doc 0 key: masked
    assert image[:, 60, 40].tolist() == [0, 0, 0]  # clean VAE row, noise key: masked
    assert image[:, 40, 45].tolist() == [234, 67, 53]  # inside the noise split: every pair visible
    assert image[:, 35, 10].tolist() == [66, 133, 244]  # noise row sees the text prefix
    assert image[:, 5, 5].tolist() == [33, 66, 122]  # causal diagonal cell: partly visible → half brightness
    path = builder.save_mask_png(table, tmp_path / "mask.png", max_side=100)
    with Image.open(path) as png:
        assert png.size == (100, 100)
        assert png.getpixel((45, 40)) == (234, 67, 53)
