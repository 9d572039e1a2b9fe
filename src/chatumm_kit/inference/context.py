"""Attention contexts of a chat and the runner that appends stream pieces to them (SPEC §2–4).

A :class:`CacheContext` is one growing token stream as the MoT sees it: a :class:`MoTKVCache` of every committed
token and the 1-D RoPE position of the next one. A chat keeps three (see ``inference/session.py``).

:class:`StreamRunner` turns stream pieces into cache rows:

* :meth:`StreamRunner.embed` embeds a list of pieces **once** (token table for text and markers, ViT for ViT views,
  VAE head at ``t = 0`` for clean VAE views), through the packer's own layout code (``StreamBuilder``) and
  ``ChatUMM.embed``, so a prefilled chunk is bit-for-bit the input a packed training sequence would give;
* :meth:`StreamRunner.prefill` appends the pieces a context keeps (``keep``) and commits them. Positions follow
  SPEC §3 and the packer's CFG-dropout rule: kept text advances by its length, dropped text by nothing; an image
  view shares one position, and a clean view advances by 1 *whether kept or dropped*; the mask inside the chunk is
  the GCA mask of its splits (``MaskBuilder.dense``), and every query also sees the whole cache;
* :meth:`StreamRunner.step` appends one text token (decoding);
* :meth:`StreamRunner.noised_velocity` runs a noised VAE view (``v_s`` + latents at time ``t`` + ``v_e``, one
  ``noise`` split, all at the context's position) with ``commit=False`` and returns its velocity: nothing stays in
  the cache and the position does not move (a noised view never advances, SPEC §3).

Example:
    >>> runner = StreamRunner(model=model, packer=packer)                       # doctest: +SKIP
    >>> ctx = CacheContext(cache=model.backbone.new_kv_cache(), position=0)     # doctest: +SKIP
    >>> chunk = runner.embed(runner.turn_pieces(turn, images), images)          # doctest: +SKIP
    >>> last_hidden = runner.prefill(ctx, chunk, keep=[True] * len(chunk))      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from chatumm_kit.components.kv_cache import MoTKVCache
from chatumm_kit.components.splits import AttnMode, Modality, SplitTable
from chatumm_kit.data.dialogue import ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.image_views import grid_rc
from chatumm_kit.data.packing import Packer
from chatumm_kit.data.stream_layout import DocumentPlan, StreamBuilder, StreamPiece, TurnPlan
from chatumm_kit.model import ChatUMM, FlowInputs

__all__ = ["CacheContext", "EmbeddedChunk", "StreamRunner", "position_advance", "to_uint8"]

_MODE = {Modality.TEXT: AttnMode.CAUSAL, Modality.VIT: AttnMode.FULL, Modality.VAE_CLEAN: AttnMode.FULL}


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


def position_advance(pieces: Sequence[StreamPiece], keep: Sequence[bool]) -> int:
    """How far ``pieces`` move the RoPE position (SPEC §3 with the packer's dropout rule).

    Kept text: its token count; dropped text: 0; clean image view, kept or dropped: 1; noised view: 0.

    Example:
        >>> text = StreamPiece(Modality.TEXT, 0, 0, content=(7, 8))
        >>> view = StreamPiece(Modality.VIT, 0, 1, image="a", grid=(2, 2))
        >>> position_advance([text, view], [True, False]), position_advance([text, view], [False, True])
        (5, 1)
    """
    step = 0
    for piece, kept in zip(pieces, keep, strict=True):
        if piece.modality is Modality.TEXT:
            step += piece.num_tokens if kept else 0
        elif piece.modality in (Modality.VIT, Modality.VAE_CLEAN):
            step += 1
    return step


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` float in about ``[-1, 1]`` → ``uint8`` on the CPU (clamped, rounded)."""
    return ((pixels.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).cpu()


@dataclass
class EmbeddedChunk:
    """Pieces embedded once, to be prefilled into one or more contexts.

    Attributes:
        pieces: the pieces in stream order (text or clean image views).
        hidden: ``[L, D]`` input embeddings of all pieces (every piece kept).
        spans: ``(start, length)`` of each piece in ``hidden``.
        is_gen: ``[L]`` bool, True for VAE latent tokens (generation expert).
    """

    pieces: list[StreamPiece]
    hidden: torch.Tensor
    spans: list[tuple[int, int]]
    is_gen: torch.Tensor

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
        tok = self.tokenizer
        self._vision_ids = torch.tensor([tok.vision_start_id, tok.vision_end_id])

    @property
    def device(self) -> torch.device:
        return self.model.backbone.lm_head.weight.device

    def new_context(self) -> CacheContext:
        """An empty context at position 0."""
        return CacheContext(cache=self.model.backbone.new_kv_cache(), position=0)

    # ------------------------------------------------------------------ pieces
    def turn_pieces(
        self,
        turn: Turn,
        images: Mapping[str, torch.Tensor],
        text_ids: Sequence[Sequence[int] | None] | None = None,
    ) -> list[StreamPiece]:
        """The context pieces of ``turn`` as the packer lays out a non-trainable turn (SPEC §2).

        Text → one ``TEXT`` piece (role prefix on the turn's first text segment); image → clean VAE view then ViT
        view. ``text_ids[j]``, when given, are the exact content ids of text segment ``j`` (a replayed generated
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
                pieces.extend(self.image_pieces(seg.image, images[seg.image], segment=j))
            else:
                raise TypeError(f"{turn.role.value} segment {j}: not a segment: {seg!r}")
        return pieces

    def image_pieces(self, key: str, image: torch.Tensor, *, segment: int = 0) -> list[StreamPiece]:
        """Clean VAE view then ViT view of one ``uint8 [3, H, W]`` image."""
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {key!r}: expected uint8 [3, H, W], got {image.dtype} {tuple(image.shape)}")
        (vit_h, vit_w), (vae_h, vae_w) = self.packer.view_sizes(int(image.shape[1]), int(image.shape[2]))
        p, s = self.packer.vit_patch_size, self.packer.vae_token_stride
        return [
            StreamPiece(Modality.VAE_CLEAN, 0, segment, image=key, grid=(vae_h // s, vae_w // s)),
            StreamPiece(Modality.VIT, 0, segment, image=key, grid=(vit_h // p, vit_w // p)),
        ]

    # ------------------------------------------------------------------ embedding
    def embed(self, pieces: Sequence[StreamPiece], images: Mapping[str, torch.Tensor]) -> EmbeddedChunk:
        """Embed every piece once through the packer's ``StreamBuilder`` and ``ChatUMM.embed``."""
        pieces = [replace(p, turn=0) for p in pieces]
        keys = {p.image for p in pieces if p.image is not None}
        sizes = {k: self.packer.view_sizes(int(images[k].shape[1]), int(images[k].shape[2])) for k in keys}
        plan = DocumentPlan(
            key="chunk",
            dialogue_id="chunk",
            turns=[TurnPlan(role=Role.USER, supervised=False)],
            pieces=pieces,
            images={k: images[k] for k in keys},
            vit_size={k: v[0] for k, v in sizes.items()},
            vae_size={k: v[1] for k, v in sizes.items()},
        )
        builder = StreamBuilder(
            tokenizer=self.tokenizer,
            vit_patch_size=self.packer.vit_patch_size,
            vit_mean=self.packer.vit_mean,
            vit_std=self.packer.vit_std,
        )
        builder.add_document(0, plan, [True] * len(pieces))
        n = builder.length
        batch = builder.build(sample_keys=["chunk"], num_real_tokens=n, token_budget=n).to(self.device)
        empty = FlowInputs(
            timesteps=torch.zeros(0, device=self.device),
            noise=torch.zeros(0, self.model.vae.token_dim, device=self.device),
        )
        hidden, _, _ = self.model.embed(batch, empty)
        is_gen = torch.zeros(n, dtype=torch.bool, device=self.device)
        is_gen[batch.gen_indices] = True
        spans = [(start, length) for start, length, *_ in batch.splits.rows()]
        return EmbeddedChunk(pieces=pieces, hidden=hidden, spans=spans, is_gen=is_gen)

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
        positions: list[torch.Tensor] = []
        pos, length = ctx.position, 0
        for piece, (s, n), kept in zip(pieces, chunk.spans[start:stop], keep):
            if kept:
                rows.append((length, n, int(_MODE[piece.modality]), 0, int(piece.modality)))
                token_idx.append(torch.arange(s, s + n))
                if piece.modality is Modality.TEXT:
                    positions.append(torch.arange(pos, pos + n))
                else:
                    positions.append(torch.full((n,), pos))
                length += n
            pos += position_advance([piece], [kept])
        if not rows:
            ctx.position = pos
            return None
        dev = self.device
        idx = torch.cat(token_idx).to(dev)
        is_gen = chunk.is_gen[idx]
        out = self.model.backbone(
            chunk.hidden[idx],
            position_ids=torch.cat(positions).to(dev),
            und_indices=(~is_gen).nonzero().flatten(),
            gen_indices=is_gen.nonzero().flatten(),
            attn_mask=self.model.mask_builder.dense(SplitTable.from_rows(rows)).to(dev),
            kv_cache=ctx.cache,
            commit=True,
        )
        ctx.position = pos
        return out[-1]

    def step(self, ctx: CacheContext, token_id: int) -> torch.Tensor:
        """Commit one text token (inside an open text split) at ``ctx.position``; returns its ``[D]`` output."""
        dev = self.device
        backbone = self.model.backbone
        out = backbone(
            backbone.embed_tokens(torch.tensor([int(token_id)], device=dev)),
            position_ids=torch.tensor([ctx.position], device=dev),
            und_indices=torch.zeros(1, dtype=torch.long, device=dev),
            gen_indices=torch.zeros(0, dtype=torch.long, device=dev),
            attn_mask=torch.ones(1, 1, dtype=torch.bool, device=dev),
            kv_cache=ctx.cache,
            commit=True,
        )
        ctx.position += 1
        return out[0]

    def noised_velocity(self, ctx: CacheContext, x_t: torch.Tensor, t: float, grid: tuple[int, int]) -> torch.Tensor:
        """Velocity ``[N, p²C]`` (float32) of the noised view ``x_t [N, p²C]`` at time ``t`` in context ``ctx``.

        The view (``v_s`` + ``N`` latent tokens + ``v_e``) is one ``noise`` split at ``ctx.position``; it sees the
        whole cache and nothing keeps it (``commit=False``).
        """
        dev = self.device
        model = self.model
        n = x_t.shape[0]
        if n != grid[0] * grid[1]:
            raise ValueError(f"noised_velocity: {n} latent tokens do not fill a {grid[0]}x{grid[1]} grid")
        latents = model.vae.embed(x_t.to(dev), torch.full((n,), float(t), device=dev), grid_rc(*grid).to(dev))
        markers = model.backbone.embed_tokens(self._vision_ids.to(dev))
        hidden = torch.cat([markers[:1], latents.to(markers.dtype), markers[1:]])
        length = n + 2
        out = model.backbone(
            hidden,
            position_ids=torch.full((length,), ctx.position, device=dev),
            und_indices=torch.tensor([0, length - 1], device=dev),
            gen_indices=torch.arange(1, length - 1, device=dev),
            attn_mask=torch.ones(length, length, dtype=torch.bool, device=dev),
            kv_cache=ctx.cache,
            commit=False,
        )
        return model.vae.velocity(out[1:-1]).float()
