"""The scaling curve of the headline cells (issue 18): accuracy at history distance >= 2 vs training compute, per size.

Reads runs of ``shapes/chat_tiny_long`` trained at several model sizes and step budgets (each in its own
``<root>/<run>/``, with the ``recipe.yaml`` the trainer writes and ``checkpoints/last.ckpt``), evaluates each one's
headline cells on the recomposed held-out slice when ``<run>/eval/eval_report.json`` is missing (``--evaluate``: the
cheap headline evaluation, ``chatumm eval shapes/eval 'benchmark.turns=${headline_turns}'``), and fits per model size

    logit(accuracy) = a + b · log10(C),     C = 6 · N · D training FLOPs

(N: the model's weights without the frozen autoencoder; D: steps × the recipe's token budget), weighted by each
point's bootstrap interval (delta method on the logit scale). Per size and for all points pooled it prints the fit, its
residuals, and the compute at which the trend reaches the targets (VQA >= 0.90, image attributes >= 0.80 at d >= 2),
with a 95 % range from refitting on accuracies redrawn within their intervals (a parametric bootstrap). Three points
per size make these extrapolations rough; the ranges say how rough.

    python benchmarks/scaling_curve.py --root runs/scaling [--evaluate] [--plot runs/scaling/scaling.png] [--json]

``steps`` is the checkpoint's own step count, out of the run's ``schedule_steps`` (see :func:`trained_steps`).
Runs must have finished training (a run still going shows its latest checkpoint).

Example:
    >>> fit_logit_line([1.0, 2.0, 3.0], [0.2, 0.5, 0.8], [0.05, 0.05, 0.05]).slope > 0
    True
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TARGETS = {"vqa": 0.90, "attr": 0.80}
"""The issue's targets for the headline cells at d >= 2."""
CELLS = {"vqa": "history_vqa_acc_d2plus", "attr": "history_attr_acc_d2plus"}
EPS = 1e-3  # accuracies are clipped to [EPS, 1 - EPS] before the logit


@dataclass(frozen=True)
class RunPoint:
    """One trained model's headline cells."""

    run: str
    hidden: int
    layers: int
    steps: int
    schedule_steps: int
    params: int
    flops: float
    vqa: float | None
    vqa_ci95: list[float] | None
    vqa_n: int
    attr: float | None
    attr_ci95: list[float] | None
    attr_n: int

    @property
    def size(self) -> str:
        return f"h{self.hidden}_l{self.layers}"


@dataclass(frozen=True)
class LineFit:
    """``logit(acc) = intercept + slope · log10(C)``; ``rms_residual`` in logit units; ``target_log10_flops`` where
    the line reaches the target (None when the slope is not positive), with its bootstrap 95 % range."""

    intercept: float
    slope: float
    points: int
    rms_residual: float
    target_log10_flops: float | None = None
    target_range: list[float] | None = None


def logit(p: float) -> float:
    p = min(max(p, EPS), 1 - EPS)
    return math.log(p / (1 - p))


def fit_logit_line(x: list[float], acc: list[float], se: list[float]) -> LineFit:
    """Weighted least squares of ``logit(acc)`` on ``x``; ``se`` are the accuracies' standard errors."""
    y = np.array([logit(a) for a in acc])
    p = np.clip(np.array(acc), EPS, 1 - EPS)
    se_logit = np.maximum(np.array(se), 1e-3) / (p * (1 - p))
    w = 1.0 / se_logit**2
    X = np.stack([np.ones(len(x)), np.array(x, dtype=float)], 1)
    coef = np.linalg.lstsq(X * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)[0]
    resid = y - X @ coef
    return LineFit(intercept=float(coef[0]), slope=float(coef[1]), points=len(x),
                   rms_residual=float(np.sqrt(np.mean(resid**2))))  # fmt: skip


def target_crossing(fit: LineFit, target: float) -> float | None:
    """log10 C where the fitted line reaches ``target`` (None when it never rises)."""
    return None if fit.slope <= 0 else (logit(target) - fit.intercept) / fit.slope


def fit_with_target(x, acc, se, target: float, *, draws: int = 1000, seed: int = 0) -> LineFit:
    """:func:`fit_logit_line` plus the target crossing and its parametric-bootstrap 95 % range."""
    fit = fit_logit_line(x, acc, se)
    cross = target_crossing(fit, target)
    rng = np.random.default_rng(seed)
    crossings = []
    for _ in range(draws):
        redrawn = np.clip(np.array(acc) + rng.normal(0, 1, len(acc)) * np.array(se), EPS, 1 - EPS)
        c = target_crossing(fit_logit_line(x, list(redrawn), se), target)
        crossings.append(math.inf if c is None else c)
    lo = float(np.percentile(crossings, 2.5, method="lower"))  # no interpolation: "never" (inf) stays inf
    hi = float(np.percentile(crossings, 97.5, method="higher"))
    return LineFit(**{**asdict(fit), "target_log10_flops": cross, "target_range": [lo, hi]})


