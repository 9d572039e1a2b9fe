"""Generalized Causal Attention masks built from a :class:`SplitTable` (SPEC §3).

For a query token ``q`` and a key token ``k`` (``split(x)`` = the split holding token ``x``) attention is allowed
iff all three rules hold:

1. ``doc(q) == doc(k)`` — packed samples never see each other;
2. ``k <= q``, or ``q`` and ``k`` share one ``full``/``noise`` split;
3. a key inside a ``noise`` split is visible only to queries of that same split.

Since splits are contiguous, rules 2 and 3 collapse to two disjoint cases (plus rule 1 on top):

* *history*: ``k`` lies in an earlier split (``k < start(split(q))``) that is not ``noise``;
* *intra*: ``k`` lies in ``split(q)`` and (``k <= q`` or the split is bidirectional).

``mask_mod`` and :meth:`MaskBuilder.dense` evaluate this per token pair from four ``[L]`` lookups; the block
structure of :meth:`MaskBuilder.block_mask` follows from the same two cases as intervals over blocks.

Four forms of the same mask:

* :meth:`MaskBuilder.block_mask` — a flex-attention ``BlockMask`` whose block structure comes from interval
  arithmetic over the splits (O(L + blocks²), never O(L²)); ``mask_mod`` runs only inside partial blocks;
* :meth:`MaskBuilder.documents` — a :class:`DocumentMask`: by rule 1 the mask is block-diagonal over documents,
  so it keeps only each document's own ``[n_d, n_d]`` block (O(Σ n_d²)); SDPA then attends document by document;
* :meth:`MaskBuilder.dense` — a ``[L, L]`` bool mask for SDPA (CPU fallback, KV-cache chunks);
* :func:`reference_mask` — the rules applied literally in a Python double loop (tests only).

Example:
    >>> from chatumm_kit.components.splits import AttnMode, Modality, SplitTable
    >>> table = SplitTable.from_rows([
    ...     (0, 4, AttnMode.CAUSAL, 0, Modality.TEXT),
    ...     (4, 3, AttnMode.NOISE, 0, Modality.VAE_NOISED),
    ...     (7, 3, AttnMode.FULL, 0, Modality.VAE_CLEAN),
    ... ])
    >>> builder = MaskBuilder(block_size=4)
    >>> mask = builder.dense(table)          # [10, 10] bool
    >>> bool(mask[8, 5]), bool(mask[5, 8]), bool(mask[5, 3])   # clean never sees noise; noise sees the prefix
    (False, False, True)
    >>> builder.block_mask(table).shape
    (1, 1, 10, 10)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import BlockMask

from chatumm_kit.components.splits import AttnMode, Modality, SplitTable

__all__ = ["DocumentMask", "MaskBuilder", "reference_mask"]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Colours of the mask picture, indexed by segment type (see ``_segment_types``).
_SEGMENT_COLOURS = torch.tensor(
    [
        [66, 133, 244],  # 0: text / causal — blue
        [52, 168, 83],  # 1: full ViT — green
        [251, 188, 5],  # 2: full VAE (clean) — amber
        [234, 67, 53],  # 3: noise (noised VAE) — red
        [128, 128, 128],  # 4: padding — grey
    ],
    dtype=torch.uint8,
)


@dataclass(frozen=True)
class _TokenTables:
    """Per-token lookups derived from a split table, each ``[L]``.

    Attributes:
        doc: document id of each token.
        split_start: first token of the token's split (``int32``).
        visible_end: one past the last key of its own split a token may see (``int32``): its split's end if the
            split is ``full``/``noise``, else the token itself + 1 (causal).
        noise: True where the token's split is ``noise``.
    """

    doc: torch.Tensor
    split_start: torch.Tensor
    visible_end: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def of(cls, table: SplitTable, device: torch.device) -> _TokenTables:
        t = table.to(device)
        split_id = torch.repeat_interleave(torch.arange(len(t), device=device), t.lengths)
        own = torch.arange(split_id.numel(), device=device) + 1
        bidirectional = (t.modes != AttnMode.CAUSAL)[split_id]
        return cls(
            doc=t.docs[split_id],
            split_start=t.starts[split_id].to(torch.int32),
            visible_end=torch.where(bidirectional, (t.starts + t.lengths)[split_id], own).to(torch.int32),
            noise=(t.modes == AttnMode.NOISE)[split_id],
        )

    def allowed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """SPEC §3 for broadcastable token indices ``q`` and ``k``.

        ``k < visible_end[q]`` keeps earlier keys and the visible part of q's own split (rule 2); among earlier
        splits' keys (``k < split_start[q]``) noise ones are dropped (rule 3); then the same document (rule 1).
        """
        own_or_clean = (k >= self.split_start[q]) | ~self.noise[k]
        return (k < self.visible_end[q]) & own_or_clean & (self.doc[q] == self.doc[k])


@dataclass(frozen=True)
class DocumentMask:
    """The Generalized Causal Attention mask of a packed sequence as its per-document diagonal blocks (SPEC §3).

    Rule 1 (no attention across documents) makes the ``[L, L]`` mask block-diagonal once each document is one
    contiguous run of tokens, so these blocks hold all of it in O(Σ n_d²) memory instead of O(L²).

    Attributes:
        lengths: tokens of each document, in sequence order (they sum to ``L``; padding counts as a document).
        blocks: one ``[n_d, n_d]`` bool mask per document (True = may attend), rows = queries and columns = keys
            in sequence order, the diagonal block ``dense[s_d:e_d, s_d:e_d]`` of the full mask.

    Example:
        >>> m = DocumentMask(lengths=(2, 1), blocks=(torch.ones(2, 2, dtype=torch.bool).tril(),
        ...                                          torch.ones(1, 1, dtype=torch.bool)))
        >>> m.seq_len, m.dense().int().tolist()
        (3, [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    """

    lengths: tuple[int, ...]
    blocks: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if not self.lengths or len(self.lengths) != len(self.blocks):
            raise ValueError(f"DocumentMask: {len(self.lengths)} lengths for {len(self.blocks)} blocks (need >= 1)")
        for n, block in zip(self.lengths, self.blocks):
            if n < 1 or block.shape != (n, n) or block.dtype != torch.bool:
                raise ValueError(
                    f"DocumentMask: a document of {n} tokens has a {block.dtype} block {tuple(block.shape)}"
                )

    @property
    def seq_len(self) -> int:
        """Total number of tokens ``L``."""
        return sum(self.lengths)

    def to(self, device: torch.device | str) -> DocumentMask:
        return DocumentMask(lengths=self.lengths, blocks=tuple(b.to(device) for b in self.blocks))

    def dense(self) -> torch.Tensor:
        """The full ``[L, L]`` bool mask (equal to :meth:`MaskBuilder.dense`); O(L²), for tests and fallbacks."""
        return torch.block_diag(*self.blocks)


@dataclass(frozen=True)
class _BlockClasses:
    """Block-level classification of the mask: ``partial`` and ``full`` are disjoint ``[n_q, n_kv]`` bool."""

    partial: torch.Tensor
    full: torch.Tensor


def _check_contiguous_docs(table: SplitTable) -> None:
    """Interval arithmetic needs each document to occupy one contiguous run of splits."""
    docs = table.docs
    if docs.numel() < 2:
        return
    changes = docs[1:] != docs[:-1]
    n_runs = int(changes.sum()) + 1
    n_docs = int(torch.unique(docs).numel())
    if n_runs != n_docs:
        seen: set[int] = set()
        prev = None
        for i, d in enumerate(docs.tolist()):
            if d != prev and d in seen:
                raise ValueError(
                    f"SplitTable document {d} is not contiguous: it reappears at split {i} "
                    f"(token {int(table.starts[i])}); block_mask needs each document as one run of splits"
                )
            seen.add(d)
            prev = d


def _classify_blocks(table: SplitTable, q_block: int, kv_block: int, device: torch.device) -> _BlockClasses:
    """Which ``q_block × kv_block`` tiles are fully visible, partially visible or empty (SPEC §3).

    Interval arithmetic over the splits: O(L) per-token prep, then O(1) broadcast compares per tile (no gathers).
    For the q-block of rows ``[qs, qe)`` let ``i0``/``i1`` be the splits of its first/last row and ``ds`` the
    start of ``i0``'s document (documents are contiguous runs of splits):

    * keys visible to *some* row are ``[ds, start(i0))`` minus noise tokens (history of the first row; a noise
      split there stays hidden from every row) plus ``[start(i0), hi)``, with ``hi = qe`` if ``i1`` is causal
      else ``end(i1)`` — every split from ``i0`` on is seen at least by its own rows, in any document;
    * keys visible to *every* row are ``[ds, lo)`` minus all noise before ``start(i1)``, with ``lo = qs + 1`` if
      ``i0`` is causal else ``end(i0)`` — and only if ``i0`` and ``i1`` share a document.

    A tile that overhangs ``L`` is never full: flex pads the mask with False, as ``create_block_mask`` does.
    """
    t = table.to(device)
    length = t.seq_len
    i32 = torch.int32
    starts, ends = t.starts.to(i32), (t.starts + t.lengths).to(i32)
    causal = t.modes == AttnMode.CAUSAL
    new_doc = torch.ones_like(t.docs, dtype=torch.bool)
    new_doc[1:] = t.docs[1:] != t.docs[:-1]
    doc_start = starts[torch.where(new_doc, torch.arange(len(t), device=device), 0).cummax(0).values]
    # Per token x: the first clean (non-noise) token >= x and the first noise token >= x (L if none).
    noise = torch.repeat_interleave(t.modes == AttnMode.NOISE, t.lengths)
    tokens = torch.arange(length, device=device, dtype=i32)
    none_left = torch.full_like(tokens, length)
    next_clean = torch.where(noise, none_left, tokens).flip(0).cummin(0).values.flip(0)
    next_noise = torch.where(noise, tokens, none_left).flip(0).cummin(0).values.flip(0)

    qs = torch.arange(0, length, q_block, device=device, dtype=i32)
    qe = (qs + q_block).clamp(max=length)
    i0 = torch.searchsorted(starts, qs, right=True) - 1
    i1 = torch.searchsorted(starts, qe - 1, right=True) - 1
    ds, s0, s1 = doc_start[i0][:, None], starts[i0][:, None], starts[i1][:, None]
    hi = torch.where(causal[i1], qe, ends[i1])[:, None]
    lo = torch.where(causal[i0], qs + 1, ends[i0])[:, None]
    row_ok = ((t.docs[i0] == t.docs[i1]) & (qe - qs == q_block))[:, None]

    ks = torch.arange(0, length, kv_block, device=device, dtype=i32)
    ke = (ks + kv_block).clamp(max=length)
    col_ok = (ke - ks == kv_block)[None, :]
    clean_from_ks, noise_from_ks = next_clean[ks.long()][None, :], next_noise[ks.long()][None, :]
    ks, ke = ks[None, :], ke[None, :]

    # Some row sees some key: a clean key of [max(ks, ds), min(ke, s0)), or any key of [max(ks, s0), min(ke, hi)).
    after_doc_start = ks >= ds
    first_clean = torch.where(after_doc_start, clean_from_ks, next_clean[ds.squeeze(1).long()][:, None])
    any_visible = (first_clean < torch.minimum(ke, s0)) | (torch.maximum(ks, s0) < torch.minimum(ke, hi))
    # Every row sees every key: inside [ds, lo), no noise before start(i1), no padding in the tile.
    full = row_ok & col_ok & after_doc_start & (ke <= lo) & (noise_from_ks >= torch.minimum(ke, s1))
    return _BlockClasses(partial=any_visible & ~full, full=full)


def _ordered(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n_q, n_kv]`` bool → (``[n_q]`` count, ``[n_q, n_kv]`` indices), both ``int32``: each row lists its
    selected columns first, then the others, each group ascending — the exact layout ``create_block_mask`` gets
    from a stable descending sort, here from two row-major compactions and no sort."""
    count = selected.sum(-1, dtype=torch.int32)
    cols = torch.arange(selected.shape[-1], dtype=torch.int32, device=selected.device)
    slots = cols[None, :] < count[:, None]  # the first `count` slots of each row take the selected columns
    indices = torch.empty(selected.shape, dtype=torch.int32, device=selected.device)
    cols = cols.expand(selected.shape)
    indices.masked_scatter_(slots, cols.masked_select(selected))
    indices.masked_scatter_(~slots, cols.masked_select(~selected))
    return count, indices


def _segment_types(table: SplitTable) -> torch.Tensor:
    """``[S]`` picture colour index per split: 0 text/causal, 1 ViT, 2 clean VAE, 3 noise, 4 padding."""
    kind = torch.zeros(len(table), dtype=torch.long)
    mod = table.modalities.cpu()
    kind[mod == Modality.VIT] = 1
    kind[mod == Modality.VAE_CLEAN] = 2
    kind[mod == Modality.PAD] = 4
    kind[table.modes.cpu() == AttnMode.NOISE] = 3
    return kind


class MaskBuilder:
    """Builds Generalized Causal Attention masks (SPEC §3) from a :class:`SplitTable`.

    Holds no weights; build one mask per packed batch and share it across layers.

    Args:
        block_size: flex-attention tile side (queries and keys); 128 matches flex's default kernels.

    Example:
        >>> builder = MaskBuilder(block_size=128)
        >>> bm = builder.block_mask(batch.splits, device="cuda")   # doctest: +SKIP
        >>> out = flex_attention(q, k, v, block_mask=bm)            # doctest: +SKIP
    """

    def __init__(self, *, block_size: int = 128) -> None:
        if block_size < 1:
            raise ValueError(f"MaskBuilder block_size must be >= 1, got {block_size}")
        self.block_size = block_size

    def mask_mod(self, table: SplitTable, *, device: torch.device | str | None = None) -> MaskMod:
        """The flex ``mask_mod(b, h, q_idx, kv_idx) -> bool`` of ``table`` (per-token lookups, O(L) memory)."""
        tokens = _TokenTables.of(table, _device(table, device))

        def generalized_causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
            return tokens.allowed(q_idx, kv_idx)

        return generalized_causal

    def block_mask(self, table: SplitTable, *, device: torch.device | str | None = None) -> BlockMask:
        """Flex-attention ``BlockMask`` of shape ``(1, 1, L, L)`` from interval arithmetic over the splits.

        Identical (tensors and ``mask_mod`` semantics) to ``create_block_mask(self.mask_mod(table), None, None,
        L, L, BLOCK_SIZE=block_size)``, at a cost of O(L + (L / block_size)²) instead of O(L²).
        Requires each document to be one contiguous run of splits (what the packer produces).
        """
        length = table.seq_len
        if length == 0:
            raise ValueError("MaskBuilder.block_mask got an empty SplitTable (seq_len 0)")
        _check_contiguous_docs(table)
        dev = _device(table, device)
        classes = _classify_blocks(table, self.block_size, self.block_size, dev)
        # The q-major lists (used by the backward pass) come from the same classes, transposed: this is what
        # BlockMask.from_kv_blocks derives by densifying and sorting, at a fraction of the cost.
        kv_num, kv_idx = _ordered(classes.partial)
        full_kv_num, full_kv_idx = _ordered(classes.full)
        q_num, q_idx = _ordered(classes.partial.T.contiguous())
        full_q_num, full_q_idx = _ordered(classes.full.T.contiguous())
        return BlockMask(
            seq_lengths=(length, length),
            kv_num_blocks=kv_num[None, None],
            kv_indices=kv_idx[None, None],
            full_kv_num_blocks=full_kv_num[None, None],
            full_kv_indices=full_kv_idx[None, None],
            q_num_blocks=q_num[None, None],
            q_indices=q_idx[None, None],
            full_q_num_blocks=full_q_num[None, None],
            full_q_indices=full_q_idx[None, None],
            BLOCK_SIZE=(self.block_size, self.block_size),
            mask_mod=self.mask_mod(table, device=dev),
        )

    def dense(
        self, table: SplitTable, *, device: torch.device | str | None = None, rows_per_chunk: int = 512
    ) -> torch.Tensor:
        """``[L, L]`` bool mask, True = may attend (SDPA's ``attn_mask`` convention).

        Vectorised per-token compares (the same predicate as :meth:`mask_mod`), written in place
        ``rows_per_chunk`` query rows at a time so temporaries stay small.
        """
        dev = _device(table, device)
        length = table.seq_len
        tok = _TokenTables.of(table, dev)
        keys = torch.arange(length, device=dev, dtype=torch.int32)[None, :]
        key_clean, key_doc = ~tok.noise[None, :], tok.doc[None, :]
        out = torch.empty(length, length, dtype=torch.bool, device=dev)
        for r0 in range(0, length, rows_per_chunk):
            rows = slice(r0, min(r0 + rows_per_chunk, length))
            chunk = out[rows]
            torch.lt(keys, tok.visible_end[rows, None], out=chunk)
            chunk &= (keys >= tok.split_start[rows, None]) | key_clean
            chunk &= key_doc == tok.doc[rows, None]
        return out

    def documents(self, table: SplitTable, *, device: torch.device | str | None = None) -> DocumentMask:
        """The mask as one ``[n_d, n_d]`` diagonal block per document (:class:`DocumentMask`), never ``[L, L]``.

        Each block is the same per-pair predicate as :meth:`dense`, evaluated over that document's tokens only
        (rule 1 holds trivially inside it). Requires each document to be one contiguous run of splits.
        """
        if table.seq_len == 0:
            raise ValueError("MaskBuilder.documents got an empty SplitTable (seq_len 0)")
        _check_contiguous_docs(table)
        dev = _device(table, device)
        tok = _TokenTables.of(table, dev)
        doc_lengths = torch.unique_consecutive(tok.doc, return_counts=True)[1].tolist()  # one run per document
        blocks, start = [], 0
        for n in doc_lengths:
            tokens = torch.arange(start, start + n, device=dev)
            blocks.append(tok.allowed(tokens[:, None], tokens[None, :]))
            start += n
        return DocumentMask(lengths=tuple(doc_lengths), blocks=tuple(blocks))

    def mask_image(self, table: SplitTable, *, max_side: int = 512) -> torch.Tensor:
        """``uint8 [3, H, W]`` picture of the mask; rows are queries, columns keys, ``H = W <= max_side``.

        A visible pixel takes the colour of its key's segment (blue text/causal, green ViT, amber clean VAE,
        red noise, grey padding); black = masked. Above ``max_side`` tokens each pixel is a square cell of
        tokens classified by interval arithmetic: full brightness if every pair is visible, half if only some are.
        """
        length = table.seq_len
        if length == 0:
            return torch.zeros(3, 0, 0, dtype=torch.uint8)
        key_colour = _SEGMENT_COLOURS[_segment_types(table)[table.token_split_ids().cpu()]]  # [L, 3]
        if length <= max_side:
            visible = self.dense(table, device="cpu").to(torch.uint8)  # [L, L]
            picture = visible[:, :, None] * key_colour[None, :, :]
        else:
            _check_contiguous_docs(table)
            cell = -(-length // max_side)
            classes = _classify_blocks(table, cell, cell, torch.device("cpu"))
            centres = torch.arange(0, length, cell).add(cell // 2).clamp(max=length - 1)
            colour = key_colour[centres].to(torch.int32)[None, :, :]  # [1, W, 3]
            level = classes.full.to(torch.int32) * 2 + classes.partial.to(torch.int32)  # 2 full, 1 partial
            picture = (colour * level[:, :, None] // 2).to(torch.uint8)
        return picture.permute(2, 0, 1).contiguous()

    def save_mask_png(self, table: SplitTable, path: str | Path, *, max_side: int = 512) -> Path:
        """Write :meth:`mask_image` as a PNG at ``path``; returns the path."""
        from PIL import Image

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.mask_image(table, max_side=max_side).permute(1, 2, 0).numpy()).save(path)
        return path


def reference_mask(table: SplitTable) -> torch.Tensor:
    """``[L, L]`` bool mask from the three SPEC §3 rules applied literally to every (q, k) pair. Tests only.

    Example:
        >>> table = SplitTable.from_rows([(0, 2, AttnMode.CAUSAL, 0, Modality.TEXT)])
        >>> reference_mask(table).tolist()
        [[True, False], [True, True]]
    """
    split_of: list[int] = []
    for index, (_, length, *_rest) in enumerate(table.rows()):
        split_of += [index] * length
    rows = table.rows()
    size = len(split_of)
    out = torch.zeros(size, size, dtype=torch.bool)
    for q in range(size):
        sq = split_of[q]
        _, _, mode_q, doc_q, _ = rows[sq]
        for k in range(size):
            sk = split_of[k]
            _, _, mode_k, doc_k, _ = rows[sk]
            same_doc = doc_q == doc_k  # rule 1
            same_bidir_split = sq == sk and mode_q in (AttnMode.FULL, AttnMode.NOISE)
            causal_or_bidir = k <= q or same_bidir_split  # rule 2
            noise_ok = mode_k != AttnMode.NOISE or sq == sk  # rule 3
            out[q, k] = same_doc and causal_or_bidir and noise_ok
    return out


def _device(table: SplitTable, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else table.starts.device
