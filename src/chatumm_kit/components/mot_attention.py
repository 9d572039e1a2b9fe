"""The MoT's joint attention over expert-major q/k/v: one strategy per kind of mask (SPEC §3–4).

:class:`~chatumm_kit.components.mot.MoTBackbone` keeps its tokens in "expert-major" order — the understanding block
then the generation block, ``perm = cat(und_indices, gen_indices)`` — and builds one strategy per forward from the
mask it was given. Every layer then calls ``attend(layer, q [L,H,hd], k [L,Hkv,hd], v [L,Hkv,hd]) -> [L, H*hd]``
(expert-major in and out):

* :class:`DenseAttention` — a dense bool ``[L, L]`` mask permuted once per forward into expert-major order
  (attention is equivariant to a joint permutation of queries, keys and mask), so a layer does no gather at all;
* :class:`FlexAttention` — a sequence-order flex ``BlockMask``: q/k/v gathered to sequence order and the output back;
* :class:`DocumentAttention` — several packed documents (a ``DocumentMask``), one SDPA per document over its own
  diagonal block (the masked cross-document pairs, SPEC §3 rule 1, cost nothing);
* :class:`CachedAttention` — one chunk appended to one :class:`~chatumm_kit.components.kv_cache.MoTKVCache`: its
  queries see every cached row plus the chunk under its own mask;
* :class:`StackedCachedAttention` — several chunks, each appended to its own cache, in one forward: one SDPA per
  chunk over that chunk's cache rows.

Example:
    >>> q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    >>> DenseAttention(torch.ones(3, 3, dtype=torch.bool).tril())(0, q, k, k).shape
    torch.Size([3, 32])
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention

from chatumm_kit.components.kv_cache import CacheChunk, MoTKVCache
from chatumm_kit.components.masks import DocumentMask

__all__ = [
    "CachedAttention",
    "DenseAttention",
    "DocumentAttention",
    "FlexAttention",
    "StackedCachedAttention",
    "dense_from_block_mask",
    "sdpa",
]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``q [Lq,H,hd]``, ``k/v [Hkv,Lk,hd]``, ``mask [Lq,Lk]`` bool -> ``[Lq, H*hd]`` (GQA via ``enable_gqa``)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def dense_from_block_mask(block_mask: BlockMask) -> torch.Tensor:
    """``[Q_LEN, KV_LEN]`` bool equivalent of a (batch- and head-independent) ``BlockMask``.

    A pair may attend iff its block is present (partial or full) and ``mask_mod`` allows it; a correct
    ``BlockMask`` has ``mask_mod`` true throughout its full blocks, so this is exact.
    """
    q_len, kv_len = block_mask.seq_lengths
    device = block_mask.kv_num_blocks.device
    by_pair = create_mask(block_mask.mask_mod, None, None, q_len, kv_len, device=device)[0, 0]
    q_block, kv_block = block_mask.BLOCK_SIZE
    blocks = block_mask.to_dense()[0, 0].bool()
    blocks = blocks.repeat_interleave(q_block, 0).repeat_interleave(kv_block, 1)[:q_len, :kv_len]
    return by_pair & blocks


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


class DenseAttention:
    """SDPA with the dense mask permuted once per forward into expert-major order (no per-layer gathers).

    Args:
        mask_em: ``[L, L]`` bool mask, rows and columns in expert-major order.
    """

    def __init__(self, mask_em: torch.Tensor) -> None:
        self.mask_em = mask_em

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k.transpose(0, 1), v.transpose(0, 1), self.mask_em)


class FlexAttention:
    """flex_attention with a sequence-order ``BlockMask``: gather q/k/v to sequence order, attend, gather back.

    Args:
        block_mask: the sequence-order mask.
        perm: ``[L]`` expert-major position -> sequence position; ``inv`` its inverse.
    """

    def __init__(self, block_mask: BlockMask, perm: torch.Tensor, inv: torch.Tensor) -> None:
        self.block_mask, self.perm, self.inv = block_mask, perm, inv

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def to_seq(x: torch.Tensor) -> torch.Tensor:  # [L, h, hd] expert-major -> [1, h, L, hd] sequence order
            return x.index_select(0, self.inv).transpose(0, 1)[None]

        if q.is_cuda:
            fn = _compiled_flex()
        else:  # CPU: eager flex (unfused, materialises scores); compiling costs ~15 s per shape on CPU
            fn = flex_attention
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = fn(to_seq(q), to_seq(k), to_seq(v), block_mask=self.block_mask, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(q.shape[0], -1).index_select(0, self.perm)


class DocumentAttention:
    """SDPA one document at a time, each with its own diagonal block of the mask (SPEC §3 rule 1).

    Documents are contiguous in sequence order, so one gather of q/k/v from expert-major into sequence order
    (``inv``) makes document ``d`` the contiguous rows ``[s_d, s_d + lengths[d])``: its per-document index sets are
    slices of that gather, fixed once per forward by ``inv`` and ``lengths``. The outputs are concatenated (sequence
    order) and gathered back to expert-major (``perm``). Equal to :class:`DenseAttention` with the full mask: the
    pairs it skips are exactly the cross-document ones, all masked there.
    """

    def __init__(self, doc_mask: DocumentMask, perm: torch.Tensor, inv: torch.Tensor) -> None:
        self.lengths, self.blocks = list(doc_mask.lengths), doc_mask.blocks
        self.perm, self.inv = perm, inv

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [L,H,hd], k/v [L,Hkv,hd] expert-major -> per document [n_d, H or Hkv, hd], sequence order
        qs, ks, vs = (x.index_select(0, self.inv).split(self.lengths) for x in (q, k, v))
        outs = [
            sdpa(q_d, k_d.transpose(0, 1), v_d.transpose(0, 1), block)  # [n_d, H*hd]
            for q_d, k_d, v_d, block in zip(qs, ks, vs, self.blocks, strict=True)
        ]
        return torch.cat(outs).index_select(0, self.perm)


class CachedAttention:
    """Incremental attention: the chunk sees every cached key plus its own ``[L_new, L_new]`` mask (SDPA only).

    The chunk's keys/values are written in sequence order into the cache rows just past ``num_tokens`` and the
    queries (expert-major) attend over ``[0, num_tokens + L_new)``; the backbone reserves the rows beforehand and
    commits them afterwards only if asked.
    """

    def __init__(self, cache: MoTKVCache, chunk_mask: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> None:
        self.cache, self.inv = cache, inv
        self.start = cache.num_tokens
        self.end = self.start + perm.numel()
        rows = chunk_mask.index_select(0, perm)  # queries expert-major, keys in sequence order
        past = torch.ones(rows.shape[0], self.start, dtype=torch.bool, device=rows.device)
        self.mask = torch.cat([past, rows], dim=1)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.start, k.index_select(0, self.inv), v.index_select(0, self.inv))
        keys, values = self.cache.span(layer, self.end)
        return sdpa(q, keys, values, self.mask)


class StackedCachedAttention:
    """Several chunks, each appended to its own cache, attended in one forward (one SDPA per chunk).

    The chunks' tokens are stacked in sequence order (chunk ``i`` is the rows ``[o_i, o_i + L_i)``); q/k/v arrive
    expert-major and one gather (``inv``) puts them in that order. Each chunk's keys/values are written past its
    cache's committed rows and its queries attend over ``[0, N_i + L_i)`` of that cache under its own mask, so chunks
    never see each other; the outputs go back to expert-major (``perm``).

    One SDPA per chunk, rather than one over the concatenated caches with a block-diagonal mask (which copies every
    cache once per layer and scores ``S`` times as many pairs): measured on CPU with ``chatumm_tiny`` and 8 sessions,
    the block-diagonal form was ~12% faster for one-token decoding steps but 1.5× slower for noised image views.
    """

    def __init__(self, chunks: Sequence[CacheChunk], perm: torch.Tensor, inv: torch.Tensor) -> None:
        self.chunks, self.perm, self.inv = chunks, perm, inv
        self.lengths = [len(c) for c in chunks]
        self.starts = [c.cache.num_tokens for c in chunks]
        self.masks = []
        for chunk, start in zip(chunks, self.starts):
            chunk.cache.reserve(start + len(chunk))
            past = torch.ones(len(chunk), start, dtype=torch.bool, device=perm.device)
            self.masks.append(torch.cat([past, chunk.mask.to(perm.device)], dim=1))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qs, ks, vs = (x.index_select(0, self.inv).split(self.lengths) for x in (q, k, v))
        outs = []
        for chunk, start, mask, q_i, k_i, v_i in zip(self.chunks, self.starts, self.masks, qs, ks, vs):
            chunk.cache.write(layer, start, k_i, v_i)
            keys, values = chunk.cache.span(layer, start + len(chunk))
            outs.append(sdpa(q_i, keys, values, mask))
        return torch.cat(outs).index_select(0, self.perm)
