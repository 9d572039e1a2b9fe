"""``chatumm eval RECIPE [key=value ...]``: evaluate the recipe's models and write the report.

A recipe with a ``tasks`` mapping is a **suite** (``recipes/eval/local_benchmarks.yaml``): any mix of
:mod:`~chatumm_kit.eval.tasks` (MMBench, MME, POPE, generic JSONL, judged editing and text-to-image, judged
multi-turn dialogues, ShapesChat) against every model, written by :func:`~chatumm_kit.eval.suite.run_suite` as
``<output_dir>/report.json``, ``plots/*.png`` and ``report.html``. Its keys: ``models`` (as below), ``tasks`` (name →
task node), ``judge`` (a :class:`~chatumm_kit.eval.judge.Judge` node; needed by judged tasks), ``settings``
(optional :class:`~chatumm_kit.eval.suite.SuiteSettings`), ``prepare``, ``output_dir``. Run again after an
interruption: the judge's cache answers every verdict already given.

Otherwise it is the ShapesChat context-tracking benchmark: synthesise (or reuse) the held-out set, evaluate the
recipe's models, write ``<output_dir>/eval_report.json`` and ``eval_report.png`` and print a summary table.
Such a recipe (``recipes/shapes/eval.yaml``) has these top-level keys:

* ``heldout`` — a :class:`~chatumm_kit.synth.SynthPipeline` node (run, or resumed, or found finished: its
  ``output_dir/index.json`` is the held-out set), or a plain path to existing shards;
* ``heldout_unseen_vocab`` — optional second held-out set like ``heldout`` (issue 18: the unseen-vocabulary
  slice), evaluated the same way and written apart as ``eval_report_unseen_vocab.json`` / ``.png``; each report's
  ``slice`` is its pipeline's phrasing split (``recomposed``, ``unseen_vocab``);
* ``models`` — name → :class:`~chatumm_kit.eval.ModelSource` node (or a checkpoint path), compared in order;
* ``benchmark`` — optional :class:`~chatumm_kit.eval.BenchmarkSettings` node;
* ``world`` — optional :class:`~chatumm_kit.data.shapes.WorldConfig` node (the default world otherwise);
* ``prepare`` — optional steps built first (e.g. ``ensure_trained`` for a missing checkpoint);
* ``seed``, ``output_dir``, ``vars`` and any other key as a place for shared nodes (``phrasing``).

:func:`summarise` evaluates one checkpoint with an eval recipe's held-out set and settings; training recipes call
it as a ``report`` step, so the main job ends with the benchmark's summary.

Example:
    >>> run(argparse.Namespace(recipe="shapes/eval", overrides=["benchmark.max_dialogues=20"]))  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import DictConfig, open_dict

from chatumm_kit.config import RecipeError, instantiate, load_recipe, validate_recipe

__all__ = ["add_arguments", "check_eval_recipe", "run", "run_eval", "run_suite_recipe", "summarise", "REPORT_STEM"]

REPORT_STEM = "eval_report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="an eval recipe file, or a shipped recipe name such as shapes/eval")
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value (add) or ~key (delete)")


def run(args: argparse.Namespace) -> int:
    """Load the recipe and :func:`run_eval` it (which checks it first); returns the exit code."""
    run_eval(load_recipe(args.recipe, args.overrides))
    return 0


def check_eval_recipe(cfg: DictConfig) -> None:
    """Everything ``chatumm validate`` can know about an eval recipe (a suite with ``tasks``, or the ShapesChat
    benchmark): its required keys, and every node allowed and bound (:func:`~chatumm_kit.config.validate_recipe`)."""
    suite = "tasks" in cfg
    needed = ("models", "tasks") if suite else ("heldout", "models")
    missing = [f"{k}: missing (a{' suite' if suite else 'n eval'} recipe needs it)" for k in needed if k not in cfg]
    if missing:
        raise RecipeError(missing)
    if not isinstance(cfg.models, DictConfig) or not cfg.models:
        raise RecipeError("models: must be a non-empty mapping of name → ModelSource (or checkpoint path)")
    if suite and (not isinstance(cfg.tasks, DictConfig) or not cfg.tasks):
        raise RecipeError("tasks: must be a non-empty mapping of name → task node (chatumm_kit.eval.tasks)")
    validate_recipe(cfg)


def _models(cfg: DictConfig) -> dict:
    """The recipe's ``models``: name → :class:`~chatumm_kit.eval.ModelSource` (checked to exist)."""
    from chatumm_kit.eval.benchmark import ModelSource

    if not isinstance(cfg.models, DictConfig) or not cfg.models:
        raise RecipeError("models: must be a non-empty mapping of name → ModelSource (or checkpoint path)")
    models = {}
    for name in cfg.models:
        built = instantiate(cfg.models[name], path=f"models.{name}")
        source = ModelSource(checkpoint=str(built)) if isinstance(built, str) else built
        if not isinstance(source, ModelSource):
            raise RecipeError(f"models.{name}: built {type(source).__name__}, expected a ModelSource or a path")
        if not Path(source.checkpoint).exists():
            raise RecipeError(
                f"models.{name}.checkpoint: {source.checkpoint!r} does not exist; train it first or leave the model "
                f"out with '~models.{name}'"
            )
        models[str(name)] = source
    return models


