"""Layout of packed documents: pieces, plans, CE labels and the sequence builder (SPEC §2–3).

The :class:`~chatumm_kit.data.packing.Packer` turns a sample into a :class:`DocumentPlan` (a list of
:class:`StreamPiece` s, one split each), decides which pieces CFG dropout keeps, and hands both to a
:class:`StreamBuilder`, which assigns positions, computes labels (:func:`document_labels`), builds the image views
and finally the :class:`~chatumm_kit.components.batch.PackedBatch`. The rules are stated in ``data/packing.py``.

The RoPE position rule (SPEC §3 with the packer's CFG-dropout rule) is written once, here, and used by the packer and
by the chat contexts alike (``inference/context.py``): :meth:`StreamPiece.position_ids` (text: one position per
token; an image view: one shared position) and :meth:`StreamPiece.advance` (kept text: its length; dropped text: 0;
a clean view, kept or dropped: 1; a noised view: 0).

Example:
    >>> piece = StreamPiece(Modality.VIT, turn=0, segment=1, image="a", grid=(2, 3))
    >>> piece.num_tokens
    8
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from chatumm_kit.components.batch import PackedBatch
from chatumm_kit.components.splits import Modality, SplitTable
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import Role
from chatumm_kit.data.image_views import grid_rc, resize_image, vae_pixels, vit_patches

__all__ = ["DocumentPlan", "StreamBuilder", "StreamPiece", "TurnPlan", "document_labels", "position_advance"]

# Token kinds while building: which embedding path a position takes (SPEC §4 routing follows from it).
_K_TEXT, _K_VIT, _K_VAE = 0, 1, 2


@dataclass(frozen=True)
class StreamPiece:
    """One split of a document before dropout.

    Attributes:
        modality: ``TEXT``, ``VAE_NOISED``, ``VAE_CLEAN`` or ``VIT``.
        turn: index of the turn in the dialogue.
        segment: index of the segment in its turn (an image segment yields 2–3 pieces with the same index).
        content: text token ids without markers (``TEXT`` only).
        image: image key (image views only).
        grid: token grid ``(rows, cols)`` of an image view; ``(0, 0)`` for text.
        droppable: CFG dropout may remove it.
    """

    modality: Modality
    turn: int
    segment: int
    content: tuple[int, ...] = ()
    image: str | None = None
    grid: tuple[int, int] = (0, 0)
    droppable: bool = False

    @property
    def num_tokens(self) -> int:
        """Tokens including the two markers."""
        inner = len(self.content) if self.modality is Modality.TEXT else self.grid[0] * self.grid[1]
        return inner + 2

    def position_ids(self, start: int) -> list[int]:
        """RoPE positions of the piece's tokens when it begins at ``start`` (SPEC §3): text advances by one per
        token; every token of an image view (markers included) shares ``start``."""
        if self.modality is Modality.TEXT:
            return list(range(start, start + self.num_tokens))
        return [start] * self.num_tokens

    def advance(self, kept: bool) -> int:
        """How far the piece moves the position (SPEC §3 with the CFG-dropout rule): kept text by its length,
        dropped text by 0; a clean view (VAE or ViT) by 1 whether kept or dropped; a noised view by 0 (its clean copy
        reuses the position)."""
        if self.modality is Modality.TEXT:
            return self.num_tokens if kept else 0
        return 1 if self.modality in (Modality.VIT, Modality.VAE_CLEAN) else 0


def position_advance(pieces: Sequence[StreamPiece], keep: Sequence[bool]) -> int:
    """How far ``pieces`` move the RoPE position, each kept or dropped as ``keep`` says (:meth:`StreamPiece.advance`).

    Example:
        >>> text = StreamPiece(Modality.TEXT, 0, 0, content=(7, 8))
        >>> view = StreamPiece(Modality.VIT, 0, 1, image="a", grid=(2, 2))
        >>> position_advance([text, view], [True, False]), position_advance([text, view], [False, True])
        (5, 1)
    """
    return sum(piece.advance(kept) for piece, kept in zip(pieces, keep, strict=True))


@dataclass(frozen=True)
class TurnPlan:
    """Role of a turn and whether it is supervised (a trainable assistant turn)."""

    role: Role
    supervised: bool


@dataclass(eq=False)
class DocumentPlan:
    """A sample serialised to pieces (tokenised, sizes fixed, pixels untouched); what the packer lays out.

    Attributes:
        key: the sample key (or the dialogue id when the sample has none).
        dialogue_id: the dialogue id.
        turns: one :class:`TurnPlan` per dialogue turn.
        pieces: the pieces in stream order.
        images: key → ``uint8 [3, H, W]``.
        vit_size / vae_size: key → resized ``(h, w)`` of the image's ViT / VAE view.
    """

    key: str
    dialogue_id: str
    turns: list[TurnPlan]
    pieces: list[StreamPiece]
    images: dict[str, torch.Tensor]
    vit_size: dict[str, tuple[int, int]]
    vae_size: dict[str, tuple[int, int]]

    @property
    def num_tokens(self) -> int:
        """Token count with nothing dropped."""
        return sum(p.num_tokens for p in self.pieces)


def document_labels(
    plan: DocumentPlan, keep: Sequence[bool], offsets: dict[int, int], tokenizer: ChatTokenizer
) -> list[tuple[int, int]]:
    """CE ``(position, label)`` pairs of one document (SPEC §2), given which pieces are kept and where they start.

    Args:
        plan: the document.
        keep: per piece, whether it survived dropout.
        offsets: piece index → position of its first token in the packed sequence (kept pieces only).
        tokenizer: for the marker and end ids.
    """
    tok = tokenizer
    kept_by_turn: list[list[int]] = [[] for _ in plan.turns]
    for idx, (piece, k) in enumerate(zip(plan.pieces, keep)):
        if k:
            kept_by_turn[piece.turn].append(idx)
    out: list[tuple[int, int]] = []
    for t, turn in enumerate(plan.turns):
        if not turn.supervised:
            continue
        # A unit is one kept assistant segment: [opening marker id, position of its intent holder or None].
        units: list[list[int | None]] = []
        last_segment = -1
        for idx in kept_by_turn[t]:
            piece, start = plan.pieces[idx], offsets[idx]
            if piece.modality is Modality.TEXT:
                seq = (tok.im_start_id, *piece.content, tok.im_end_id)
                out.extend((start + i, seq[i + 1]) for i in range(len(seq) - 1))  # next-token targets
                units.append([tok.im_start_id, start + len(seq) - 1])
            else:
                if piece.segment != last_segment:
                    units.append([tok.vision_start_id, None])
                if piece.modality is Modality.VIT:  # last clean view of a generated image holds the intent
                    units[-1][1] = start + piece.num_tokens - 1
            last_segment = piece.segment
        for u, (_, holder) in enumerate(units):
            if holder is not None:
                out.append((holder, units[u + 1][0] if u + 1 < len(units) else tok.end_id))
        # The user turn's last token predicts the modality of the reply (SPEC §2).
        if units and t > 0 and plan.turns[t - 1].role is Role.USER and kept_by_turn[t - 1]:
            last = kept_by_turn[t - 1][-1]
            piece = plan.pieces[last]
            if piece.modality in (Modality.TEXT, Modality.VIT):
                out.append((offsets[last] + piece.num_tokens - 1, units[0][0]))
    out.sort()
    return out


class StreamBuilder:
    """Accumulates the packed sequence, one document at a time, and builds the :class:`PackedBatch`.

    Args:
        tokenizer: for marker, pad and end ids.
        vit_patch_size / vit_mean / vit_std: how ViT views are patchified and normalised.
    """

    def __init__(
        self, *, tokenizer: ChatTokenizer, vit_patch_size: int, vit_mean: Sequence[float], vit_std: Sequence[float]
    ) -> None:
        self.tokenizer = tok = tokenizer
        self.vit_patch_size = vit_patch_size
        self.vit_mean = tuple(vit_mean)
        self.vit_std = tuple(vit_std)
        self.ids_text = (tok.im_start_id, tok.im_end_id)
        self.ids_vision = (tok.vision_start_id, tok.vision_end_id)
        self.pad_id = tok.pad_id
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.kind: list[int] = []
        self.rows: list[tuple[int, int, int, int, int]] = []
        self.ce: list[tuple[int, int]] = []
        self.vit_patches: list[torch.Tensor] = []
        self.vit_rc: list[torch.Tensor] = []
        self.vit_grid: list[tuple[int, int]] = []
        self.vae_images: list[torch.Tensor] = []
        self.vae_view_image: list[int] = []
        self.vae_view_noised: list[bool] = []
        self.vae_grid: list[tuple[int, int]] = []
        self.vae_token_view: list[torch.Tensor] = []
        self.vae_rc: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        return len(self.ids)

    def add_document(self, doc: int, plan: DocumentPlan, keep: Sequence[bool]) -> None:
        """Append document ``doc``: its kept pieces (``keep[i]`` for ``plan.pieces[i]``), positions from 0, labels."""
        offsets = self.add_pieces(
            doc, plan.pieces, keep, images=plan.images, vit_size=plan.vit_size, vae_size=plan.vae_size
        )
        self.ce.extend(document_labels(plan, keep, offsets, self.tokenizer))

    def add_pieces(
        self,
        doc: int,
        pieces: Sequence[StreamPiece],
        keep: Sequence[bool],
        *,
        images: Mapping[str, torch.Tensor],
        vit_size: Mapping[str, tuple[int, int]],
        vae_size: Mapping[str, tuple[int, int]],
    ) -> dict[int, int]:
        """Append the kept ``pieces`` as document ``doc`` (positions from 0, no CE labels); returns piece index ->
        position of its first token in the sequence (kept pieces only).

        ``images``: key → ``uint8 [3, H, W]``; ``vit_size`` / ``vae_size``: key → resized ``(h, w)`` of its views.
        """
        position = 0  # each document starts at 0 (SPEC §3)
        offsets: dict[int, int] = {}
        vae_slot: dict[str, int] = {}  # image key -> index in vae_images (one encode per image per document)
        vit_cache: dict[str, torch.Tensor] = {}
        for idx, (piece, k) in enumerate(zip(pieces, keep)):
            if k:
                offsets[idx] = self.length
                self._add_piece(doc, piece, position, images, vit_size, vae_size, vae_slot, vit_cache)
            position += piece.advance(k)
        return offsets

    def _add_piece(self, doc, piece, position, images, vit_size, vae_size, vae_slot, vit_cache) -> None:
        m = piece.modality
        start, n = self.length, piece.num_tokens
        self.rows.append((start, n, int(m.attn_mode), doc, int(m)))
        self.pos.extend(piece.position_ids(position))
        if m is Modality.TEXT:
            self.ids.extend((self.ids_text[0], *piece.content, self.ids_text[1]))
            self.kind.extend([_K_TEXT] * n)
            return
        inner = n - 2
        self.ids.extend((self.ids_vision[0], *([self.pad_id] * inner), self.ids_vision[1]))
        key = piece.image
        assert key is not None
        rc = grid_rc(*piece.grid)
        if m is Modality.VIT:
            self.kind.extend((_K_TEXT, *([_K_VIT] * inner), _K_TEXT))
            if key not in vit_cache:
                pixels = resize_image(images[key], vit_size[key])
                vit_cache[key] = vit_patches(pixels, patch=self.vit_patch_size, mean=self.vit_mean, std=self.vit_std)
            self.vit_patches.append(vit_cache[key])
            self.vit_rc.append(rc)
            self.vit_grid.append(piece.grid)
        else:
            self.kind.extend((_K_TEXT, *([_K_VAE] * inner), _K_TEXT))
            if key not in vae_slot:
                vae_slot[key] = len(self.vae_images)
                self.vae_images.append(vae_pixels(resize_image(images[key], vae_size[key])))
            self.vae_token_view.append(torch.full((inner,), len(self.vae_view_image), dtype=torch.long))
            self.vae_view_image.append(vae_slot[key])
            self.vae_view_noised.append(m is Modality.VAE_NOISED)
            self.vae_grid.append(piece.grid)
            self.vae_rc.append(rc)

    def add_padding(self, doc: int, n: int) -> None:
        """A padding split with a document id of its own, embedded as ``pad_id`` (understanding expert)."""
        if n <= 0:
            return
        self.rows.append((self.length, n, int(Modality.PAD.attn_mode), doc, int(Modality.PAD)))
        self.ids.extend([self.pad_id] * n)
        self.pos.extend(range(n))
        self.kind.extend([_K_TEXT] * n)

    def build(self, *, sample_keys: list[str], num_real_tokens: int, token_budget: int) -> PackedBatch:
        long = torch.long
        kind = torch.tensor(self.kind, dtype=long)
        ce_idx = torch.tensor([i for i, _ in self.ce], dtype=long)
        ce_lab = torch.tensor([y for _, y in self.ce], dtype=long)
        patch_dim = self.vit_patch_size**2 * 3

        def cat(xs: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
            return torch.cat(xs) if xs else empty

        def hw(xs: list[tuple[int, int]]) -> torch.Tensor:
            return torch.tensor(xs, dtype=long).reshape(-1, 2)

        return PackedBatch(
            input_ids=torch.tensor(self.ids, dtype=long),
            position_ids=torch.tensor(self.pos, dtype=long),
            splits=SplitTable.from_rows(self.rows),
            text_indices=(kind == _K_TEXT).nonzero().flatten(),
            vit_indices=(kind == _K_VIT).nonzero().flatten(),
            vae_indices=(kind == _K_VAE).nonzero().flatten(),
            und_indices=(kind != _K_VAE).nonzero().flatten(),
            gen_indices=(kind == _K_VAE).nonzero().flatten(),
            ce_indices=ce_idx,
            ce_labels=ce_lab,
            vit_patches=cat(self.vit_patches, torch.zeros(0, patch_dim)),
            vit_patch_rc=cat(self.vit_rc, torch.zeros(0, 2, dtype=long)),
            vit_grid_hw=hw(self.vit_grid),
            vae_images=self.vae_images,
            vae_view_image=torch.tensor(self.vae_view_image, dtype=long),
            vae_view_noised=torch.tensor(self.vae_view_noised, dtype=torch.bool),
            vae_grid_hw=hw(self.vae_grid),
            vae_token_view=cat(self.vae_token_view, torch.zeros(0, dtype=long)),
            vae_token_rc=cat(self.vae_rc, torch.zeros(0, 2, dtype=long)),
            sample_keys=sample_keys,
            num_real_tokens=num_real_tokens,
            token_budget=token_budget,
        )
