"""``prepare`` steps of training recipes: make what a run needs when it is missing, reuse it otherwise.

Each step is a callable built by the recipe engine (``prepare: [{_component_: ..., ...}]``); building it does the
work. Steps are idempotent, so the main job on a fresh checkout synthesises its data and fits its VAE, and the
second run reuses both.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "ensure_trained",
    "ensure_synthesised",
    "ensure_tokenizer",
    "ensure_exported",
    "dialogue_texts",
    "nested_recipe_check",
]

_CHECKING: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("chatumm_nested_recipes", default=())


def nested_recipe_check(check: Callable[[Any], None], *, defaults: dict | None = None):
    """A ``check_recipe_arguments`` hook for a step that runs another recipe (``recipe`` + ``overrides``): load it
    and apply ``check`` (the checks of the command that would run it), so ``chatumm validate`` and the start of
    ``chatumm train`` see a refused callable or a typo in a nested recipe before any step runs. A recipe that
    prepares itself (a cycle) is an error."""

    def hook(kwargs: dict[str, Any]) -> list[str]:
        from chatumm_kit.config import RecipeError, find_recipe, load_recipe

        recipe, overrides = kwargs.get("recipe"), kwargs.get("overrides") or []
        if not isinstance(recipe, str) or not isinstance(overrides, list):
            return []  # the signature check reports the type
        try:
            file = str(find_recipe(recipe).resolve())
            if file in _CHECKING.get():
                return [f"recipe: {recipe} runs itself through its own steps (a cycle)"]
            token = _CHECKING.set((*_CHECKING.get(), file))
            try:
                check(load_recipe(recipe, [str(o) for o in overrides], defaults=defaults))
            finally:
                _CHECKING.reset(token)
        except RecipeError as e:
            return [f"recipe: in {recipe}: {p}" for p in e.problems]
        return []

    return hook


def _ensure(*, kind: str, recipe: str, artifact: str, overrides: list[str] | None, run) -> Path:
    from chatumm_kit.config import load_recipe

    path = Path(artifact)
    if path.exists():
        print(f"prepare: reusing {path}")
        return path
    print(f"prepare: {path} is missing, running chatumm {kind} {recipe}")
    cfg = load_recipe(recipe, overrides or [], defaults={"resume_from": None} if kind == "train" else None)
    run(cfg)  # run_training / run_synth check the whole recipe first, under the allow-list in force
    if not path.exists():
        raise FileNotFoundError(f"prepare: recipe {recipe} finished but did not produce {path}")
    return path


def ensure_trained(*, recipe: str, artifact: str, overrides: list[str] | None = None) -> Path:
    """Run ``chatumm train RECIPE OVERRIDES`` unless ``artifact`` exists; return the artifact path."""
    from chatumm_kit.training.run import run_training

    return _ensure(kind="train", recipe=recipe, artifact=artifact, overrides=overrides, run=run_training)


def ensure_synthesised(*, recipe: str, artifact: str, overrides: list[str] | None = None) -> Path:
    """Run ``chatumm synth RECIPE OVERRIDES`` unless ``artifact`` (e.g. the shard ``index.json``) exists."""
    from chatumm_kit.synth.pipeline import run_synth

    return _ensure(kind="synth", recipe=recipe, artifact=artifact, overrides=overrides, run=run_synth)


def dialogue_texts(shards: str | list[str]):
    """Every text segment of every dialogue in ``shards`` (anything ``resolve_shards`` accepts)."""
    from chatumm_kit.data.shards import read_samples
    from chatumm_kit.data.text import dialogue_texts as texts

    return texts(read_samples(shards))


def _check_train(cfg) -> None:
    from chatumm_kit.training.run import check_train_recipe

    check_train_recipe(cfg)


def _check_synth(cfg) -> None:
    from chatumm_kit.synth.pipeline import check_synth_recipe

    check_synth_recipe(cfg)


ensure_trained.check_recipe_arguments = nested_recipe_check(_check_train, defaults={"resume_from": None})
ensure_synthesised.check_recipe_arguments = nested_recipe_check(_check_synth)


def ensure_tokenizer(*, shards: str | list[str], output: str, vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE on the dialogue text of ``shards`` unless ``output`` (a folder) already holds one."""
    from chatumm_kit.components.tokenizer import ChatTokenizer

    path = Path(output)
    if (path / "tokenizer.json").exists():
        print(f"prepare: reusing tokenizer {path}")
        return path
    tokenizer = ChatTokenizer.train(dialogue_texts(shards), vocab_size=vocab_size)
    tokenizer.save(path)
    print(f"prepare: trained a {tokenizer.vocab_size}-token tokenizer on {shards} → {path}")
    return path


def ensure_exported(*, checkpoint: str, output: str, use_ema: bool | None = None) -> Path:
    """Write a training checkpoint's model weights as one safetensors file (kit layout, the ``init_from`` of a
    fine-tuning recipe) unless ``output`` exists. ``use_ema``: None takes the EMA weights when the run saved some."""
    from chatumm_kit.training.checkpoints import export_safetensors
    from chatumm_kit.training.loading import checkpoint_has_ema

    path = Path(output)
    if path.exists():
        print(f"prepare: reusing {path}")
        return path
    ema = checkpoint_has_ema(checkpoint) if use_ema is None else use_ema
    print(f"prepare: exporting {'EMA' if ema else 'raw'} weights of {checkpoint} to {path}")
    return export_safetensors(checkpoint, path, use_ema=ema, prefix="model.")