def run_suite_recipe(cfg: DictConfig):
    """Run a suite recipe (``tasks`` mapping; keys in the module docstring); returns the
    :class:`~chatumm_kit.eval.suite.SuiteReport`."""
    from chatumm_kit.eval.judge import Judge
    from chatumm_kit.eval.suite import SuiteSettings, run_suite
    from chatumm_kit.eval.tasks import EvalTask, missing_inputs

    check_eval_recipe(cfg)
    output_dir = Path(str(cfg.get("output_dir") or "runs/eval"))
    for i, step in enumerate(cfg.get("prepare") or []):
        instantiate(step, path=f"prepare[{i}]")
    models = _models(cfg)
    tasks = {}
    for name in cfg.tasks:
        task = instantiate(cfg.tasks[name], path=f"tasks.{name}")
        if not isinstance(task, EvalTask):
            raise RecipeError(f"tasks.{name}: built {type(task).__name__}, expected a task of chatumm_kit.eval.tasks")
        tasks[str(name)] = task
    gone = [f"tasks.{n}.{field}: {p!r} does not exist" for n, t in tasks.items()
            for field, paths in missing_inputs(t).items() for p in paths]  # fmt: skip
    if gone:
        raise RecipeError(gone)
    judge = None
    if cfg.get("judge") is not None:
        judge = instantiate(cfg.judge, path="judge")
        if not isinstance(judge, Judge):
            raise RecipeError(f"judge: built {type(judge).__name__}, expected chatumm_kit.eval.Judge")
    needing = [f"tasks.{n}: a judged task ({t.kind}); the recipe needs a 'judge' node" for n, t in tasks.items()
               if t.needs_judge and judge is None]  # fmt: skip
    if needing:
        raise RecipeError(needing)
    settings = SuiteSettings()
    if cfg.get("settings") is not None:
        settings = instantiate(cfg.settings, path="settings")
        if not isinstance(settings, SuiteSettings):
            raise RecipeError(f"settings: built {type(settings).__name__}, expected chatumm_kit.eval.SuiteSettings")
    report = run_suite(models=models, tasks=tasks, judge=judge, settings=settings, output_dir=output_dir,
                       progress=True)  # fmt: skip
    print(report.summary_table())
    if judge is not None:
        st = judge.runner.stats
        print(f"judge: {st.calls} calls, {st.cache_hits} answered from the cache")
    print(f"eval: report: {output_dir / 'report.json'}; page: {output_dir / 'report.html'}")
    return report


def run_eval(cfg: DictConfig):
    """Run an eval recipe (keys in the module docstring); returns the :class:`~chatumm_kit.eval.BenchmarkReport`
    (or, for a suite recipe, the :class:`~chatumm_kit.eval.suite.SuiteReport`)."""
    from chatumm_kit.data.shapes import WorldConfig
    from chatumm_kit.eval.benchmark import BenchmarkSettings, run_benchmark

    if "tasks" in cfg:
        return run_suite_recipe(cfg)
    check_eval_recipe(cfg)
    output_dir = Path(str(cfg.get("output_dir") or "runs/eval"))

    for i, step in enumerate(cfg.get("prepare") or []):
        instantiate(step, path=f"prepare[{i}]")
    models = _models(cfg)

    world = instantiate(cfg.world, path="world") if cfg.get("world") is not None else None
    if world is not None and not isinstance(world, WorldConfig):
        raise RecipeError(f"world: built {type(world).__name__}, expected a chatumm_kit.data.shapes.WorldConfig")
    settings = BenchmarkSettings()
    if cfg.get("benchmark") is not None:
        settings = instantiate(cfg.benchmark, path="benchmark")
        if not isinstance(settings, BenchmarkSettings):
            raise RecipeError(
                f"benchmark: built {type(settings).__name__}, expected chatumm_kit.eval.BenchmarkSettings"
            )

    sets = {"heldout": REPORT_STEM}
    if cfg.get(UNSEEN_VOCAB_KEY) is not None:
        sets[UNSEEN_VOCAB_KEY] = f"{REPORT_STEM}_unseen_vocab"
    reports = []
    for key, stem in sets.items():
        shards, slice_name = _held_out_shards(cfg, key)
        report = run_benchmark(models=models, shards=shards, settings=settings, world=world, progress=True)
        report.slice = slice_name
        js, png = report.write(output_dir, stem=stem)
        print(report.summary_table())
        print(report.interval_table())
        print(report.success_rate_table())
        print(f"eval: {report.data.num_dialogues} dialogues, {report.data.num_turns} turns; report: {js}; chart: {png}")
        reports.append(report)
    return reports[0]


