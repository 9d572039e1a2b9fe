"""`WordNoise`: corrupt the filler words of user turns so a small model learns to read the words that carry meaning.

A model trained from scratch on templated data (ShapesChat) learns each template's wording as a whole and is lost
on a sentence it never saw: the benchmark's held-out phrasings use verbs that no training sentence contains
("Delete the red circle.", "Reshape the square into a cross."). A model with a pretrained language model (BAGEL)
does not have this problem; a tiny one can be taught the next best thing — that the content words (colours, shapes,
sizes, positions, numbers, articles) decide the request and the rest is wording. During training, each *user* text
segment is, with probability ``turn_prob``, rewritten word by word: a word outside ``keep`` is replaced by a random
pseudo-word with probability ``replace``, or dropped with probability ``drop``. Words with a digit are always kept
(numbers are content). Assistant text is never touched: it is what the model learns to say.

This is the word-dropout / unknown-word substitution of text classifiers (e.g. Iyyer et al. 2015, "Deep Unordered
Composition Rivals Syntactic Methods"), applied on the fly, so every epoch sees new corruptions.

The draws come from the ``random.Random`` the caller passes; the data stream seeds one per sample from
``(seed, epoch, rank, worker, sample key)``, so a resumed run corrupts every sample exactly as the uninterrupted run
(see ``data/streaming.py``).

Example:
    >>> import random
    >>> noise = WordNoise(turn_prob=1.0, replace=1.0, drop=0.0, keep=("the", "red", "circle"))
    >>> out = noise.corrupt("Delete the red circle.", random.Random(0))
    >>> out.split()[1:]
    ['the', 'red', 'circle.']
    >>> out.split()[0] != "Delete"
    True
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass

from chatumm_kit.data.dialogue import DialogueSample, Role, TextSegment, Turn

__all__ = ["WordNoise"]

# A word: its leading punctuation, its core (letters, digits, apostrophes), its trailing punctuation.
_WORD = re.compile(r"^(\W*)([\w']+)(\W*)$")


@dataclass(frozen=True, kw_only=True)
class WordNoise:
    """Word-level corruption of user text (see the module docstring).

    Args:
        turn_prob: probability that a user text segment is corrupted at all (the rest stay as written).
        replace: per free word of a corrupted segment, probability of a random pseudo-word (2–8 letters).
        drop: per free word, probability of removing it (``replace + drop <= 1``).
        keep: words never touched, compared lowercase without punctuation (for ShapesChat:
            :func:`chatumm_kit.data.shapes.world_words`).

    Example (a recipe's ``data`` section):
        ``word_noise: {_component_: chatumm_kit.data.word_noise.WordNoise, turn_prob: 0.5, replace: 0.2, drop: 0.05,
        keep: {_component_: chatumm_kit.data.shapes.world_words}}``
    """

    turn_prob: float = 0.5
    replace: float = 0.2
    drop: float = 0.05
    keep: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("turn_prob", "replace", "drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"WordNoise.{name} must be in [0, 1], got {value}")
        if self.replace + self.drop > 1.0:
            raise ValueError(f"WordNoise: replace + drop must be <= 1, got {self.replace} + {self.drop}")
        keep: Iterable[str] = self.keep
        if isinstance(keep, str):
            raise ValueError("WordNoise.keep must be a collection of words, not one string")
        object.__setattr__(self, "keep", frozenset(str(w).lower() for w in keep))

    def _kept(self, core: str) -> bool:
        return core.lower() in self.keep or any(ch.isdigit() for ch in core)

    def corrupt(self, text: str, rng: random.Random) -> str:
        """One corruption of ``text`` (every free word drawn; ``turn_prob`` is not applied here).

        Whitespace is normalised to single spaces. If every word would be dropped, the first one stays, so a
        segment never becomes empty.
        """
        tokens = text.split()
        out: list[str] = []
        for token in tokens:
            m = _WORD.match(token)
            if m is None or self._kept(m.group(2)):
                out.append(token)
                continue
            u = rng.random()
            if u < self.drop:
                continue
            if u < self.drop + self.replace:
                lead, core, trail = m.groups()
                word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
                out.append(lead + (word.capitalize() if core[:1].isupper() else word) + trail)
            else:
                out.append(token)
        return " ".join(out or tokens[:1])

    def __call__(self, sample: DialogueSample, rng: random.Random) -> DialogueSample:
        """``sample`` with its user text segments corrupted (a new sample; images and meta shared, not copied)."""
        turns: list[Turn] = []
        for turn in sample.dialogue.turns:
            if turn.role != Role.USER:
                turns.append(turn)
                continue
            segments = [
                dataclasses.replace(seg, text=self.corrupt(seg.text, rng))
                if isinstance(seg, TextSegment) and rng.random() < self.turn_prob
                else seg
                for seg in turn.segments
            ]
            turns.append(dataclasses.replace(turn, segments=segments))
        return dataclasses.replace(sample, dialogue=dataclasses.replace(sample.dialogue, turns=turns))
