"""Run a mix of evaluation tasks against one or more models and write ``report.json``, PNG plots and ``report.html``.

:func:`run_suite` loads each model once, runs every task (:mod:`.tasks`) on it, and gathers a :class:`SuiteReport`.
Judged calls go through the :class:`~.judge.Judge` and its sqlite cache, so a killed run, run again, asks the judge
for no verdict it already gave (model replies are recomputed: they are deterministic per seed; answers the judge got
wrong — unparseable — are asked again). Pictures (inputs and
model outputs) are written once each, by content digest, under ``<output_dir>/images/``; ``report.json`` refers to
them, and ``report.html`` embeds them as ``data:`` URLs so the page stands alone (:mod:`.html_report`).

``report.json``::

    {"version": 1, "settings": {...}, "judge": {...} | null, "models": {name: source},
     "tasks": {task: {"kind": ..., "results": {model: {"metrics": {...}, "categories": {...}, "extra": {...},
                                                        "turns": [turn record, ...], "free_runs": [...]}}}}}

A turn record: ``dialogue_id``, ``index``, ``category``, ``user`` / ``reference`` / ``reply`` (lists of
``{"text": ...}`` or ``{"image": "images/<digest>.png"}``) and ``score`` (:meth:`~.metrics.TurnScore.to_dict`, with
the verdict and the judge's reason when judged).

Example:
    >>> report = run_suite(models={"tiny": "runs/tiny/last.ckpt"}, tasks={"mme": MME(path="MME.tsv")},
    ...                    output_dir="runs/eval_local")                                  # doctest: +SKIP
    >>> report.tasks["mme"]["results"]["tiny"]["metrics"]["perception"]                 # doctest: +SKIP
    812.5
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from chatumm_kit.data.shapes import WorldConfig
from chatumm_kit.eval.benchmark import DEFAULT_BATCH_SIZE, ModelLike, ScoredTurn, _as_responder
from chatumm_kit.eval.judge import Judge
from chatumm_kit.eval.responders import ReplySettings
from chatumm_kit.eval.tasks import MAIN_METRICS, EvalTask, RunContext, TaskResult
from chatumm_kit.eval.turns import Part
from chatumm_kit.synth.records import encode_png

__all__ = ["SuiteSettings", "SuiteReport", "ImageStore", "run_suite", "MAIN_METRICS"]


@dataclass(frozen=True, kw_only=True)
class SuiteSettings:
    """Settings of a suite run.

    Attributes:
        seed: seeds every reply (per item and exchange).
        batch_size: dialogues run in lockstep per model (speed only).
        reply: how models reply (token caps, decoding, image sampler).
        image_side: side of generated pictures and cap on input pictures' sides (the model's training size).
        html_max_items: dialogues / items per task shown turn by turn in ``report.html`` (all are in the JSON).
    """

    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    reply: ReplySettings = field(default_factory=ReplySettings)
    image_side: int = 512
    html_max_items: int = 20

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "reply": self.reply.to_dict(), "image_side": self.image_side,
                "html_max_items": self.html_max_items}  # fmt: skip


class ImageStore:
    """Pictures written once each as ``<root>/images/<digest>.png``; :meth:`put` returns the relative path."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self._known: dict[str, str] = {}

    def put(self, image: torch.Tensor) -> str:
        data = encode_png(image.contiguous())
        digest = hashlib.sha256(data).hexdigest()[:20]
        if digest not in self._known:
            rel = f"images/{digest}.png"
            path = self.root / rel
            if not path.exists():
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
            self._known[digest] = rel
        return self._known[digest]

    def parts(self, parts: list[Part] | tuple[Part, ...]) -> list[dict[str, str]]:
        return [{"image": self.put(p)} if isinstance(p, torch.Tensor) else {"text": p} for p in parts]


def _record(turn: ScoredTurn, store: ImageStore) -> dict[str, Any]:
    e = turn.request.expected
    return {
        "dialogue_id": e.dialogue_id,
        "index": e.index,
        "category": e.category,
        "user": store.parts(e.user),
        "reference": store.parts(e.reply),
        "reply": store.parts(turn.request.reply.parts),
        "score": turn.score.to_dict(),
    }


