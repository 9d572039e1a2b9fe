"""Dialogue shards → fixed-length rows of text tokens, for training the MoT backbone alone as a text LM.

Each dialogue's text segments are serialised as in the unified stream (SPEC §2) without its images: ``im_s`` + the
segment's tokens (with the tokenizer's role prefix on a turn's first segment) + ``im_e``, and an ``<|end|>`` after
each assistant turn. All dialogues are laid end to end in shard order and cut into ``[seq_len]`` rows (the tail that
does not fill a row is dropped); each row is one causal document (:meth:`MoTBackbone.next_token_loss`).

Example:
    >>> dm = TextLMDataModule(train_shards="data/train/index.json", tokenizer="data/tokenizer",
    ...                       seq_len=128, batch_size=8)                                  # doctest: +SKIP
    >>> dm.setup("fit")                                                                   # doctest: +SKIP
    >>> next(iter(dm.train_dataloader())).shape                                           # doctest: +SKIP
    torch.Size([8, 128])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import DialogueSample, Role, TextSegment
from chatumm_kit.data.shards import read_samples

__all__ = ["TextLMDataModule", "dialogue_text_ids", "dialogue_texts", "text_rows"]


def dialogue_texts(samples: Iterable[DialogueSample]) -> Iterator[str]:
    """Every text segment of every dialogue, in order."""
    for sample in samples:
        for turn in sample.dialogue.turns:
            for seg in turn.segments:
                if isinstance(seg, TextSegment):
                    yield seg.text


def dialogue_text_ids(sample: DialogueSample, tokenizer: ChatTokenizer) -> list[int]:
    """The text-only stream of one dialogue (see the module docstring)."""
    ids: list[int] = []
    for turn in sample.dialogue.turns:
        first = True
        for seg in turn.segments:
            if isinstance(seg, TextSegment):
                body = tokenizer.encode_segment(seg.text, role=turn.role.value, first_in_turn=first)
                ids += [tokenizer.im_start_id, *body, tokenizer.im_end_id]
                first = False
        if turn.role is Role.ASSISTANT:
            ids.append(tokenizer.end_id)
    return ids


def text_rows(samples: Iterable[DialogueSample], tokenizer: ChatTokenizer, *, seq_len: int) -> torch.Tensor:
    """``[n_rows, seq_len]`` long: the dialogues' text streams end to end, cut into rows."""
    stream = [i for sample in samples for i in dialogue_text_ids(sample, tokenizer)]
    n_rows = len(stream) // seq_len
    if n_rows == 0:
        raise ValueError(f"text_rows: {len(stream)} tokens of text do not fill one row of seq_len={seq_len}")
    return torch.tensor(stream[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


class TextLMDataModule(L.LightningDataModule):
    """Batches ``[batch_size, seq_len]`` of dialogue text tokens (see the module docstring).

    Args:
        train_shards / val_shards: anything :func:`chatumm_kit.data.shards.resolve_shards` accepts (``val_shards``
            may be ``None``).
        tokenizer: a :class:`ChatTokenizer` or the path of a tokenizer folder / ``tokenizer.json``.
        seq_len: tokens per row.
        batch_size: rows per batch.
        seed: shuffle order of the training rows.
    """

    def __init__(
        self,
        *,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        tokenizer: ChatTokenizer | str | Path,
        seq_len: int = 128,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"TextLMDataModule(seq_len={seq_len}): need at least 2 tokens per row")
        self.tokenizer = tokenizer if isinstance(tokenizer, ChatTokenizer) else ChatTokenizer.from_file(tokenizer)
        self.train_shards, self.val_shards = train_shards, val_shards
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.train_rows: torch.Tensor | None = None
        self.val_rows: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is None:
            self.train_rows = text_rows(read_samples(self.train_shards), self.tokenizer, seq_len=self.seq_len)
            if self.val_shards is not None:
                self.val_rows = text_rows(read_samples(self.val_shards), self.tokenizer, seq_len=self.seq_len)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_rows, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=g)

    def val_dataloader(self) -> DataLoader | list:
        return DataLoader(self.val_rows, batch_size=self.batch_size) if self.val_rows is not None else []
