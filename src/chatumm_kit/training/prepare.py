"""``prepare`` steps of training recipes: make what a run needs when it is missing, reuse it otherwise.

Each step is a callable built by the recipe engine (``prepare: [{_component_: ..., ...}]``); building it does the
work. Steps are idempotent, so the main job on a fresh checkout synthesises its data and fits its VAE, and the
second run reuses both.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ensure_trained", "ensure_synthesised", "ensure_tokenizer", "ensure_exported", "dialogue_texts"]


def _ensure(*, kind: str, recipe: str, artifact: str, overrides: list[str] | None, run) -> Path:
    from chatumm_kit.config import load_recipe, validate_recipe

    path = Path(artifact)
    if path.exists():
        print(f"prepare: reusing {path}")
        return path
    print(f"prepare: {path} is missing, running chatumm {kind} {recipe}")
    cfg = load_recipe(recipe, overrides or [])
    validate_recipe(cfg)
    run(cfg)
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
    from chatumm_kit.data.dialogue import TextSegment
    from chatumm_kit.data.shards import read_samples

    for sample in read_samples(shards):
        for turn in sample.dialogue.turns:
            for seg in turn.segments:
                if isinstance(seg, TextSegment):
                    yield seg.text


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
