"""Qwen2 / Qwen2.5 Hugging Face folder → :class:`MoTBackbone` (understanding expert, copied to generation; SPEC §5).

The folder holds ``config.json`` and ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``).
Weights are read with ``safetensors`` only. The key map is data (:data:`QWEN2_KEY_MAP`, regex → template); the few
things that are not a rename are small named fix-ups:

* :func:`untie_lm_head` — a tied checkpoint stores no ``lm_head.weight``; our head is untied, so it gets a copy of
  the embedding;
* :func:`unit_qk_norms` — Qwen2/2.5 has no q/k-norm weights; when the target config asks for ``qk_norm=True``
  (BAGEL's recipe: QK-norm added on top of Qwen2.5) they start at one. That is **not** an identity (RMSNorm rescales
  every head vector), so logits differ from the source model; use ``qk_norm=False`` (the default when the checkpoint
  has no q/k-norm weights) for exact parity;
* :func:`copy_generation_expert` — every ``*_moe_gen`` tensor (and ``norm_moe_gen``) starts as a copy of its
  understanding twin (SPEC §4).

Any checkpoint key that the map does not place, or any model key left unfilled, is an error listing the keys.

Example:
    >>> backbone = load_qwen2_folder("/path/to/Qwen2.5-0.5B")                       # doctest: +SKIP
    >>> backbone.text_logits(torch.tensor([[1, 2, 3]])).shape                        # doctest: +SKIP
    torch.Size([1, 3, 151936])
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from chatumm_kit.components.mot import MoTBackbone, MoTConfig

__all__ = [
    "QWEN2_KEY_MAP",
    "copy_generation_expert",
    "load_qwen2_folder",
    "map_qwen2_keys",
    "mot_config_from_qwen2",
    "read_safetensors_folder",
    "unit_qk_norms",
    "untie_lm_head",
]

QWEN2_KEY_MAP: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "embed_tokens.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"layers.\1.self_attn.\2_proj.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.self_attn.o_proj.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", r"layers.\1.self_attn.\2_norm.weight"),  # Qwen3-style
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2_proj.weight"),
    (
        r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
        r"layers.\1.\2.weight",
    ),
]
"""HF Qwen2 key (full-match regex) → understanding-expert key of :class:`MoTBackbone`."""

_QK_NORM_KEY = re.compile(r"layers\.\d+\.self_attn\.[qk]_norm\.weight")


def mot_config_from_qwen2(hf_config: dict[str, Any], **overrides: Any) -> MoTConfig:
    """Translate a Qwen2 ``config.json`` dict to :class:`MoTConfig` (``overrides`` win, e.g. ``qk_norm=True``).

    Reads ``rope_theta`` from the top level or from ``rope_parameters`` (transformers ≥ 5). Rope scaling and sliding
    window attention are not implemented and are refused.
    """
    rope = hf_config.get("rope_parameters") or {}
    rope_scaling = hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope_scaling.get("rope_type", rope_scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"Qwen2 config: rope_type={rope_type!r} is not supported (only 'default')")
    if hf_config.get("use_sliding_window"):
        raise ValueError("Qwen2 config: use_sliding_window=true is not supported")
    heads = hf_config["num_attention_heads"]
    values: dict[str, Any] = dict(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads", heads),
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        intermediate_size=hf_config["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf_config.get("rope_theta", 10_000.0))),
        rms_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        qk_norm=False,
    )
    values.update(overrides)
    return MoTConfig(**values)


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards named in ``model.safetensors.index.json``."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def map_qwen2_keys(hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename by :data:`QWEN2_KEY_MAP`; returns ``(mapped, unplaced_hf_keys)``.

    ``rotary_emb.inv_freq`` buffers (older exports) are recomputed by our rotary and skipped silently.
    """
    mapped: dict[str, torch.Tensor] = {}
    unplaced: list[str] = []
    for key, tensor in hf_state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        for pattern, template in QWEN2_KEY_MAP:
            m = re.fullmatch(pattern, key)
            if m:
                mapped[m.expand(template)] = tensor
                break
        else:
            unplaced.append(key)
    return mapped, unplaced


def untie_lm_head(state: dict[str, torch.Tensor], *, tied: bool) -> None:
    """Tied checkpoint (no ``lm_head.weight``): our untied head starts as a copy of the embedding."""
    if tied and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"].clone()


def unit_qk_norms(state: dict[str, torch.Tensor], model: MoTBackbone) -> None:
    """Fill q/k-norm gains the checkpoint lacks with ones (only when the model has q/k norms)."""
    for key, p in model.state_dict(keep_vars=True).items():
        if _QK_NORM_KEY.fullmatch(key) and key not in state:
            state[key] = torch.ones(p.shape, dtype=torch.float32)


def copy_generation_expert(state: dict[str, torch.Tensor], model: MoTBackbone) -> None:
    """Add every generation-expert tensor as a clone of its understanding twin."""
    for und_name, gen_name in model.expert_module_names():
        for key in [k for k in state if k.startswith(und_name + ".")]:
            state[gen_name + key[len(und_name) :]] = state[key].clone()


def load_qwen2_folder(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    **config_overrides: Any,
) -> MoTBackbone:
    """Build a :class:`MoTBackbone` from a local Qwen2 HF folder (both experts = the checkpoint's decoder).

    Args:
        folder: directory with ``config.json`` and safetensors weights.
        dtype: cast every tensor to this dtype (``None`` keeps the stored dtypes).
        device: where the weights land.
        config_overrides: :class:`MoTConfig` fields to force (``qk_norm``, ``attn_backend``, ...). ``qk_norm``
            defaults to whether the checkpoint carries q/k-norm weights.

    Raises:
        ValueError: listing checkpoint keys with no place in the model and model keys the checkpoint leaves empty.
    """
    folder = Path(folder)
    hf_config = json.loads((folder / "config.json").read_text())
    state, unplaced = map_qwen2_keys(read_safetensors_folder(folder))
    config_overrides.setdefault("qk_norm", any(_QK_NORM_KEY.fullmatch(k) for k in state))
    config = mot_config_from_qwen2(hf_config, **config_overrides)
    model = MoTBackbone.from_meta(config)

    untie_lm_head(state, tied=bool(hf_config.get("tie_word_embeddings", False)))
    unit_qk_norms(state, model)
    copy_generation_expert(state, model)

    expected = set(model.state_dict().keys())
    unexpected = sorted(set(state) - expected) + unplaced
    missing = sorted(expected - set(state))
    if unexpected or missing:
        raise ValueError(
            f"load_qwen2_folder({folder}): {len(unexpected)} unexpected checkpoint keys {unexpected[:20]}, "
            f"{len(missing)} missing model keys {missing[:20]}"
        )
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model
