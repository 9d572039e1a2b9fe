"""Attention contexts of a chat and the runner that appends stream pieces to them (SPEC §2–4).

A :class:`CacheContext` is one growing token stream as the MoT sees it: a :class:`MoTKVCache` of every committed
token and the 1-D RoPE position of the next one. A chat keeps three (see ``inference/session.py``).

:class:`StreamRunner` turns stream pieces into cache rows:

* :meth:`StreamRunner.embed` embeds a list of pieces **once** (token table for text and markers, ViT for ViT views,
  VAE head at ``t = 0`` for clean VAE views), through the packer's own layout code (``StreamBuilder.add_pieces``)
  and ``ChatUMM.embed_stream``, so a prefilled chunk is bit-for-bit the input a packed training sequence would give;
* :meth:`StreamRunner.prefill` appends the pieces a context keeps (``keep``) and commits them. Positions follow
  the packer's own rule (``StreamPiece.position_ids`` / ``StreamPiece.advance``: SPEC §3 with the CFG-dropout rule,
  so a dropped clean view still advances by 1); the mask inside the chunk is the GCA mask of its splits
  (``ChatUMM.chunk_mask``), and every query also sees the whole cache;
* :meth:`StreamRunner.step` appends one text token (decoding): :func:`token_chunk`;
* :meth:`StreamRunner.noised_velocity` runs a noised VAE view (``ChatUMM.embed_noised_views``: ``v_s`` + latents at
  time ``t`` + ``v_e``) as :func:`noised_view_chunk` — one bidirectional split at the context's position, not
  committed — and returns its velocity: nothing stays in the cache and the position does not move (a noised view
  never advances, SPEC §3).

:func:`token_chunk` and :func:`noised_view_chunk` are the two chunks a reply appends step by step; the stacked
forward of several contexts (``inference/steps.py``) builds the same chunks.

Example:
    >>> runner = StreamRunner(model=model, packer=packer)                       # doctest: +SKIP
    >>> ctx = CacheContext(cache=model.new_kv_cache(), position=0)              # doctest: +SKIP
    >>> chunk = runner.embed(runner.turn_pieces(turn, images), images)          # doctest: +SKIP
    >>> last_hidden = runner.prefill(ctx, chunk, keep=[True] * len(chunk))      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from chatumm_kit.components.kv_cache import CacheChunk, MoTKVCache
from chatumm_kit.components.splits import Modality, SplitTable
from chatumm_kit.data.dialogue import ImageSegment, TextSegment, Turn
from chatumm_kit.data.packing import Packer
from chatumm_kit.data.stream_layout import StreamBuilder, StreamPiece
from chatumm_kit.model import ChatUMM, NoisedView, StreamInputs

__all__ = ["CacheContext", "EmbeddedChunk", "StreamRunner", "noised_view_chunk", "to_uint8", "token_chunk"]


@dataclass
class CacheContext:
    """One attention context: the KV cache of its committed tokens and the RoPE position of the next token.

    Example:
        >>> ctx = CacheContext(cache=MoTKVCache(num_layers=1, num_kv_heads=1, head_dim=2), position=0)
        >>> ctx.fork().position, ctx.num_tokens
        (0, 0)
    """

    cache: MoTKVCache
    position: int

    @property
    def num_tokens(self) -> int:
        return self.cache.num_tokens

    def fork(self) -> CacheContext:
        """An independent copy (the cache rows are copied, not recomputed)."""
        return CacheContext(cache=self.cache.clone(), position=self.position)

    def restore(self, num_tokens: int, position: int) -> None:
        """Go back to an earlier state of this same stream (drops every token from ``num_tokens`` on)."""
        self.cache.truncate(num_tokens)
        self.position = position


def token_chunk(ctx: CacheContext, embedding: torch.Tensor) -> CacheChunk:
    """One decoded text token (``embedding [1, D]``) at ``ctx.position``, inside an open text split: committed."""
    dev = embedding.device
    return CacheChunk(
        cache=ctx.cache,
        hidden=embedding,
        position_ids=torch.full((1,), ctx.position, device=dev),
        is_gen=torch.zeros(1, dtype=torch.bool, device=dev),
        mask=torch.ones(1, 1, dtype=torch.bool, device=dev),
        commit=True,
    )


def noised_view_chunk(ctx: CacheContext, view: StreamInputs) -> CacheChunk:
    """A noised view (``ChatUMM.embed_noised_views``) in context ``ctx``: one ``noise`` split (bidirectional inside)
    with every token at ``ctx.position`` (SPEC §3: a noised view shares its image's position and never advances it),
    not committed (rule 3: nothing later sees it)."""
    n, dev = len(view), view.hidden.device
    return CacheChunk(
        cache=ctx.cache,
        hidden=view.hidden,
        position_ids=torch.full((n,), ctx.position, device=dev),
        is_gen=view.is_gen,
        mask=torch.ones(n, n, dtype=torch.bool, device=dev),
        commit=False,
    )


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` float in about ``[-1, 1]`` → ``uint8`` on the CPU (clamped, rounded)."""
    return ((pixels.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).cpu()


@dataclass
class EmbeddedChunk:
    """Pieces embedded once, to be prefilled into one or more contexts.

    Attributes:
        pieces: the pieces in stream order (text or clean image views).
        inputs: ``[L, D]`` input embeddings of all pieces (every piece kept) with their expert routing.
        spans: ``(start, length)`` of each piece in ``inputs``.
    """

    pieces: list[StreamPiece]
    inputs: StreamInputs
    spans: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.pieces)


class StreamRunner:
    """Embeds stream pieces and runs them through the MoT into :class:`CacheContext` s (see module docstring).

    Args:
        model: the ChatUMM (put in eval mode by the caller).
        packer: the packing settings (tokenizer, ViT patch, VAE stride, max side, ViT normalisation); the same
            ``Packer`` that built the training data lays out inference chunks.
    """

    def __init__(self, *, model: ChatUMM, packer: Packer) -> None:
        self.model = model
        self.packer = packer
        self.tokenizer = packer.tokenizer
        self.vision_ids = (self.tokenizer.vision_start_id, self.tokenizer.vision_end_id)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def new_context(self) -> CacheContext:
        """An empty context at position 0."""
        return CacheContext(cache=self.model.new_kv_cache(), position=0)

    # ------------------------------------------------------------------ pieces
    def turn_pieces(
        self,
        turn: Turn,
        images: Mapping[str, torch.Tensor],
        text_ids: Sequence[Sequence[int] | None] | None = None,
    ) -> list[StreamPiece]:
        """The context pieces of ``turn`` as the packer lays out a non-trainable turn (SPEC §2).

        Text → one ``TEXT`` piece (role prefix on the turn's first text segment); image → clean VAE view then ViT
        view (the ViT view only for an image segment whose ``views`` is ``"vit"``). ``text_ids[j]``, when given, are the exact content ids of text segment ``j`` (a replayed generated
        reply whose ids need not be the canonical encoding of its decoded text).
        """
        pieces: list[StreamPiece] = []
        first_text = True
        for j, seg in enumerate(turn.segments):
            if isinstance(seg, TextSegment):
                given = text_ids[j] if text_ids is not None else None
                if given is not None:
                    ids = tuple(int(i) for i in given)
                else:
                    ids = tuple(self.tokenizer.encode_segment(seg.text, role=turn.role.value, first_in_turn=first_text))
                first_text = False
                if not ids:
                    raise ValueError(f"{turn.role.value} segment {j}: text {seg.text[:40]!r} encodes to no tokens")
                pieces.append(StreamPiece(Modality.TEXT, 0, j, content=ids))
            elif isinstance(seg, ImageSegment):
                pieces.extend(self.image_pieces(seg.image, images[seg.image], segment=j, views=seg.views))
            else:
                raise TypeError(f"{turn.role.value} segment {j}: not a segment: {seg!r}")
        return pieces

    def image_pieces(
        self, key: str, image: torch.Tensor, *, segment: int = 0, views: str = "vae+vit"
    ) -> list[StreamPiece]:
        """Clean VAE view then ViT view of one ``uint8 [3, H, W]`` image (``views="vit"``: the ViT view only)."""
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {key!r}: expected uint8 [3, H, W], got {image.dtype} {tuple(image.shape)}")
        (vit_h, vit_w), (vae_h, vae_w) = self.packer.view_sizes(int(image.shape[1]), int(image.shape[2]))
        p, s = self.packer.vit_patch_size, self.packer.vae_token_stride
        vit = StreamPiece(Modality.VIT, 0, segment, image=key, grid=(vit_h // p, vit_w // p))
        if views == "vit":
            return [vit]
        return [StreamPiece(Modality.VAE_CLEAN, 0, segment, image=key, grid=(vae_h // s, vae_w // s)), vit]

    # ------------------------------------------------------------------ embedding
    def embed(self, pieces: Sequence[StreamPiece], images: Mapping[str, torch.Tensor]) -> EmbeddedChunk:
        """Embed every piece once, laid out by the packer's ``StreamBuilder`` (``add_pieces``: no labels) and
        embedded by ``ChatUMM.embed_stream``."""
        pieces = list(pieces)
        keys = {p.image for p in pieces if p.image is not None}
        sizes = {k: self.packer.view_sizes(int(images[k].shape[1]), int(images[k].shape[2])) for k in keys}
        builder = StreamBuilder(
            tokenizer=self.tokenizer,
            vit_patch_size=self.packer.vit_patch_size,
            vit_mean=self.packer.vit_mean,
            vit_std=self.packer.vit_std,
        )
        builder.add_pieces(
            0,
            pieces,
            [True] * len(pieces),
            images={k: images[k] for k in keys},
            vit_size={k: v[0] for k, v in sizes.items()},
            vae_size={k: v[1] for k, v in sizes.items()},
        )
        n = builder.length
        batch = builder.build(sample_keys=["chunk"], num_real_tokens=n, token_budget=n).to(self.device)
        spans = [(start, length) for start, length, *_ in batch.splits.rows()]
        return EmbeddedChunk(pieces=pieces, inputs=self.model.embed_stream(batch), spans=spans)

    # ------------------------------------------------------------------ running
    def prefill(
        self, ctx: CacheContext, chunk: EmbeddedChunk, keep: Sequence[bool], *, start: int = 0
    ) -> torch.Tensor | None:
        """Commit the pieces ``chunk.pieces[start : start + len(keep)]`` that ``keep`` retains.

        Returns the last kept token's ``[D]`` output (final-normed), or ``None`` when nothing was kept (the position
        may still advance: dropped clean views do).
        """
        stop = start + len(keep)
        if not 0 <= start <= stop <= len(chunk):
            raise ValueError(f"prefill: pieces [{start}, {stop}) are outside the chunk's {len(chunk)} pieces")
        pieces = chunk.pieces[start:stop]
        rows: list[tuple[int, int, int, int, int]] = []
        token_idx: list[torch.Tensor] = []
        positions: list[int] = []
        pos, length = ctx.position, 0
        for piece, (s, n), kept in zip(pieces, chunk.spans[start:stop], keep):
            if kept:
                rows.append((length, n, int(piece.modality.attn_mode), 0, int(piece.modality)))
                token_idx.append(torch.arange(s, s + n))
                positions.extend(piece.position_ids(pos))
                length += n
            pos += piece.advance(kept)
        if not rows:
            ctx.position = pos
            return None
        dev = self.device
        idx = torch.cat(token_idx).to(dev)
        inputs = chunk.inputs
        out = self.model.forward_chunk(
            CacheChunk(
                cache=ctx.cache,
                hidden=inputs.hidden[idx],
                position_ids=torch.tensor(positions, device=dev),
                is_gen=inputs.is_gen[idx],
                mask=self.model.chunk_mask(SplitTable.from_rows(rows)),
                commit=True,
            )
        )
        ctx.position = pos
        return out[-1]

    def step(self, ctx: CacheContext, token_id: int) -> torch.Tensor:
        """Commit one text token (inside an open text split) at ``ctx.position``; returns its ``[D]`` output."""
        out = self.model.forward_chunk(token_chunk(ctx, self.model.embed_text(torch.tensor([int(token_id)]))))
        ctx.position += 1
        return out[0]

    def noised_velocity(self, ctx: CacheContext, x_t: torch.Tensor, t: float, grid: tuple[int, int]) -> torch.Tensor:
        """Velocity ``[N, p²C]`` (float32) of the noised view ``x_t [N, p²C]`` at time ``t`` in context ``ctx``.

        The view (``v_s`` + ``N`` latent tokens + ``v_e``) is :func:`noised_view_chunk`: one ``noise`` split at
        ``ctx.position``; it sees the whole cache and nothing keeps it (``commit=False``).
        """
        [view] = self.model.embed_noised_views([NoisedView(x_t=x_t, t=t, grid=grid)], vision_ids=self.vision_ids)
        out = self.model.forward_chunk(noised_view_chunk(ctx, view))
        return self.model.view_velocities([out])[0]