def _se(ci: list[float] | None, n: int, p: float) -> float:
    """Standard error from a 95 % interval (half-width / 1.96), or the binomial one."""
    if ci is not None:
        return max((ci[1] - ci[0]) / (2 * 1.96), 1e-3)
    return math.sqrt(max(p * (1 - p), 1e-4) / max(n, 1))


def read_point(run: Path) -> RunPoint | None:
    """A run's sizes (from its ``recipe.yaml``) and headline cells (from ``eval/eval_report.json``)."""
    import yaml

    report = run / "eval" / "eval_report.json"
    if not report.is_file():
        return None
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    model = recipe["system"]["model"]
    steps = trained_steps(run)  # the checkpoint's own step: see trained_steps
    tokens = steps * int(recipe["data"]["token_budget"])
    h = json.loads(report.read_text())["headline"]
    counted = run / "params.json"  # the count, kept so a second reading loads no model
    if not counted.is_file():
        counted.write_text(json.dumps({"params": _params(run / "checkpoints" / "last.ckpt")}))
    params = int(json.loads(counted.read_text())["params"])
    return RunPoint(
        run=run.name, hidden=int(model["hidden_size"]), layers=int(model["num_layers"]), steps=steps,
        schedule_steps=int(recipe["trainer"]["max_steps"]), params=params,
        flops=6.0 * params * tokens,
        vqa=h.get(CELLS["vqa"]), vqa_ci95=h.get(CELLS["vqa"] + "_ci95"), vqa_n=int(h.get(CELLS["vqa"] + "_n", 0)),
        attr=h.get(CELLS["attr"]), attr_ci95=h.get(CELLS["attr"] + "_ci95"),
        attr_n=int(h.get(CELLS["attr"] + "_n", 0)),
    )  # fmt: skip


def _params(checkpoint: Path) -> int:
    """Weights of the model without the frozen autoencoder (the part training updates)."""
    from chatumm_kit.training.loading import load_checkpoint

    model = load_checkpoint(str(checkpoint)).model
    return sum(p.numel() for n, p in model.named_parameters() if ".autoencoder." not in f".{n}")


def trained_steps(run: Path) -> int:
    """The optimizer steps behind the run's ``last.ckpt``. Not always ``trainer.max_steps``: ``ModelCheckpoint``
    (``every_n_train_steps=1000``, ``save_last``) writes ``last.ckpt`` only at multiples of 1 000 when the data never
    ends an epoch, so a 1 800-step run keeps its step-1 000 weights (trained on the first 1 000 steps of an 1 800-step
    cosine schedule, the learning rate not yet annealed)."""
    import torch

    ckpt = run / "checkpoints" / "last.ckpt"
    return int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def evaluate(run: Path, extra: list[str]) -> None:
    """The cheap headline evaluation of ``run``'s last checkpoint into ``run/eval`` (a ``chatumm eval`` process)."""
    cmd = ["chatumm", "eval", "shapes/eval", "benchmark.turns=${headline_turns}", "~heldout_unseen_vocab",
           "~models.single_turn", "~prepare", f"vars.multi_turn={run / 'checkpoints' / 'last.ckpt'}",
           f"output_dir={run / 'eval'}", *extra]  # fmt: skip
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def fits(points: list[RunPoint]) -> dict:
    """Per metric, per size (and ``all`` pooled): the :class:`LineFit` with its target crossing."""
    out: dict = {}
    for metric, target in TARGETS.items():
        groups: dict[str, list[RunPoint]] = {}
        for p in points:
            if getattr(p, metric) is not None:
                groups.setdefault(p.size, []).append(p)
        groups["all"] = [p for ps in list(groups.values()) for p in ps]
        out[metric] = {}
        for size, ps in groups.items():
            if len({p.steps for p in ps}) < 2 and size != "all":
                continue  # one budget: no trend
            x = [math.log10(p.flops) for p in ps]
            acc = [getattr(p, metric) for p in ps]
            se = [_se(getattr(p, f"{metric}_ci95"), getattr(p, f"{metric}_n"), a) for p, a in zip(ps, acc)]
            out[metric][size] = fit_with_target(x, acc, se, target)
    return out