def _jsonable(value: Any) -> Any:
    """NaN and infinities become None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def result_dict(result: TaskResult, store: ImageStore) -> dict[str, Any]:
    """A :class:`~.tasks.TaskResult` as the report holds it (pictures written to ``store``)."""
    return _jsonable({
        "metrics": result.metrics,
        "categories": result.categories,
        "extra": result.extra,
        "turns": [_record(t, store) for t in result.turns],
        "free_runs": [{"dialogue_id": run.dialogue_id, "num_turns": run.num_turns, "first_failure": run.first_failure,
                       "turns": [_record(t, store) for t in scored]} for run, scored in result.free_runs],
    })  # fmt: skip


@dataclass
class SuiteReport:
    """The whole run (layout in the module docstring)."""

    settings: dict[str, Any]
    judge: dict[str, Any] | None
    models: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "settings": self.settings, "judge": self.judge, "models": self.models,
                "tasks": self.tasks}  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> SuiteReport:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(settings=d["settings"], judge=d["judge"], models=d["models"], tasks=d["tasks"],
                   version=int(d.get("version", 1)))  # fmt: skip

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """``report.json`` (atomically), ``plots/<task>.png`` and ``report.html`` in ``out_dir``."""
        from chatumm_kit.eval.html_report import render_html

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js = out / "report.json"
        tmp = js.with_name(js.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(js)
        written = {"json": js}
        (out / "plots").mkdir(exist_ok=True)
        for name, task in self.tasks.items():
            written[f"plot:{name}"] = self.plot(name, task, out / "plots" / f"{name}.png")
        html = out / "report.html"
        html.write_text(render_html(self.to_dict(), out), encoding="utf-8")
        written["html"] = html
        return written

    @staticmethod
    def plot(name: str, task: Mapping[str, Any], path: Path) -> Path:
        """Main metrics per model (bars) and, for multi-turn tasks, reply quality (or success) by turn index and by
        history distance (teacher-forced) and SR@k (free-running), one line per model."""
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        results = task["results"]
        metrics = [m for m in MAIN_METRICS.get(task["kind"], ()) if any(
            isinstance(r["metrics"].get(m), int | float) for r in results.values())]  # fmt: skip
        multi = any(r["extra"].get("free_running") for r in results.values())
        fig = Figure(figsize=(18 if multi else 6, 4), dpi=80)
        axes = fig.subplots(1, 4 if multi else 1, squeeze=False).ravel()
        ax = axes[0]
        width = 0.8 / max(1, len(results))
        for i, (model, r) in enumerate(results.items()):
            ys = [r["metrics"].get(m) for m in metrics]
            ax.bar([j + i * width for j in range(len(metrics))], [0.0 if y is None else y for y in ys], width,
                   label=model)  # fmt: skip
        ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(metrics))])
        ax.set_xticklabels(metrics, rotation=20, fontsize=8)
        ax.set_title(f"{name} ({task['kind']})", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        if multi:
            for ax, (key, label) in zip(axes[1:3], (("by_turn", "turn index"), ("by_distance", "history distance"))):
                for model, r in results.items():
                    buckets = r["extra"]["teacher_forced"][key]
                    metric = "reply_quality" if any("reply_quality" in b for b in buckets.values()) else "success"
                    keys = list(buckets)
                    ax.plot(range(len(keys)), [buckets[k].get(metric, {}).get("mean") for k in keys], marker="o",
                            label=f"{model} {metric}")  # fmt: skip
                    ax.set_xticks(range(len(keys)))
                    ax.set_xticklabels(keys)
                ax.set_ylim(-0.05, 1.05)
                ax.set_xlabel(label)
                ax.set_title(f"teacher-forced, by {label}", fontsize=9)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            ax = axes[3]
            for model, r in results.items():
                sr = {int(k): v for k, v in r["extra"]["free_running"]["sr_at_k"].items()}
                ks = sorted(sr)
                ax.plot(ks, [sr[k] for k in ks], marker="o", label=model)
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel("k (turns)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title("SR@k (free-running, stop at first failure)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(str(path))
        return path

    def summary_table(self) -> str:
        """One line per task and model with its main metrics."""
        lines = []
        for name, task in self.tasks.items():
            for model, r in task["results"].items():
                shown = [f"{m}={_fmt(r['metrics'].get(m))}" for m in MAIN_METRICS.get(task["kind"], ())
                         if m in r["metrics"]]  # fmt: skip
                lines.append(f"{name:<16} {model:<16} " + "  ".join(shown))
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def run_suite(
    *,
    models: Mapping[str, ModelLike],
    tasks: Mapping[str, EvalTask],
    judge: Judge | None = None,
    settings: SuiteSettings | None = None,
    output_dir: str | Path,
    progress: bool = False,
) -> SuiteReport:
    """Run every task against every model (module docstring) and write the report into ``output_dir``.

    Raises:
        ValueError: no models or tasks, or a judged task without a judge.
    """
    settings = settings or SuiteSettings()
    if not models or not tasks:
        raise ValueError("run_suite: needs at least one model and one task")
    judged = [n for n, t in tasks.items() if t.needs_judge]
    if judged and judge is None:
        raise ValueError(f"run_suite: tasks {judged} are judged; give a judge")
    store = ImageStore(output_dir)
    world = WorldConfig(image_size=settings.image_side)  # responders use SessionConfig.for_model at this size
    context = RunContext(seed=settings.seed, batch_size=settings.batch_size, judge=judge, progress=progress)
    out_tasks: dict[str, dict[str, Any]] = {n: {"kind": t.kind, "results": {}} for n, t in tasks.items()}
    sources: dict[str, Any] = {}
    for model_name, value in models.items():
        responder, source = _as_responder(model_name, value, world, settings.reply)
        sources[model_name] = source
        for task_name, task in tasks.items():
            result = task.run(responder, context=context)
            out_tasks[task_name]["results"][model_name] = result_dict(result, store)
    report = SuiteReport(
        settings={**settings.to_dict(), "tasks": {n: {"kind": t.kind, **_task_args(t)} for n, t in tasks.items()}},
        judge=None if judge is None else judge.describe(),
        models=sources,
        tasks=out_tasks,
    )
    report.write(output_dir)
    return report


def _task_args(task: Any) -> dict[str, Any]:
    """The task's plain settings (its constructor arguments kept as attributes), for the report."""
    return _jsonable({k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in vars(task).items()
                      if not k.startswith("_") and isinstance(v, str | int | float | bool | list | type(None))})  # fmt: skip
