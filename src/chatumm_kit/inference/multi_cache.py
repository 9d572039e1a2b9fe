"""One MoT forward over chunks appended to several KV caches (batched inference, SPEC §4).

``MoTBackbone.forward(..., kv_cache=cache)`` appends one chunk to one cache. :func:`forward_cache_chunks` appends
``S`` independent chunks to ``S`` different caches in **one** pass through the layers: the chunks' tokens are
stacked into one sequence, routed to the experts together (one gather into the und / gen blocks, as the backbone
does) and run through every norm, projection and MLP together; only attention is split — each chunk's queries see
its own cache plus its own new keys, under its own ``[L_i, L_i]`` mask, so chunks never see each other.

Attention runs one SDPA per chunk over that chunk's cache rows. The alternative, one SDPA over the concatenated
caches with a block-diagonal mask, copies every cache once per layer and scores ``S`` times as many pairs. Measured
on CPU with ``chatumm_tiny`` and 8 sessions: the block-diagonal form is ~12% faster for one-token decoding steps but
1.5× slower for noised image views (18 queries per CFG context), so the per-chunk calls are kept.

The result equals running each chunk alone through ``MoTBackbone.forward`` up to float rounding: the same
arithmetic, but matrix products over more rows may sum in another order (about 1e-7 relative in float32).

Example:
    >>> chunk = CacheChunk(cache=model.backbone.new_kv_cache(), hidden=torch.randn(3, 64),  # doctest: +SKIP
    ...                    position_ids=torch.arange(3), is_gen=torch.zeros(3, dtype=torch.bool),
    ...                    mask=torch.ones(3, 3, dtype=torch.bool).tril(), commit=True)
    >>> [out] = forward_cache_chunks(model.backbone, [chunk]); out.shape                     # doctest: +SKIP
    torch.Size([3, 64])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatumm_kit.components.kv_cache import MoTKVCache
from chatumm_kit.components.mot import MoTBackbone

__all__ = ["CacheChunk", "forward_cache_chunks"]


@dataclass(frozen=True)
class CacheChunk:
    """New tokens to append to one cache.

    Attributes:
        cache: the stream so far; the chunk's queries see all of its committed rows.
        hidden: ``[L, D]`` embedded tokens.
        position_ids: ``[L]`` 1-D RoPE positions.
        is_gen: ``[L]`` bool, True for tokens of the generation expert (VAE latents).
        mask: ``[L, L]`` bool, the mask inside the chunk (True = may attend).
        commit: keep the chunk's keys/values in ``cache`` (False: a noised view nothing later may see).
    """

    cache: MoTKVCache
    hidden: torch.Tensor
    position_ids: torch.Tensor
    is_gen: torch.Tensor
    mask: torch.Tensor
    commit: bool

    def __len__(self) -> int:
        return int(self.hidden.shape[0])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``q [Lq,H,hd]``, ``k/v [Hkv,Lk,hd]``, ``mask [Lq,Lk]`` bool -> ``[Lq, H*hd]`` (GQA)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


class _PerCacheAttention:
    """Attention strategy of :func:`forward_cache_chunks` (the backbone layers' ``attend(layer, q, k, v)``).

    q/k/v arrive expert-major ``[L, h, hd]``; one gather (``inv``) puts them in sequence order, where chunk ``i`` is
    the contiguous rows ``[o_i, o_i + L_i)``. Each chunk's keys/values are written past its cache's committed rows and
    its queries attend over ``[0, N_i + L_i)`` of that cache; the outputs go back to expert-major (``perm``).
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
            outs.append(_sdpa(q_i, keys, values, mask))
        return torch.cat(outs).index_select(0, self.perm)


def forward_cache_chunks(backbone: MoTBackbone, chunks: Sequence[CacheChunk]) -> list[torch.Tensor]:
    """Run ``chunks`` (each on its own cache) through ``backbone`` in one pass; returns each chunk's ``[L_i, D]``
    final-normed output (und tokens through ``norm``, gen tokens through ``norm_moe_gen``), in order.

    Inference only (call under ``torch.no_grad()``). Each cache must appear once; a chunk with ``commit=True``
    advances its cache by ``L_i``.

    Raises:
        ValueError: no chunks, an empty chunk, mismatched shapes, or one cache given twice.
    """
    if not chunks:
        raise ValueError("forward_cache_chunks: no chunks")
    if torch.is_grad_enabled():
        raise RuntimeError("forward_cache_chunks is inference-only: run it under torch.no_grad()")
    if len({id(c.cache) for c in chunks}) != len(chunks):
        raise ValueError("forward_cache_chunks: a cache appears in two chunks (each chunk needs its own cache)")
    width = backbone.config.hidden_size
    for i, c in enumerate(chunks):
        n = len(c)
        if n == 0 or c.hidden.shape != (n, width):
            raise ValueError(
                f"forward_cache_chunks: chunk {i} hidden must be [L>0, {width}], got {tuple(c.hidden.shape)}"
            )
        if c.position_ids.shape != (n,) or c.is_gen.shape != (n,) or c.mask.shape != (n, n):
            raise ValueError(
                f"forward_cache_chunks: chunk {i} of {n} tokens has position_ids {tuple(c.position_ids.shape)}, "
                f"is_gen {tuple(c.is_gen.shape)}, mask {tuple(c.mask.shape)}"
            )
    device = backbone.lm_head.weight.device
    hidden = torch.cat([c.hidden for c in chunks]).to(device)
    is_gen = torch.cat([c.is_gen for c in chunks]).to(device)
    positions = torch.cat([c.position_ids for c in chunks]).to(device)
    perm = torch.cat([(~is_gen).nonzero().flatten(), is_gen.nonzero().flatten()])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=device)
    n_und = int((~is_gen).sum())

    attend = _PerCacheAttention(chunks, perm, inv)
    cos, sin = backbone.rotary(positions.index_select(0, perm))
    x_und, x_gen = hidden.index_select(0, perm[:n_und]), hidden.index_select(0, perm[n_und:])
    for layer in backbone.layers:
        x_und, x_gen = layer(x_und, x_gen, cos=cos, sin=sin, attend=attend)
    for chunk in chunks:
        if chunk.commit:
            chunk.cache.advance(len(chunk))
    normed = ([backbone.norm(x_und)] if n_und else []) + ([backbone.norm_moe_gen(x_gen)] if x_gen.shape[0] else [])
    out = (torch.cat(normed) if len(normed) > 1 else normed[0]).index_select(0, inv)
    return list(out.split(attend.lengths))
