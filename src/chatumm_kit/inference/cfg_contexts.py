"""The three CFG contexts of a chat, kept up to date turn by turn (SPEC §4): full, text- and image-unconditional.

What each context holds is defined in ``inference/session.py``; their velocities are combined in
``inference/guidance.py``. This module does the bookkeeping:

* **sharing** — an unconditional context that equals ``full`` is not stored (``None`` internally, ``full`` itself in
  :attr:`GuidanceContexts.view`); at the first piece it must drop, it is forked from ``full`` right there (cache rows
  copied, not recomputed), so a shared prefix is computed once;
* **keep rules** — :func:`keep_text_uncond` (drop the user block's text) and :func:`keep_image_uncond` (drop the user
  block's image views). Both unconditional contexts belong to the current *user block* and restart with the next
  one: each drops only what CFG training dropout drops for the image being generated (``data/droppable.py`` marks
  the segments of the user turn a generated image answers);
* **snapshots** — :meth:`GuidanceContexts.snapshot` / :meth:`GuidanceContexts.restore` for rollback (caches are
  truncated; an unconditional context replaced by a later user block is rebuilt from ``full``).

Example:
    >>> ctxs = GuidanceContexts(runner=runner)                                              # doctest: +SKIP
    >>> ctxs.start_user_block(0)                                                            # doctest: +SKIP
    >>> last = ctxs.extend(chunk, keep_text_uncond(pieces, Role.USER), keep_image_uncond(pieces, Role.USER))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from chatumm_kit.components.splits import Modality
from chatumm_kit.data.dialogue import Role
from chatumm_kit.data.stream_layout import StreamPiece
from chatumm_kit.inference.context import CacheContext, EmbeddedChunk, StreamRunner

__all__ = ["ContextMark", "GuidanceContexts", "SessionContexts", "keep_image_uncond", "keep_text_uncond"]


def keep_text_uncond(pieces: Sequence[StreamPiece], role: Role) -> list[bool]:
    """The text-unconditional context drops the text of user turns (of the current block) and keeps the rest."""
    return [not (role is Role.USER and p.modality is Modality.TEXT) for p in pieces]


def keep_image_uncond(pieces: Sequence[StreamPiece], role: Role) -> list[bool]:
    """The image-unconditional context drops the image views (clean VAE and ViT) of user turns (of the current
    block) and keeps the rest: earlier turns' images, user or generated, stay — CFG training dropout never removes
    them from the context of the image being trained (``data/droppable.py``), so the model never saw them missing."""
    return [not (role is Role.USER and p.modality is not Modality.TEXT) for p in pieces]


@dataclass(frozen=True)
class SessionContexts:
    """The three attention contexts; an unconditional one that equals ``full`` *is* ``full`` (same object)."""

    full: CacheContext
    text_uncond: CacheContext
    image_uncond: CacheContext


@dataclass(frozen=True)
class ContextMark:
    """Snapshot of the contexts: ``(num_tokens, position)`` each (``None``: shared with full) and the user block."""

    full: tuple[int, int]
    text_uncond: tuple[int, int] | None
    image_uncond: tuple[int, int] | None
    block_start: int


def _state(ctx: CacheContext | None) -> tuple[int, int] | None:
    return None if ctx is None else (ctx.num_tokens, ctx.position)


class GuidanceContexts:
    """``full``, text-unconditional and image-unconditional contexts over one :class:`StreamRunner`.

    Args:
        runner: embeds and runs pieces.
    """

    def __init__(self, *, runner: StreamRunner) -> None:
        self.runner = runner
        self.full = runner.new_context()
        self.text_uncond: CacheContext | None = None  # None: the same as full
        self.image_uncond: CacheContext | None = None
        self.block_start = 0  # turn index where the current user block (owner of text_uncond) began

    @property
    def view(self) -> SessionContexts:
        full = self.full
        return SessionContexts(full=full, text_uncond=self.text_uncond or full, image_uncond=self.image_uncond or full)

    def start_user_block(self, turn_index: int) -> None:
        """A user turn after an assistant turn (or the first turn): both unconditional contexts restart (shared with
        ``full`` until the block drops something)."""
        self.text_uncond, self.image_uncond, self.block_start = None, None, turn_index

    def extend(self, chunk: EmbeddedChunk, keep_text: list[bool], keep_image: list[bool]) -> torch.Tensor:
        """Append ``chunk`` to every context by its keep rule; returns the full context's last output ``[D]``."""
        run = self.runner
        n = len(chunk)
        keeps = {"text_uncond": keep_text, "image_uncond": keep_image}
        fork_at = {
            name: keep.index(False) for name, keep in keeps.items() if getattr(self, name) is None and not all(keep)
        }
        last, prev = None, 0
        for cut in [*sorted(set(fork_at.values())), n]:
            if cut > prev:
                last = run.prefill(self.full, chunk, [True] * (cut - prev), start=prev)
            for name, at in fork_at.items():
                if at == cut:
                    setattr(self, name, self.full.fork())
            prev = cut
        for name, keep in keeps.items():
            ctx = getattr(self, name)
            if ctx is not None:
                start = fork_at.get(name, 0)
                run.prefill(ctx, chunk, keep[start:], start=start)
        if last is None:
            raise ValueError("GuidanceContexts.extend: empty chunk")
        return last

    def extend_unconditional(self, chunk: EmbeddedChunk) -> None:
        """Append assistant pieces that ``full`` already holds (decoded token by token) to the stored unconditional
        contexts; both keep everything an assistant adds, so a shared one stays shared."""
        for ctx in (self.text_uncond, self.image_uncond):
            if ctx is not None:
                self.runner.prefill(ctx, chunk, [True] * len(chunk))

    def fork_shared(self) -> None:
        """Store a copy of ``full`` for each unconditional context that shares it, before ``full`` gets what they must
        not hold (the think text of a reply, SPEC §4.1)."""
        if self.text_uncond is None:
            self.text_uncond = self.full.fork()
        if self.image_uncond is None:
            self.image_uncond = self.full.fork()

    def stored(self) -> tuple[CacheContext, CacheContext | None, CacheContext | None]:
        """``(full, text_uncond, image_uncond)`` with ``None`` for a context shared with ``full``."""
        return self.full, self.text_uncond, self.image_uncond

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> ContextMark:
        return ContextMark(
            full=_state(self.full),
            text_uncond=_state(self.text_uncond),
            image_uncond=_state(self.image_uncond),
            block_start=self.block_start,
        )

    def restore(
        self,
        mark: ContextMark,
        *,
        block_pending: bool,
        block_full: ContextMark,
        block_chunks: Callable[[], Iterable[tuple[EmbeddedChunk, list[bool], list[bool]]]],
    ) -> None:
        """Go back to ``mark`` (taken earlier on this same stream).

        Args:
            mark: the snapshot.
            block_pending: whether a user block is pending at ``mark`` (else both unconditional contexts are dropped:
                the next user block restarts them anyway).
            block_full: the snapshot taken when ``mark``'s user block began (its ``full`` state is where the block's
                unconditional contexts fork from when they must be rebuilt).
            block_chunks: the block's turns as ``(chunk, keep_text_uncond, keep_image_uncond)``, for that rebuild.
        """
        self.full.restore(*mark.full)
        rebuild = []
        for name in ("text_uncond", "image_uncond"):
            state, ctx = getattr(mark, name), getattr(self, name)
            if state is None or not block_pending:
                setattr(self, name, None)
            elif ctx is not None and self.block_start == mark.block_start:
                ctx.restore(*state)  # forked before the mark and never re-forked since (same block)
            else:  # a later user block replaced it: full before the block + the block's kept pieces (recomputed)
                rebuild.append(name)
        if rebuild:
            chunks = list(block_chunks())
            for name in rebuild:
                ctx = self.full.fork()
                ctx.restore(*block_full.full)
                for chunk, keep_text, keep_image in chunks:
                    self.runner.prefill(ctx, chunk, keep_text if name == "text_uncond" else keep_image)
                setattr(self, name, ctx)
        self.block_start = mark.block_start