def _synthesise_only_what_is_read(cfg: DictConfig) -> None:
    """A summary reading ``benchmark.max_dialogues`` of a larger held-out set (``vars.num_dialogues``, 1 500 in
    ``shapes/eval``) synthesises only those, into their own ``vars.data_dir`` (``<data_dir>_first<n>``)."""
    n = cfg.get("benchmark", {}).get("max_dialogues")
    v = cfg.get("vars", {})
    if n and "num_dialogues" in v and "data_dir" in v and int(n) < int(v.num_dialogues):
        cfg.vars.data_dir = f"{v.data_dir}_first{int(n)}"
        cfg.vars.num_dialogues = int(n)


UNSEEN_VOCAB_KEY = "heldout_unseen_vocab"
"""Optional recipe key: a second held-out set (the unseen-vocabulary slice), reported apart in
``eval_report_unseen_vocab.json``."""


def _held_out_shards(cfg: DictConfig, key: str) -> tuple[str, str | None]:
    """Build (run or resume) the held-out set at ``cfg[key]``; its shard index and its phrasing split (the slice)."""
    from chatumm_kit.synth.pipeline import SynthPipeline

    heldout = instantiate(cfg[key], path=key)
    if isinstance(heldout, SynthPipeline):
        heldout.run()  # resumes an interrupted run; a finished one is left as it is
        phrasing = getattr(getattr(heldout, "pool", None), "phrasing", None)
        return str(heldout.output_dir / "index.json"), getattr(phrasing, "split", None)
    if isinstance(heldout, str):
        return heldout, None
    raise RecipeError(f"{key}: built {type(heldout).__name__}, expected a SynthPipeline or a shard path")


def summarise(
    *,
    checkpoint: str,
    recipe: str = "shapes/eval",
    name: str = "model",
    overrides: list[str] | None = None,
    baseline: str | None = None,
    baseline_name: str = "baseline",
    baseline_recipe: str | None = None,
    baseline_overrides: list[str] | None = None,
):
    """Evaluate one checkpoint with ``recipe``'s held-out set and settings (its ``models`` and ``prepare`` are
    replaced) and print the summary; a training recipe's ``report`` step (called with the final ``checkpoint``).

    With ``baseline`` (a checkpoint path) that model is evaluated second, on the same dialogues, so the report holds
    the ``baseline_*`` cells and the paired differences; with ``baseline_recipe`` it is first trained
    (``chatumm train baseline_recipe baseline_overrides``) unless ``baseline`` exists — the main job trains its
    single-turn baseline of the same budget this way (``shapes/chat_tiny``)."""
    if baseline_recipe is not None:
        if baseline is None:
            raise RecipeError("summarise: baseline_recipe needs baseline (the checkpoint it writes)")
        from chatumm_kit.training.prepare import ensure_trained

        ensure_trained(recipe=baseline_recipe, artifact=baseline, overrides=list(baseline_overrides or []))
    cfg = load_recipe(recipe, overrides or [])
    cfg.models = {name: checkpoint, **({baseline_name: baseline} if baseline is not None else {})}
    cfg.prepare = []
    with open_dict(cfg):
        cfg.pop(UNSEEN_VOCAB_KEY, None)  # the training run's summary: the headline slice only
        _synthesise_only_what_is_read(cfg)
    return run_eval(cfg)  # checks the recipe first


def _check_summarised(cfg: DictConfig) -> None:
    cfg.models = {"model": "checkpoint.ckpt"}  # as summarise sets them
    cfg.prepare = []
    check_eval_recipe(cfg)


def _summarise_check(kwargs):
    """``chatumm validate`` hook of a ``report`` step: the eval recipe it would run, checked like ``chatumm eval``."""
    from chatumm_kit.training.prepare import ensure_trained, nested_recipe_check

    eval_kwargs = {k: v for k, v in kwargs.items() if k in ("recipe", "overrides")}
    problems = nested_recipe_check(_check_summarised)({"recipe": "shapes/eval", **eval_kwargs})
    if kwargs.get("baseline_recipe") is not None:  # the baseline's training recipe, checked like chatumm train
        base = {"recipe": kwargs["baseline_recipe"], "overrides": kwargs.get("baseline_overrides") or []}
        problems += [f"baseline_{p}" for p in ensure_trained.check_recipe_arguments(base)]
    return problems


summarise.check_recipe_arguments = _summarise_check
