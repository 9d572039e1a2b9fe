"""The split table: the packed sequence as a list of attention segments (SPEC §3).

A packed sequence of ``L`` tokens is tiled, without gaps or overlaps, by *splits*. Each split has an
attention mode, a document id and a modality. Everything about Generalized Causal Attention follows from this
table, so it is the one input of the mask builder (``components/masks.py``).

Example:
    >>> table = SplitTable.from_rows([
    ...     (0, 5, AttnMode.CAUSAL, 0, Modality.TEXT),
    ...     (5, 6, AttnMode.NOISE, 0, Modality.VAE_NOISED),
    ...     (11, 6, AttnMode.FULL, 0, Modality.VAE_CLEAN),
    ... ])
    >>> table.seq_len, len(table)
    (17, 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

__all__ = ["AttnMode", "Modality", "SplitTable"]


class AttnMode(IntEnum):
    """How tokens of one split attend to each other (SPEC §3)."""

    CAUSAL = 0  # text: lower-triangular inside the split
    FULL = 1  # ViT image or clean VAE image: bidirectional inside the split
    NOISE = 2  # noised VAE image: bidirectional inside, invisible to every other split


class Modality(IntEnum):
    """What a split holds; decides the embedding path, the expert (SPEC §4) and the attention mode (SPEC §3).

    Example:
        >>> Modality.VAE_NOISED.attn_mode, Modality.VIT.attn_mode
        (<AttnMode.NOISE: 2>, <AttnMode.FULL: 1>)
    """

    TEXT = 0
    VIT = 1
    VAE_CLEAN = 2
    VAE_NOISED = 3
    PAD = 4

    @property
    def attn_mode(self) -> AttnMode:
        """The attention mode of a split of this modality (the one mode table; SPEC §3)."""
        return _ATTN_MODE[self]


_ATTN_MODE = {
    Modality.TEXT: AttnMode.CAUSAL,  # text: causal
    Modality.VIT: AttnMode.FULL,  # ViT view: bidirectional
    Modality.VAE_CLEAN: AttnMode.FULL,  # clean VAE view: bidirectional
    Modality.VAE_NOISED: AttnMode.NOISE,  # noised VAE view: bidirectional, invisible to every other split
    Modality.PAD: AttnMode.CAUSAL,  # padding: a document of its own, causal
}


@dataclass  # not frozen: Lightning's precision plugins rebuild dataclass batches field by field
class SplitTable:
    """Splits of one packed sequence, as parallel 1-D ``int64`` tensors of length ``S``.

    Attributes:
        starts: ``[S]`` first token of each split; ``starts[0] == 0`` and splits are contiguous.
        lengths: ``[S]`` number of tokens, all ``>= 1``.
        modes: ``[S]`` :class:`AttnMode` values.
        docs: ``[S]`` document (packed sample) id; tokens of different documents never attend to each other.
            Padding is a split with a document id of its own.
        modalities: ``[S]`` :class:`Modality` values.
    """

    starts: torch.Tensor
    lengths: torch.Tensor
    modes: torch.Tensor
    docs: torch.Tensor
    modalities: torch.Tensor

    def __post_init__(self) -> None:
        n = self.starts.numel()
        for name in ("lengths", "modes", "docs", "modalities"):
            if getattr(self, name).numel() != n:
                raise ValueError(f"SplitTable.{name} has {getattr(self, name).numel()} entries, starts has {n}")
        if n == 0:
            return
        if int(self.starts[0]) != 0:
            raise ValueError(f"SplitTable must start at token 0, starts[0]={int(self.starts[0])}")
        if bool((self.lengths < 1).any()):
            raise ValueError(f"SplitTable has an empty split at index {int((self.lengths < 1).nonzero()[0])}")
        ends = self.starts + self.lengths
        gaps = (self.starts[1:] != ends[:-1]).nonzero()
        if gaps.numel():
            i = int(gaps[0])
            raise ValueError(f"SplitTable split {i + 1} starts at {int(self.starts[i + 1])}, expected {int(ends[i])}")

    @classmethod
    def from_rows(cls, rows: list[tuple[int, int, int, int, int]]) -> SplitTable:
        """Build from ``(start, length, mode, doc, modality)`` tuples."""
        cols = list(zip(*rows)) if rows else [(), (), (), (), ()]
        as_long = [torch.tensor([int(v) for v in c], dtype=torch.long) for c in cols]
        return cls(starts=as_long[0], lengths=as_long[1], modes=as_long[2], docs=as_long[3], modalities=as_long[4])

    @property
    def seq_len(self) -> int:
        """Total number of tokens ``L`` covered by the table."""
        if self.starts.numel() == 0:
            return 0
        return int(self.starts[-1] + self.lengths[-1])

    def __len__(self) -> int:
        return self.starts.numel()

    def rows(self) -> list[tuple[int, int, AttnMode, int, Modality]]:
        """The table as Python tuples ``(start, length, mode, doc, modality)``."""
        return [
            (int(s), int(n), AttnMode(int(m)), int(d), Modality(int(x)))
            for s, n, m, d, x in zip(self.starts, self.lengths, self.modes, self.docs, self.modalities)
        ]

    def token_split_ids(self) -> torch.Tensor:
        """``[L]`` index of the split each token belongs to."""
        return torch.repeat_interleave(torch.arange(len(self)), self.lengths)

    def to(self, device: torch.device | str) -> SplitTable:
        return SplitTable(
            starts=self.starts.to(device),
            lengths=self.lengths.to(device),
            modes=self.modes.to(device),
            docs=self.docs.to(device),
            modalities=self.modalities.to(device),
        )
