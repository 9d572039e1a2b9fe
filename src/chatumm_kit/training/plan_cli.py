"""``chatumm plan RECIPE [key=value ...]``: the memory plan of a training recipe, without allocating its model.

The recipe's system is built as it would be for training — model spec, freezing, ``master_dtype`` — but under
``torch.device("meta")``, so BAGEL-7B plans in seconds on a laptop. The run's layout comes from the recipe: the
strategy (``fsdp2`` / ``ddp``), ``trainer.devices × trainer.num_nodes``, the precision (FSDP2's
``mixed_precision`` or ``trainer.precision``), activation checkpointing (the strategy's or the model's
``gradient_checkpointing``) and ``data.token_budget`` tokens per step. See :mod:`chatumm_kit.training.plan` for
the arithmetic.

A ``kit_folder`` model is planned from its folder's ``model.json`` (no weights read). Before converting, plan a
preset instead: ``--preset chatumm_bagel_7b``.

Example:
    $ chatumm plan bagel_7b/sft_chat_fsdp --preset chatumm_bagel_7b trainer.devices=8
    $ chatumm plan bagel_7b/sft_chat_fsdp --preset chatumm_bagel_7b trainer.strategy.activation_checkpointing=false
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from chatumm_kit.config import RecipeError, instantiate, load_recipe, validate_recipe
from chatumm_kit.training.plan import MemoryPlan, RunShape, format_plan, plan_training

__all__ = ["add_arguments", "run", "plan_recipe", "run_shape_of"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a training recipe file, or a shipped recipe name such as bagel_7b/sft_chat_fsdp")
    p.add_argument("overrides", nargs="*", help="key=value, +key=value (add) or ~key (delete)")
    p.add_argument("--preset", help="plan this model preset (e.g. chatumm_bagel_7b) instead of the recipe's model")
    p.add_argument("--ce-fraction", type=float, default=0.25, help="share of tokens that are CE positions")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _model_spec(spec: dict[str, Any], preset: str | None) -> dict[str, Any]:
    """The spec to build on the meta device: ``--preset``, a kit folder's ``model.json``, or the recipe's own."""
    if preset:
        return {"_component_": f"chatumm_kit.presets.{preset}"}
    if str(spec.get("_component_", "")).endswith(".kit_folder"):
        from chatumm_kit.convert.bagel import SPEC_FILE

        path = Path(str(spec["path"])) / SPEC_FILE
        if not path.is_file():
            raise RecipeError(
                f"system.model.path: {path} does not exist (convert the release first, or plan a preset: "
                "--preset chatumm_bagel_7b)"
            )
        from chatumm_kit.presets import model_spec

        folder_spec = model_spec(json.loads(path.read_text()))  # an old {preset: ...} kit folder too
        for key in ("attn_backend", "gradient_checkpointing"):  # kit_folder's overrides of the saved settings
            if spec.get(key) is not None and "backbone" in folder_spec:
                folder_spec["backbone"][key] = spec[key]
        return folder_spec
    return spec


def run_shape_of(cfg: Any, *, ce_fraction: float = 0.25) -> RunShape:
    """The :class:`RunShape` a training recipe describes (strategy, devices, precision, checkpointing, tokens)."""
    trainer = _plain(cfg.trainer) or {}
    strategy = trainer.get("strategy") or {}
    target = str(strategy.get("_component_", strategy) if isinstance(strategy, dict) else strategy)
    devices = trainer.get("devices", 1)
    devices = int(devices) if str(devices).isdigit() else 1
    devices *= int(trainer.get("num_nodes", 1) or 1)
    kind = "fsdp2" if target.endswith("fsdp2") else "ddp" if (target.endswith("ddp") or devices > 1) else "single"
    precision = str(trainer.get("precision", "32-true"))
    # fsdp2()'s defaults: bf16 mixed precision and activation checkpointing (training.strategies.fsdp2)
    mixed = kind == "fsdp2" and isinstance(strategy, dict) and strategy.get("mixed_precision", "bf16") == "bf16"
    compute = "bfloat16" if mixed or "bf16" in precision else "float16" if precision.startswith("16") else "float32"
    model = _plain(cfg.system.get("model")) or {}
    checkpointing = bool(model.get("gradient_checkpointing")) or (
        kind == "fsdp2" and isinstance(strategy, dict) and bool(strategy.get("activation_checkpointing", True))
    )
    data = _plain(cfg.get("data")) or {}
    return RunShape(
        strategy=kind,
        devices=devices,
        tokens=int(data.get("token_budget", 4096)),
        compute_dtype=compute,
        activation_checkpointing=checkpointing,
        ce_fraction=ce_fraction,
    )


def plan_recipe(cfg: Any, *, preset: str | None = None, ce_fraction: float = 0.25) -> MemoryPlan:
    """Build the recipe's system on the meta device and plan it (``preset``: plan that preset's model instead)."""
    system_node = _plain(cfg.system)
    system_node["model"] = _model_spec(dict(system_node["model"]), preset)
    system_node.pop("init_from", None)  # weights are not read: the plan needs shapes and dtypes only
    system = instantiate(system_node, path="system")
    with torch.device("meta"):
        system.configure_model()
    return plan_training(system.model, run_shape_of(cfg, ce_fraction=ce_fraction))


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        validate_recipe(cfg)  # the allow-list in force (the CLI's, with any --allow entries)
        plan = plan_recipe(cfg, preset=args.preset, ce_fraction=args.ce_fraction)
    except (RecipeError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan, title=f"memory plan: {args.recipe}" + (f" (model: {args.preset})" if args.preset else "")))
    if args.json:
        print(json.dumps(plan.to_dict()))
    return 0
