"""``chatumm train``: turn a validated recipe into a Lightning run.

A training recipe has these top-level keys:

* ``seed`` — the run's seed (default 0): global generators, and the ``seed`` of ``system`` and ``data`` when they
  take one and do not set it (:func:`run_seed`);
* ``output_dir`` — where logs and checkpoints go (default ``runs/train``);
* ``vars`` — free values other nodes interpolate (``${vars.data_dir}``);
* ``prepare`` — a list of ``_component_`` steps run before training (make data if missing, fit a VAE, ...);
  each is a callable that does its work when built;
* ``system`` — the ``LightningModule``;
* ``data`` — the ``LightningDataModule`` (optional when the system brings its own loaders);
* ``trainer`` — keyword arguments of ``lightning.Trainer`` (a ``_component_`` node of its own is allowed too);
* ``resume_from`` — ``null``, ``last`` (the newest readable checkpoint; an error when there is none),
  ``last_or_fresh`` (the same, or a fresh run when there is none), a checkpoint path, or a folder of checkpoints
  (:func:`chatumm_kit.training.resume.resolve_resume`);
* ``report`` — steps built after training with the final ``checkpoint=`` path (e.g. the benchmark summary,
  :func:`chatumm_kit.eval.cli.summarise`).

Example:
    >>> run_training(load_recipe("shapes/chat_tiny"))  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from chatumm_kit.config import RecipeError, instantiate, to_yaml, validate_recipe
from chatumm_kit.config.imports import resolve_callable
from chatumm_kit.config.instantiate import COMPONENT_KEY
from chatumm_kit.training.resume import resolve_resume

__all__ = ["TRAIN_KEYS", "TrainingResult", "resolve_resume", "run_seed", "run_training"]

TRAIN_KEYS = frozenset({"seed", "output_dir", "vars", "prepare", "system", "data", "trainer", "resume_from", "report"})


@dataclass
class TrainingResult:
    output_dir: Path
    last_checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


def check_train_recipe(cfg: DictConfig) -> None:
    """Everything ``chatumm validate`` can know about a training recipe before any ``prepare`` step runs.

    Unknown top-level keys and a missing ``system``/``trainer`` are errors; then every node is checked against the
    allow-list and its callable's signature (:func:`~chatumm_kit.config.validate_recipe`, nested recipes of
    ``prepare`` and ``report`` steps included), and the nodes against each other
    (:func:`~chatumm_kit.training.recipe_checks.train_recipe_problems`: schedule vs ``max_steps``, the model's own
    rules, the data stream vs the model).
    """
    problems = [
        f"{k}: unknown top-level key (expected one of {', '.join(sorted(TRAIN_KEYS))})"
        for k in cfg.keys()
        if k not in TRAIN_KEYS
    ]
    problems += [f"{k}: missing (a training recipe needs it)" for k in ("system", "trainer") if k not in cfg]
    if problems:
        raise RecipeError(problems)
    plain = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(plain.get("trainer"), dict) and "_component_" not in plain["trainer"]:
        plain["trainer"] = {"_component_": "lightning.Trainer", **plain["trainer"]}  # bound like _build_trainer builds
    validate_recipe(plain)
    from chatumm_kit.training.recipe_checks import train_recipe_problems

    problems = train_recipe_problems(plain)
    if problems:
        raise RecipeError(problems)


def _build_trainer(node: Any, output_dir: Path):
    import lightning as L

    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if "_component_" not in plain:
        plain = {"_component_": "lightning.Trainer", **plain}
    plain.setdefault("default_root_dir", str(output_dir))
    trainer = instantiate(plain, path="trainer")
    if not isinstance(trainer, L.Trainer):
        raise RecipeError(f"trainer: built {type(trainer).__name__}, expected a lightning.Trainer")
    return trainer


def run_seed(node: Any, seed: int) -> dict[str, int]:
    """``{"seed": seed}`` when ``node``'s callable takes a ``seed`` and the node does not set one, else ``{}``.

    The recipe's top-level ``seed`` is the run's one source of randomness: it seeds the global generators and, passed
    here at the call site, the system's (flow noise) and the data module's (shard order, shuffle, CFG dropout)
    own draws, so a recipe says it once. A node may still set its own ``seed`` (e.g. to vary the data alone).
    """
    if not isinstance(node, Mapping | DictConfig) or COMPONENT_KEY not in node or "seed" in node:
        return {}
    target = resolve_callable(str(node[COMPONENT_KEY]))
    try:
        takes_seed = "seed" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    return {"seed": seed} if takes_seed else {}


def run_training(cfg: DictConfig) -> TrainingResult:
    """Check the whole recipe, run the ``prepare`` steps, then fit ``system`` on ``data`` with ``trainer``; print
    where things went. Only allow-listed callables are built (:func:`~chatumm_kit.config.current_allow_list`)."""
    import lightning as L

    check_train_recipe(cfg)
    L.seed_everything(int(cfg.get("seed", 0)), workers=True)
    output_dir = Path(str(cfg.get("output_dir") or "runs/train"))
    output_dir.mkdir(parents=True, exist_ok=True)

    # The trainer (callbacks included) and the checkpoint to resume from come first: a resume that cannot work is
    # one line now, not after minutes of prepare.
    trainer = _build_trainer(cfg.trainer, output_dir)
    ckpt_dir = (
        Path(trainer.checkpoint_callback.dirpath)
        if trainer.checkpoint_callback and trainer.checkpoint_callback.dirpath
        else output_dir / "checkpoints"
    )
    ckpt = resolve_resume(cfg.get("resume_from"), ckpt_dir)

    for i, step in enumerate(cfg.get("prepare") or []):
        instantiate(step, path=f"prepare[{i}]")

    seed = int(cfg.get("seed", 0))
    system = instantiate(cfg.system, path="system", **run_seed(cfg.system, seed))
    if not isinstance(system, L.LightningModule):
        raise RecipeError(f"system: built {type(system).__name__}, expected a lightning.LightningModule")
    data = None
    if cfg.get("data") is not None:
        data = instantiate(cfg.data, path="data", **run_seed(cfg.data, seed))
    from chatumm_kit.training.callbacks import FinalWeightsInLast, RecipeInCheckpoint
    from chatumm_kit.training.redaction import EnvironmentRedaction

    recipe_text = to_yaml(cfg)  # environment values stay ${oc.env:VAR}
    (output_dir / "recipe.yaml").write_text(recipe_text)  # how this run was made, next to its logs
    trainer.callbacks.extend([RecipeInCheckpoint(recipe=recipe_text), EnvironmentRedaction(), FinalWeightsInLast()])

    trainer.fit(system, datamodule=data, ckpt_path=ckpt)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    last = (
        trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
        if trainer.checkpoint_callback
        else ""
    )
    result = TrainingResult(output_dir=output_dir, last_checkpoint=Path(last) if last else None, metrics=metrics)
    print(f"logs and checkpoints: {output_dir}")
    if result.last_checkpoint:
        print(f"checkpoint: {result.last_checkpoint}")
    for k, v in sorted(metrics.items()):
        print(f"  {k}: {v:.4f}")
    if result.last_checkpoint is not None and trainer.is_global_zero:
        for i, step in enumerate(cfg.get("report") or []):
            instantiate(step, path=f"report[{i}]", checkpoint=str(result.last_checkpoint))
    return result
