"""The four-dimensional taxonomy of synthesized turns, target mixes, steering, and the run report (SPEC §6).

Every exchange (a user turn and the assistant's reply) is tagged on four dimensions:

* **task** — ``generate`` / ``edit`` / ``understand`` / ``caption`` / ``chat``;
* **input** modality of the user turn — ``text`` (no image in the turn), ``text+image`` (one), ``multi-image`` (2+);
* **output** modality of the reply — ``text`` / ``image`` / ``interleaved`` (image and text);
* **dependency** on history — ``none``, ``previous`` (acts on the image of the turn just before) or ``distant``
  (behind ``distance`` ≥ 1 unrelated turns; the distance is kept as a fifth, numeric tag).

:class:`TaxonomyTargets` holds target marginals per dimension (set in the recipe). :class:`MixBalancer` counts what
the run has produced and turns the gap to the targets into sampling weights the stages use for their structural
choices (which task next, how many distractors, interleave or not): a dimension that lags gets more weight. Counts
are snapshotted once per shard, so results do not depend on thread timing.

Example:
    >>> t = TaxonomyTargets(task={"generate": 0.5, "edit": 0.5})
    >>> b = MixBalancer(targets=t)
    >>> b.add([TurnTags(task=Task.GENERATE, input=InputModality.TEXT, output=OutputModality.IMAGE)])
    >>> w = b.snapshot().weights("task", ["generate", "edit"])
    >>> w[1] > w[0]
    True
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = [
    "Task",
    "InputModality",
    "OutputModality",
    "Dependency",
    "TurnTags",
    "DIMENSIONS",
    "TaxonomyTargets",
    "MixBalancer",
    "Steering",
    "SynthReport",
]


class Task(str, Enum):
    GENERATE = "generate"
    EDIT = "edit"
    UNDERSTAND = "understand"
    CAPTION = "caption"
    CHAT = "chat"


class InputModality(str, Enum):
    TEXT = "text"
    TEXT_IMAGE = "text+image"
    MULTI_IMAGE = "multi-image"

    @classmethod
    def from_count(cls, n_images: int) -> InputModality:
        return cls.TEXT if n_images == 0 else cls.TEXT_IMAGE if n_images == 1 else cls.MULTI_IMAGE


class OutputModality(str, Enum):
    TEXT = "text"
    IMAGE = "image"
    INTERLEAVED = "interleaved"


class Dependency(str, Enum):
    NONE = "none"
    PREVIOUS = "previous"
    DISTANT = "distant"

    @classmethod
    def from_distance(cls, distance: int | None) -> Dependency:
        return cls.NONE if distance is None else cls.PREVIOUS if distance == 0 else cls.DISTANT


# Dimension name → the enum of its values ("distance" is numeric and handled separately).
DIMENSIONS: dict[str, type[Enum]] = {
    "task": Task,
    "input": InputModality,
    "output": OutputModality,
    "dependency": Dependency,
}


@dataclass(frozen=True)
class TurnTags:
    """Tags of one exchange. ``distance`` is the number of exchanges between this one and the last exchange that
    touched the image it depends on (None when it depends on nothing; 0 = the previous exchange)."""

    task: Task
    input: InputModality
    output: OutputModality
    distance: int | None = None

    @property
    def dependency(self) -> Dependency:
        return Dependency.from_distance(self.distance)

    def value(self, dim: str) -> str:
        """The tag of one dimension as a string (``"distance"`` gives ``"none"`` or the number)."""
        if dim == "distance":
            return "none" if self.distance is None else str(self.distance)
        return getattr(self, dim).value

    @property
    def cell(self) -> str:
        """The 4-D cell, e.g. ``"edit|text|image|distant"``."""
        return "|".join(self.value(d) for d in DIMENSIONS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task.value,
            "input": self.input.value,
            "output": self.output.value,
            "dependency": self.dependency.value,
            "distance": self.distance,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TurnTags:
        return cls(
            task=Task(d["task"]),
            input=InputModality(d["input"]),
            output=OutputModality(d["output"]),
            distance=d.get("distance"),
        )


def _normalise(name: str, mix: Mapping[Any, float] | None, allowed: Sequence[str] | None) -> dict[str, float]:
    if not mix:
        return {}
    out = {str(k): float(v) for k, v in mix.items()}
    if allowed is not None:
        bad = sorted(set(out) - set(allowed))
        if bad:
            raise ValueError(f"TaxonomyTargets.{name}: unknown values {bad}; allowed: {list(allowed)}")
    else:
        bad = [k for k in out if not k.isdigit()]
        if bad:
            raise ValueError(f"TaxonomyTargets.{name}: keys must be distances (0, 1, 2, ...), got {bad}")
    if any(v < 0 for v in out.values()) or sum(out.values()) <= 0:
        raise ValueError(f"TaxonomyTargets.{name}: weights must be >= 0 with a positive sum, got {dict(mix)}")
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


@dataclass(frozen=True)
class TaxonomyTargets:
    """Target marginal mixes per dimension over all synthesized exchanges (distractors included); weights are
    normalised. ``distance`` is the mix of distances over *dependent* exchanges (keys 0, 1, 2, ...). An empty
    mapping means "no target" for that dimension."""

    task: Mapping[str, float] = field(default_factory=dict)
    input: Mapping[str, float] = field(default_factory=dict)
    output: Mapping[str, float] = field(default_factory=dict)
    dependency: Mapping[str, float] = field(default_factory=dict)
    distance: Mapping[Any, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for dim, enum in DIMENSIONS.items():
            object.__setattr__(self, dim, _normalise(dim, getattr(self, dim), [e.value for e in enum]))
        object.__setattr__(self, "distance", _normalise("distance", self.distance, None))

    def get(self, dim: str) -> dict[str, float]:
        return dict(getattr(self, dim))

    def dims(self) -> list[str]:
        return [d for d in (*DIMENSIONS, "distance") if getattr(self, d)]

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {d: self.get(d) for d in self.dims()}


def _counts_of(tags: Iterable[TurnTags]) -> dict[str, Counter]:
    out: dict[str, Counter] = {d: Counter() for d in (*DIMENSIONS, "distance")}
    for t in tags:
        for d in DIMENSIONS:
            out[d][t.value(d)] += 1
        if t.distance is not None:
            out["distance"][str(t.distance)] += 1
    return out


@dataclass(frozen=True)
class Steering:
    """A frozen view of the balancer used by stages for one shard: deficit-weighted choices.

    ``weights(dim, options, prior)``: for each option, ``prior * (1 + gain * (target - share) / target)``, clipped
    at a small floor; options without a target keep their prior. With no targets the prior comes back unchanged.
    """

    targets: TaxonomyTargets
    shares: dict[str, dict[str, float]]
    gain: float = 4.0

    def weights(self, dim: str, options: Sequence[str], prior: Sequence[float] | None = None) -> list[float]:
        prior = list(prior) if prior is not None else [1.0] * len(options)
        target = self.targets.get(dim)
        if not target:
            return prior
        shares = self.shares.get(dim, {})
        out = []
        for opt, p in zip(options, prior):
            t = target.get(str(opt))
            if t is None:
                out.append(p)
            elif t == 0:
                out.append(0.0)
            else:
                s = shares.get(str(opt), 0.0)
                out.append(p * t * max(0.05, 1.0 + self.gain * (t - s) / t))
        return out if sum(out) > 0 else prior


class MixBalancer:
    """Counts tags of accepted dialogues and exposes :class:`Steering` toward :class:`TaxonomyTargets`."""

    def __init__(self, *, targets: TaxonomyTargets | None = None, gain: float = 4.0) -> None:
        self.targets = targets or TaxonomyTargets()
        self.gain = gain
        self.counts: dict[str, Counter] = _counts_of(())

    def add(self, tags: Iterable[TurnTags]) -> None:
        for d, c in _counts_of(tags).items():
            self.counts[d].update(c)

    def shares(self) -> dict[str, dict[str, float]]:
        out = {}
        for d, c in self.counts.items():
            n = sum(c.values())
            out[d] = {k: v / n for k, v in c.items()} if n else {}
        return out

    def snapshot(self) -> Steering:
        return Steering(targets=self.targets, shares=self.shares(), gain=self.gain)

    def gaps(self) -> dict[str, float]:
        """Total-variation distance between achieved and target mix, per targeted dimension."""
        shares = self.shares()
        out = {}
        for d in self.targets.dims():
            t = self.targets.get(d)
            keys = set(t) | set(shares.get(d, {}))
            out[d] = 0.5 * sum(abs(t.get(k, 0.0) - shares.get(d, {}).get(k, 0.0)) for k in keys)
        return out

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {d: dict(c) for d, c in self.counts.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, int]]) -> None:
        self.counts = _counts_of(())
        for d, c in state.items():
            self.counts.setdefault(d, Counter()).update({k: int(v) for k, v in c.items()})


@dataclass
class SynthReport:
    """What a run produced: per-cell counts, marginals, distances, turns per dialogue, failures.

    Also: ``source_skips`` (rows the dataset adapters skipped, by reason) with ``source_skip_examples``, and
    ``llm_answers`` — the backend answers this run used: ``{"asked": ..., "from_cache": ...}``.

    Serialises to JSON (:meth:`to_dict`, :meth:`write`) and draws a PNG with matplotlib's Agg backend.
    """

    targets: dict[str, dict[str, float]] = field(default_factory=dict)
    attempted: int = 0
    written: int = 0
    cells: Counter = field(default_factory=Counter)
    marginals: dict[str, Counter] = field(default_factory=lambda: _counts_of(()))
    distance_hist: Counter = field(default_factory=Counter)
    turns_per_dialogue: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    failure_examples: dict[str, str] = field(default_factory=dict)
    source_skips: dict[str, int] = field(default_factory=dict)
    source_skip_examples: list[str] = field(default_factory=list)
    llm_answers: dict[str, int] = field(default_factory=dict)

    def add_dialogue(self, tags: Sequence[TurnTags], n_turns: int) -> None:
        self.attempted += 1
        self.written += 1
        self.turns_per_dialogue[str(n_turns)] += 1
        for t in tags:
            self.cells[t.cell] += 1
            if t.distance is not None:
                self.distance_hist[str(t.distance)] += 1
        for d, c in _counts_of(tags).items():
            self.marginals[d].update(c)

    def add_failure(self, reason: str, example: str = "") -> None:
        self.attempted += 1
        self.failures[reason] += 1
        if example and reason not in self.failure_examples:
            self.failure_examples[reason] = example[:500]

    def shares(self, dim: str) -> dict[str, float]:
        c = self.marginals[dim]
        n = sum(c.values())
        return {k: v / n for k, v in sorted(c.items())} if n else {}

    def to_dict(self) -> dict[str, Any]:
        def srt(c: Mapping[str, int]) -> dict[str, int]:
            return dict(sorted(c.items(), key=lambda kv: (len(kv[0]), kv[0])))

        return {
            "attempted": self.attempted,
            "written": self.written,
            "dropped": self.attempted - self.written,
            "targets": self.targets,
            "cells": dict(sorted(self.cells.items())),
            "marginals": {d: srt(c) for d, c in self.marginals.items()},
            "shares": {d: self.shares(d) for d in self.marginals},
            "distance_hist": srt(self.distance_hist),
            "turns_per_dialogue": srt(self.turns_per_dialogue),
            "failures": dict(sorted(self.failures.items())),
            "failure_examples": dict(sorted(self.failure_examples.items())),
            "source_skips": dict(sorted(self.source_skips.items())),
            "source_skip_examples": list(self.source_skip_examples),
            "llm_answers": dict(self.llm_answers),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SynthReport:
        r = cls(targets=dict(d.get("targets", {})), attempted=int(d["attempted"]), written=int(d["written"]))
        r.cells = Counter(d.get("cells", {}))
        for dim, c in d.get("marginals", {}).items():
            r.marginals[dim] = Counter(c)
        r.distance_hist = Counter(d.get("distance_hist", {}))
        r.turns_per_dialogue = Counter(d.get("turns_per_dialogue", {}))
        r.failures = Counter(d.get("failures", {}))
        r.failure_examples = dict(d.get("failure_examples", {}))
        r.source_skips = {str(k): int(v) for k, v in d.get("source_skips", {}).items()}
        r.source_skip_examples = [str(x) for x in d.get("source_skip_examples", [])]
        r.llm_answers = {str(k): int(v) for k, v in d.get("llm_answers", {}).items()}
        return r

    def write(self, out_dir: str | Path, *, stem: str = "report", png: bool = True) -> tuple[Path, Path | None]:
        """Write ``<stem>.json`` (and ``<stem>.png`` unless ``png=False``) into ``out_dir``; returns the paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        js = out_dir / f"{stem}.json"
        tmp = js.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False))
        tmp.replace(js)
        if not png:
            return js, None
        chart = out_dir / f"{stem}.png"
        self.plot(chart)
        return js, chart

    def plot(self, path: str | Path) -> None:
        """A 2×3 panel chart: the four marginals (achieved vs target), distances, turns per dialogue."""
        from matplotlib.figure import Figure  # Figure directly: no pyplot, no backend switch, safe in threads

        fig = Figure(figsize=(13, 7), dpi=80)
        axes = fig.subplots(2, 3).ravel()
        panels = [
            *[(d, self.shares(d), self.targets.get(d, {})) for d in DIMENSIONS],
            ("distance (dependent turns)", _share(self.distance_hist), self.targets.get("distance", {})),
            ("turns per dialogue", _share(self.turns_per_dialogue), {}),
        ]
        for ax, (title, got, want) in zip(axes, panels):
            keys = sorted(set(got) | set(want), key=lambda k: (len(k), k))
            xs = range(len(keys))
            ax.bar([x - 0.2 for x in xs], [got.get(k, 0) for k in keys], width=0.4, label="achieved")
            if want:
                ax.bar([x + 0.2 for x in xs], [want.get(k, 0) for k in keys], width=0.4, label="target")
                ax.legend(fontsize=7)
            ax.set_xticks(list(xs))
            ax.set_xticklabels(keys, rotation=30, fontsize=7)
            ax.set_title(title, fontsize=9)
        fig.suptitle(
            f"synth report: {self.written} dialogues written, {self.attempted - self.written} dropped", fontsize=10
        )
        fig.tight_layout()
        fig.savefig(str(path))


def _share(c: Mapping[str, int]) -> dict[str, float]:
    n = sum(c.values())
    return {k: v / n for k, v in c.items()} if n else {}