def plot(points: list[RunPoint], fitted: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=80)
    for ax, (metric, target) in zip(fig.subplots(1, 2), TARGETS.items()):
        sizes = sorted({p.size for p in points}, key=lambda s: [int(t[1:]) for t in s.split("_")])
        for size in sizes:
            ps = sorted((p for p in points if p.size == size and getattr(p, metric) is not None), key=lambda p: p.flops)
            if not ps:
                continue
            ys = [getattr(p, metric) for p in ps]
            cis = [getattr(p, f"{metric}_ci95") or [y, y] for p, y in zip(ps, ys)]
            line = ax.errorbar([p.flops for p in ps], ys, yerr=[[y - c[0] for y, c in zip(ys, cis)],
                               [c[1] - y for y, c in zip(ys, cis)]], marker="o", capsize=3, ls="none",
                               label=f"{size} ({ps[0].params / 1e6:.2f} M)")  # fmt: skip
            f = fitted[metric].get(size)
            if f is not None:
                end = f.target_log10_flops if f.target_log10_flops is not None else math.log10(ps[-1].flops) + 1
                xs = np.linspace(math.log10(ps[0].flops), min(end, math.log10(ps[-1].flops) + 3), 50)
                ax.plot(10**xs, 1 / (1 + np.exp(-(f.intercept + f.slope * xs))), ls="--",
                        color=line.lines[0].get_color())  # fmt: skip
        ax.axhline(target, color="k", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("training compute, FLOPs (6·N·D)")
        ax.set_title(f"{'VQA' if metric == 'vqa' else 'image attributes'} at d ≥ 2 (target {target})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path))


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="runs/scaling", help="folder of runs, one subfolder each")
    ap.add_argument("--evaluate", action="store_true", help="run the headline evaluation of runs without a report")
    ap.add_argument("--eval-override", action="append", default=[], help="extra key=value for chatumm eval")
    ap.add_argument("--plot", default=None, help="write the curve as a PNG here")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    args = ap.parse_args(argv)
    root = Path(args.root)
    runs = sorted(
        p for p in root.iterdir() if (p / "checkpoints" / "last.ckpt").is_file() and (p / "recipe.yaml").is_file()
    )
    if args.evaluate:
        for run in runs:
            if not (run / "eval" / "eval_report.json").is_file():
                evaluate(run, args.eval_override)
    points = [p for p in (read_point(r) for r in runs) if p is not None]
    if not points:
        sys.exit(f"scaling_curve: no evaluated runs under {root}")
    points.sort(key=lambda p: (p.params, p.steps))
    fitted = fits(points)

    print(f"{'run':<22} {'params':>9} {'steps':>11} {'FLOPs':>9}  {'VQA d>=2':>8} {'ci95':>15} {'n':>4}  "
          f"{'attr d>=2':>9} {'ci95':>15} {'n':>4}")  # fmt: skip
    for p in points:
        ci = lambda c: "-" if c is None else f"[{c[0]:.3f}, {c[1]:.3f}]"  # noqa: E731
        print(f"{p.run:<22} {p.params:>9,} {f'{p.steps}/{p.schedule_steps}':>11} {p.flops:>9.2e}  {_fmt(p.vqa):>8} {ci(p.vqa_ci95):>15} "
              f"{p.vqa_n:>4}  {_fmt(p.attr):>9} {ci(p.attr_ci95):>15} {p.attr_n:>4}")  # fmt: skip
    print()
    print(f"{'metric':<6} {'size':<10} {'slope/decade':>12} {'rms resid':>9}  {'target':>6} {'reached at FLOPs':>16}  "
          f"{'95 % range (bootstrap)':>24}  {'= steps of this size':>20}")  # fmt: skip
    per_step = {p.size: p.flops / p.steps for p in points}  # FLOPs of one training step of each size
    for metric, by_size in fitted.items():
        for size, f in by_size.items():
            at = "never (slope <= 0)" if f.target_log10_flops is None else f"{10**f.target_log10_flops:.2e}"
            steps = "-"
            if f.target_log10_flops is not None and size in per_step:
                steps = f"{10**f.target_log10_flops / per_step[size]:,.0f}"
            lo, hi = f.target_range or [math.inf, math.inf]
            rng = "never" if lo == math.inf else f"[{10**lo:.1e}, {'never' if hi == math.inf else f'{10**hi:.1e}'}]"
            print(f"{metric:<6} {size:<10} {f.slope:>12.3f} {f.rms_residual:>9.3f}  {TARGETS[metric]:>6} {at:>16}  "
                  f"{rng:>24}  {steps:>20}")  # fmt: skip
    if args.plot:
        plot(points, fitted, Path(args.plot))
        print(f"plot: {args.plot}")
    result = {
        "points": [{**asdict(p), "size": p.size} for p in points],
        "fits": {m: {s: asdict(f) for s, f in by.items()} for m, by in fitted.items()},
        "targets": TARGETS,
    }
    result = json.loads(json.dumps(result, default=lambda v: None if v == math.inf else v).replace("Infinity", "null"))
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
