"""The benchmark's report: per-model results, the dataset it ran on, JSON round trip, a PNG chart and a text table.

:class:`BenchmarkReport` holds a :class:`DatasetSummary` and one :class:`ModelReport` per compared model (e.g.
``multi_turn`` vs ``single_turn``). :meth:`BenchmarkReport.write` writes ``<stem>.json`` and ``<stem>.png``: accuracy
versus history-dependency distance for the main metrics (one line per model) and SR@k versus k.

Example:
    >>> report = BenchmarkReport.load("runs/shapes/eval/eval_report.json")   # doctest: +SKIP
    >>> report.models["multi_turn"].teacher_forced.by_distance["4"].mean("success")   # doctest: +SKIP
    0.62
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatumm_kit.eval.intervals import RESAMPLES, Interval, dialogue_bootstrap, paired_difference_bootstrap, wilson
from chatumm_kit.eval.metrics import Breakdown, FreeRun, SuccessRates, TurnAggregate, TurnScore, distance_order
from chatumm_kit.eval.turns import ExpectedTurn

__all__ = [
    "DatasetSummary",
    "FarHistory",
    "far_values",
    "HEADLINE_METRICS",
    "ModelReport",
    "BenchmarkReport",
    "PLOT_METRICS",
    "FAR_DISTANCE",
]

PLOT_METRICS: tuple[tuple[str, str], ...] = (
    ("success", "turn success (teacher-forced history)"),
    ("intent", "intent accuracy"),
    ("vqa", "VQA exact match"),
    ("image_attr", "generated-image attribute accuracy"),
    ("image_exact", "generated image: all attributes right"),
)
"""(metric, panel title) of the per-distance panels of :meth:`BenchmarkReport.plot`."""

FAR_DISTANCE = 2
"""The headline targets are stated for history-dependent turns at distance >= this many turns back."""


HEADLINE_METRICS: tuple[tuple[str, str], ...] = (("vqa", "vqa"), ("image_attr", "attr"), ("intent", "intent"))
"""(metric, key name) of the headline cells: ``history_<key>_acc_d2plus`` is the mean of ``metric`` at d >= 2."""


def far_values(turns: Sequence[TurnScore], metric: str) -> dict[str, list[float]]:
    """Dialogue id → the ``metric`` values of its turns at distance >= :data:`FAR_DISTANCE` (the headline cells'
    turns, grouped for :func:`~.intervals.dialogue_bootstrap`)."""
    out: dict[str, list[float]] = {}
    for t in turns:
        if t.distance is None or t.distance < FAR_DISTANCE:
            continue
        v = t.values().get(metric)
        if v is not None:
            out.setdefault(t.dialogue_id, []).append(v)
    return out


def _ci(interval: Interval | None) -> list[float] | None:
    return None if interval is None else interval.to_list()


def _interval_keys(
    turns: Sequence[TurnScore], prefix: str, *, seed: int, resamples: int
) -> dict[str, int | list[float] | None]:
    """Per headline cell: ``_n`` (turns), ``_wilson95`` (turns as independent) and ``_ci95`` (bootstrap over
    dialogues, the interval to quote: turns of one dialogue are correlated)."""
    d = f"d{FAR_DISTANCE}plus"
    out: dict[str, int | list[float] | None] = {}
    for metric, key in HEADLINE_METRICS:
        values = far_values(turns, metric)
        flat = [v for vs in values.values() for v in vs]
        name = f"{prefix}history_{key}_acc_{d}"
        out[f"{name}_n"] = len(flat)
        out[f"{name}_wilson95"] = _ci(wilson(sum(flat), len(flat))) if flat else None
        out[f"{name}_ci95"] = _ci(dialogue_bootstrap(values, seed=seed, resamples=resamples))
    return out


def _difference_keys(
    model: Sequence[TurnScore], baseline: Sequence[TurnScore], *, seed: int, resamples: int
) -> dict[str, float | list[float] | None]:
    """Per headline cell: ``_diff`` (model minus baseline over the dialogues both were scored on) and ``_diff_ci95``
    (paired bootstrap over those dialogues)."""
    d = f"d{FAR_DISTANCE}plus"
    out: dict[str, float | list[float] | None] = {}
    for metric, key in HEADLINE_METRICS:
        got = paired_difference_bootstrap(
            far_values(model, metric), far_values(baseline, metric), seed=seed, resamples=resamples
        )
        name = f"history_{key}_acc_{d}"
        out[f"{name}_diff"] = None if got is None else round(got[0], 6)
        out[f"{name}_diff_ci95"] = None if got is None else got[1].to_list()
    return out


def _t2i_keys(aggregate: TurnAggregate, prefix: str) -> dict[str, float | int | list[float] | None]:
    """Text-to-image (``generate`` turns): ``t2i_exact`` — the share of generated pictures with every attribute right
    — with ``_n`` and its Wilson 95 % interval ``_wilson95`` (issue 18: the main job's pictures a person recognises)."""
    b = aggregate.by_task.get("generate")
    stat = None if b is None else b.stats.get("image_exact")
    ci = None if stat is None else stat.interval
    return {
        f"{prefix}t2i_exact": None if stat is None else stat.mean,
        f"{prefix}t2i_exact_n": 0 if stat is None else stat.count,
        f"{prefix}t2i_exact_wilson95": _ci(ci),
    }


@dataclass(frozen=True)
class FarHistory:
    """Accuracy on history-dependent turns whose reference is at least :data:`FAR_DISTANCE` turns back.

    These are the headline figures of the benchmark (issue 8): VQA exact match and generated-image attribute accuracy
    where the answer depends on a picture or turn two or more exchanges back. Means are turn-weighted over the
    distance buckets 2, 4, 8 (None when no such turn was scored); the ``*_turns`` counts say how many turns each
    mean rests on.

    Example:
        >>> FarHistory.of(report.models["multi_turn"].teacher_forced).vqa   # doctest: +SKIP
        0.41
    """

    vqa: float | None
    image_attr: float | None
    intent: float | None
    vqa_turns: int
    image_turns: int
    turns: int

    @classmethod
    def of(cls, aggregate: TurnAggregate) -> FarHistory:
        far = Breakdown.merged(b for k, b in aggregate.by_distance.items() if k != "none" and int(k) >= FAR_DISTANCE)

        def count(metric: str) -> int:
            stat = far.stats.get(metric)
            return 0 if stat is None else stat.count

        return cls(
            vqa=far.mean("vqa"),
            image_attr=far.mean("image_attr"),
            intent=far.mean("intent"),
            vqa_turns=count("vqa"),
            image_turns=count("image_attr"),
            turns=count("intent"),
        )

    def keys(self, prefix: str = "") -> dict[str, float | int | None]:
        """The JSON keys of ``BenchmarkReport.headline`` (``history_vqa_acc_d2plus``, ...), with ``prefix``."""
        d = f"d{FAR_DISTANCE}plus"
        return {
            f"{prefix}history_vqa_acc_{d}": self.vqa,
            f"{prefix}history_attr_acc_{d}": self.image_attr,
            f"{prefix}history_intent_acc_{d}": self.intent,
            f"{prefix}history_vqa_turns_{d}": self.vqa_turns,
            f"{prefix}history_attr_turns_{d}": self.image_turns,
            f"{prefix}history_turns_{d}": self.turns,
        }


def _hist(keys: Sequence[str], order=None) -> dict[str, int]:
    c = Counter(keys)
    return {k: c[k] for k in sorted(c, key=order)}


@dataclass
class DatasetSummary:
    """What the benchmark ran on: dialogue and turn counts and the histograms of the tags it breaks down by."""

    num_dialogues: int = 0
    num_turns: int = 0
    max_turns: int = 0
    turns_per_dialogue: dict[str, int] = field(default_factory=dict)
    by_distance: dict[str, int] = field(default_factory=dict)
    by_task: dict[str, int] = field(default_factory=dict)
    by_output: dict[str, int] = field(default_factory=dict)
    dialogue_ids: list[str] = field(default_factory=list)

    @classmethod
    def from_turns(cls, dialogues: Sequence[Sequence[ExpectedTurn]], ids: Sequence[str]) -> DatasetSummary:
        flat = [t for d in dialogues for t in d]
        return cls(
            num_dialogues=len(dialogues),
            num_turns=len(flat),
            max_turns=max((len(d) for d in dialogues), default=0),
            turns_per_dialogue=_hist([str(len(d)) for d in dialogues], order=int),
            by_distance=_hist([t.distance_key for t in flat], order=distance_order),
            by_task=_hist([t.task for t in flat]),
            by_output=_hist([t.output for t in flat]),
            dialogue_ids=list(ids),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_dialogues": self.num_dialogues,
            "num_turns": self.num_turns,
            "max_turns": self.max_turns,
            "turns_per_dialogue": dict(self.turns_per_dialogue),
            "by_distance": dict(self.by_distance),
            "by_task": dict(self.by_task),
            "by_output": dict(self.by_output),
            "dialogue_ids": list(self.dialogue_ids),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetSummary:
        return cls(**{k: d[k] for k in cls().to_dict()})


@dataclass
class ModelReport:
    """Results of one model.

    Attributes:
        name: the model's name in the comparison.
        source: where it came from (checkpoint path, EMA or not, or the responder's type).
        teacher_forced: per-turn scores with the true history, aggregated (overall, by distance, turn, task).
        free_running: SR@k with the model's own replies in the history, stopping at the first failure.
        turns: every teacher-forced turn score.
        free_runs: every free-running dialogue.
    """

    name: str
    source: dict[str, Any]
    teacher_forced: TurnAggregate
    free_running: SuccessRates
    turns: list[TurnScore] = field(default_factory=list)
    free_runs: list[FreeRun] = field(default_factory=list)

    @classmethod
    def from_scores(
        cls, *, name: str, source: Mapping[str, Any], turns: Sequence[TurnScore], free_runs: Sequence[FreeRun]
    ) -> ModelReport:
        return cls(
            name=name,
            source=dict(source),
            teacher_forced=TurnAggregate.from_turns(turns),
            free_running=SuccessRates.from_runs(free_runs),
            turns=list(turns),
            free_runs=list(free_runs),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": dict(self.source),
            "teacher_forced": self.teacher_forced.to_dict(),
            "free_running": self.free_running.to_dict(),
            "turns": [t.to_dict() for t in self.turns],
            "free_runs": [r.to_dict() for r in self.free_runs],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelReport:
        return cls(
            name=str(d["name"]),
            source=dict(d["source"]),
            teacher_forced=TurnAggregate.from_dict(d["teacher_forced"]),
            free_running=SuccessRates.from_dict(d["free_running"]),
            turns=[TurnScore.from_dict(t) for t in d.get("turns", [])],
            free_runs=[FreeRun.from_dict(r) for r in d.get("free_runs", [])],
        )


@dataclass
class BenchmarkReport:
    """The whole comparison: settings, dataset summary, and one :class:`ModelReport` per model (insertion order)."""

    settings: dict[str, Any]
    data: DatasetSummary
    models: dict[str, ModelReport] = field(default_factory=dict)
    version: int = 1
    slice: str | None = None
    """Which held-out wording the dialogues use (``recomposed`` or ``unseen_vocab``, issue 18), when known."""

    def headline(self) -> dict[str, Any]:
        """The headline figures: :class:`FarHistory` keys of the first model (the one under test) and, when a
        second model was compared (the baseline, e.g. ``single_turn``), the same keys prefixed ``baseline_``.

        Every cell ``history_<x>_acc_d2plus`` comes with ``_n`` (the turns it rests on), ``_wilson95`` (Wilson 95 %
        interval, turns taken as independent) and ``_ci95`` (95 % percentile bootstrap resampling whole dialogues,
        :data:`~.intervals.RESAMPLES` draws seeded by ``settings["seed"]``: the interval to quote). With a baseline,
        ``_diff`` is model minus baseline and ``_diff_ci95`` its paired bootstrap interval over the same dialogues;
        ``slice`` names the held-out wording when the report knows it.

        Example:
            >>> report.headline()["history_vqa_acc_d2plus"]          # doctest: +SKIP
            0.41
        """
        names = list(self.models)
        if not names:
            return {}
        seed = int(self.settings.get("seed", 0) or 0)
        kw = {"seed": seed, "resamples": RESAMPLES}
        model = self.models[names[0]]
        out: dict[str, Any] = {"model": names[0]}
        if self.slice is not None:
            out["slice"] = self.slice
        out.update(FarHistory.of(model.teacher_forced).keys())
        out.update(_interval_keys(model.turns, "", **kw))
        out.update(_t2i_keys(model.teacher_forced, ""))
        if len(names) > 1:
            base = self.models[names[1]]
            out["baseline"] = names[1]
            out.update(FarHistory.of(base.teacher_forced).keys("baseline_"))
            out.update(_interval_keys(base.turns, "baseline_", **kw))
            out.update(_t2i_keys(base.teacher_forced, "baseline_"))
            out.update(_difference_keys(model.turns, base.turns, **kw))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            **({"slice": self.slice} if self.slice is not None else {}),
            "settings": self.settings,
            "data": self.data.to_dict(),
            "headline": self.headline(),  # derived from "models"; recomputed on load
            "models": {k: v.to_dict() for k, v in self.models.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchmarkReport:
        return cls(
            settings=dict(d["settings"]),
            data=DatasetSummary.from_dict(d["data"]),
            models={k: ModelReport.from_dict(v) for k, v in d["models"].items()},
            version=int(d.get("version", 1)),
            slice=d.get("slice"),
        )

    @classmethod
    def load(cls, path: str | Path) -> BenchmarkReport:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    # ------------------------------------------------------------------ output
    def write(self, out_dir: str | Path, *, stem: str = "eval_report", png: bool = True) -> tuple[Path, Path | None]:
        """Write ``<stem>.json`` (atomically) and, unless ``png=False``, ``<stem>.png`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js = out / f"{stem}.json"
        tmp = js.with_name(js.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(js)
        if not png:
            return js, None
        chart = out / f"{stem}.png"
        self.plot(chart)
        return js, chart

    def distance_keys(self) -> list[str]:
        """Distance buckets seen by any model, ``"none"`` first then ascending."""
        keys = {k for m in self.models.values() for k in m.teacher_forced.by_distance}
        return sorted(keys, key=distance_order)

    def plot(self, path: str | Path) -> None:
        """Accuracy vs dependency distance for :data:`PLOT_METRICS` (one line per model, error bars: the Wilson 95 %
        interval of each bucket) and SR@k vs k."""
        from matplotlib.figure import Figure  # no pyplot global state, no backend switch
        from matplotlib.ticker import MaxNLocator

        keys = self.distance_keys()
        fig = Figure(figsize=(14, 8), dpi=80)
        axes = fig.subplots(2, 3).ravel()
        for ax, (metric, title) in zip(axes, PLOT_METRICS):
            for i, (name, m) in enumerate(self.models.items()):
                ys = [_value(m.teacher_forced.by_distance.get(k), metric) for k in keys]
                lo, hi = _error_bars(m.teacher_forced, keys, metric, ys)
                xs = [x + 0.06 * (i - (len(self.models) - 1) / 2) for x in range(len(keys))]  # bars side by side
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels(keys)
            ax.set_xlabel("history-dependency distance (turns back)")
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
        ax = axes[-1]
        for i, (name, m) in enumerate(self.models.items()):
            sr = m.free_running
            ks = sorted(sr.sr_at_k)
            ys = [sr.sr_at_k[k] for k in ks]
            cis = [sr.interval(k) for k in ks]
            lo = [0.0 if ci is None else y - ci.low for y, ci in zip(ys, cis)]
            hi = [0.0 if ci is None else ci.high - y for y, ci in zip(ys, cis)]
            xs = [k + 0.06 * (i - (len(self.models) - 1) / 2) for k in ks]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
        ax.set_xlabel("k (turns)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("SR@k (free-running, stop at first failure; Wilson 95 % over dialogues)", fontsize=9)
        ax.grid(alpha=0.3)
        if self.models:
            axes[0].legend(fontsize=8)
        fig.suptitle(
            f"ShapesChat context tracking: {self.data.num_dialogues} held-out dialogues, {self.data.num_turns} turns",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(str(path))

    def interval_table(self) -> str:
        """A plain-text table of the headline cells: mean, turns, Wilson and dialogue-bootstrap 95 % intervals per
        model, and the model-minus-baseline difference with its paired bootstrap interval."""
        h = self.headline()
        d = f"d{FAR_DISTANCE}plus"
        prefixes = [("", h.get("model"))] + ([("baseline_", h["baseline"])] if "baseline" in h else [])
        rows = [["cell", "model", "mean", "n", "wilson95", "ci95 (dialogues)"]]
        for _, key in HEADLINE_METRICS:
            cell = f"history_{key}_acc_{d}"
            for prefix, name in prefixes:
                k = prefix + cell
                rows.append(
                    [cell, str(name), _fmt(h.get(k)), str(h.get(f"{k}_n", 0)), _fmt_ci(h.get(f"{k}_wilson95")),
                     _fmt_ci(h.get(f"{k}_ci95"))]
                )  # fmt: skip
            if "baseline" in h:
                rows.append(
                    [cell, "difference", _fmt(h.get(f"{cell}_diff")), "", "", _fmt_ci(h.get(f"{cell}_diff_ci95"))]
                )
        for prefix, name in prefixes:  # text-to-image, all attributes right (any distance)
            k = f"{prefix}t2i_exact"
            if h.get(f"{k}_n"):
                rows.append(["t2i_exact (all attributes)", str(name), _fmt(h.get(k)), str(h[f"{k}_n"]),
                             _fmt_ci(h.get(f"{k}_wilson95")), ""])  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        title = f"headline cells (slice: {self.slice})" if self.slice else "headline cells"
        return (
            title
            + "\n"
            + "\n".join(
                "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
            )
        )

    def success_rate_table(self, *, max_k: int = 5) -> str:
        """A plain-text table of SR@k for k = 1..``max_k``: per model the rate, successes / dialogues and the Wilson
        95 % interval (dialogues are the independent units, :class:`~.metrics.SuccessRates`)."""
        rows = [["SR@k", "model", "rate", "successes/n", "wilson95 (dialogues)"]]
        for k in range(1, max_k + 1):
            for name, m in self.models.items():
                sr = m.free_running
                if k not in sr.sr_at_k:
                    continue
                ci = sr.interval(k)
                rows.append(
                    [f"SR@{k}", name, _fmt(sr.sr_at_k[k]), f"{sr.successes_at_k.get(k, 0)}/{sr.dialogues_at_k[k]}",
                     _fmt_ci(None if ci is None else ci.to_list())]
                )  # fmt: skip
        if len(rows) == 1:
            return "free-running SR@k: not measured"
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "free-running SR@k (stop at first failure)\n" + "\n".join(
            "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
        )

    def summary_table(self, *, max_k: int = 5) -> str:
        """A plain-text table: overall metrics, success by distance and SR@k, one row per model."""
        keys = self.distance_keys()
        metrics = ["success", "intent", "vqa", "caption", "chat", "image_attr", "image_exact"]
        head = [
            "model",
            *metrics,
            *(f"{x}@d>={FAR_DISTANCE}" for x in ("intent", "vqa", "image_attr")),
            *(f"succ@d{k}" for k in keys),
            *(f"SR@{k}" for k in range(1, max_k + 1)),
        ]
        rows = [head]
        for name, m in self.models.items():
            tf = m.teacher_forced
            distant = FarHistory.of(tf)
            row = [name, *(_fmt(tf.overall.mean(x)) for x in metrics)]
            row += [_fmt(distant.intent), _fmt(distant.vqa), _fmt(distant.image_attr)]
            row += [_fmt(_value(tf.by_distance.get(k), "success")) for k in keys]
            row += [_fmt(m.free_running.sr_at_k.get(k)) for k in range(1, max_k + 1)]
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
        )


def _fmt_ci(ci: Sequence[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _error_bars(agg: TurnAggregate, keys: Sequence[str], metric: str, ys: Sequence[float]) -> tuple[list, list]:
    """Lower and upper error-bar lengths (Wilson 95 %) of ``metric`` per distance bucket (0 where no turn)."""
    lo, hi = [], []
    for k, y in zip(keys, ys):
        b = agg.by_distance.get(k)
        stat = None if b is None else b.stats.get(metric)
        ci = None if stat is None else stat.interval
        lo.append(0.0 if ci is None or math.isnan(y) else y - ci.low)
        hi.append(0.0 if ci is None or math.isnan(y) else ci.high - y)
    return lo, hi


def _value(breakdown, metric: str) -> float:
    v = None if breakdown is None else breakdown.mean(metric)
    return math.nan if v is None else v


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
