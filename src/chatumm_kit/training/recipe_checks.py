"""What a training recipe's nodes must agree on, checked before any ``prepare`` step runs (README "Bad input").

Each node alone is checked by :func:`~chatumm_kit.config.validate_recipe`; these checks relate nodes and call the
rules the built objects apply, so ``chatumm validate`` and the first second of ``chatumm train`` fail where the run
would have failed minutes later:

* the schedule: its own spec (a cosine's ``total_steps`` above its warm-up) and warm-up that ends within
  ``max_steps``;
* the model spec (its argument types are the validator's): the model built on the meta device (no memory, no
  files: a tokenizer or VAE file that ``prepare`` has not made yet is left out), so the components' own rules run —
  sizes >= 1, heads a multiple of KV heads, ...;
* the data stream against that model (:func:`stream_problems`): the ViT patch, the VAE token stride, and the largest
  view within the model's position tables (the rule ``ChatUMMSystem`` applies at fit start).

Example:
    >>> cosine = "chatumm_kit.training.schedules.CosineSchedule"
    >>> plain = {"system": {"schedule": {"_component_": cosine, "warmup_steps": 50, "total_steps": 50}},
    ...          "trainer": {"max_steps": 50}}
    >>> train_recipe_problems(plain)
    ['system.schedule.total_steps: CosineSchedule.total_steps: must exceed warmup_steps=50, got 50']
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from chatumm_kit.config import RecipeError, resolve_callable

__all__ = ["train_recipe_problems", "schedule_problems", "model_problems", "stream_problems"]

_SPEC_FILE_KEYS = ("tokenizer", "vae_weights")  # files a model spec names that a prepare step may still have to make
_DIALOGUE_DATA = "chatumm_kit.data.datamodule.DialogueDataModule"


def _schedule_class(node: dict[str, Any]):
    """``(ScheduleSpec subclass, kwargs)`` of a schedule node, or ``(None, {})`` when it names something else."""
    from chatumm_kit.training.schedules import ScheduleSpec, schedule_node

    try:
        kwargs = schedule_node(node)
        cls = resolve_callable(kwargs.pop("_component_"))
    except (RecipeError, ValueError):
        return None, {}  # reported by validate_recipe / the system
    kwargs.pop("_partial_", None)
    return (cls, kwargs) if inspect.isclass(cls) and issubclass(cls, ScheduleSpec) else (None, {})


def schedule_problems(plain: dict[str, Any]) -> list[str]:
    """The schedule spec's own rules, and warm-up that ends before ``trainer.max_steps``."""
    node = (plain.get("system") or {}).get("schedule")
    if not isinstance(node, dict):
        return []
    cls, kwargs = _schedule_class(node)
    if cls is None:
        return []
    try:
        spec = cls(**kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e)
        field = msg.split(":", 1)[0].rsplit(".", 1)[-1] if ":" in msg else ""
        return [f"system.schedule{'.' + field if field in kwargs else ''}: {msg}"]
    max_steps = (plain.get("trainer") or {}).get("max_steps")
    if (
        isinstance(max_steps, int) and not isinstance(max_steps, bool) and 0 < max_steps < spec.warmup_steps
    ):  # step W - 1 is the peak
        return [
            f"system.schedule.warmup_steps: {spec.warmup_steps} warm-up steps do not fit in trainer.max_steps="
            f"{max_steps} (the run would end before the learning rate peaks); lower warmup_steps or raise max_steps"
        ]
    return []


def _model_callable(spec: dict[str, Any]):
    """``(callable, dotted name, kwargs)`` of a model spec (an old ``{preset: NAME}`` spec mapped)."""
    from chatumm_kit.presets import model_spec

    kwargs = model_spec(spec)
    dotted = kwargs.pop("_component_")
    kwargs.pop("_partial_", None)
    return resolve_callable(dotted), dotted, kwargs


def model_problems(plain: dict[str, Any]) -> tuple[list[str], Any]:
    """Problems of ``system.model``, and the model built on the meta device (None when it cannot be built)."""
    spec = (plain.get("system") or {}).get("model")
    if not isinstance(spec, dict):
        return [], None
    try:
        fn, _, kwargs = _model_callable(spec)
    except RecipeError:
        return [], None  # reported by validate_recipe
    if "path" in kwargs and not Path(str(kwargs["path"])).exists():
        return [], None  # a kit folder that a prepare step or `chatumm convert` makes: nothing to build yet
    params = inspect.signature(fn).parameters
    for key in _SPEC_FILE_KEYS:
        if isinstance(kwargs.get(key), str) and not Path(kwargs[key]).exists():
            kwargs[key] = None
            if key == "tokenizer" and kwargs.get("vocab_size") is None and "vocab_size" in params:
                kwargs["vocab_size"] = 256  # any size: the token table's size changes no other rule
    try:
        with torch.device("meta"):
            return [], fn(**kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        return [f"system.model: {str(e).splitlines()[0]}"], None


def stream_problems(model: Any, data: dict[str, Any]) -> list[str]:
    """Where the data module's view sizing disagrees with ``model`` (a :class:`~chatumm_kit.model.ChatUMM`): the ViT
    patch and VAE token stride must be the model's, and the largest view must fit its position tables — the rule
    ``ChatUMMSystem.on_fit_start`` applies (:meth:`~chatumm_kit.data.view_sizing.ViewSizing.check_tables`)."""
    from chatumm_kit.data.packing import model_stream_settings
    from chatumm_kit.data.view_sizing import view_sizing_of_data

    if data.get("view_sizing") is None:  # settings the data node leaves out are the model's (use_model_settings)
        data = {**model_stream_settings(model), **{k: v for k, v in data.items() if v is not None}}
    try:
        sizing = view_sizing_of_data(data)
    except (TypeError, ValueError):
        return []  # reported by the data module's own checks
    problems = []
    for key, ours, theirs in (
        ("vit_patch_size", sizing.vit.stride, model.vit_patch_size),
        ("vae_token_stride", sizing.vae.stride, model.vae_token_stride),
    ):
        if ours != theirs:
            problems.append(f"data.{key}: {ours}, but the model's is {theirs}")
    if not problems:
        try:
            sizing.check_tables(
                vit_max_patches_per_side=model.vit_max_patches_per_side, max_latent_side=model.max_latent_side
            )
        except ValueError as e:
            where = "data.view_sizing" if "view_sizing" in data else "data.max_image_side"
            problems.append(f"{where}: {e}")
    return problems


def train_recipe_problems(plain: dict[str, Any]) -> list[str]:
    """Every cross-node problem of a resolved training recipe (a plain dict), one line each, YAML path first."""
    problems = schedule_problems(plain)
    found, model = model_problems(plain)
    problems += found
    data = plain.get("data")
    if model is not None and isinstance(data, dict) and data.get("_component_") == _DIALOGUE_DATA:
        problems += stream_problems(model, data)
    return problems
