"""SigLIP vision tower (HF layout) <-> :class:`~chatumm_kit.components.vit.ViTEncoder` (SPEC §4–5).

A HF SigLIP checkpoint folder holds ``config.json`` (a ``SiglipVisionConfig``, or a full ``SiglipConfig`` whose
``vision_config`` is used) and ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``). Vision
keys sit under a prefix: ``vision_model.`` (SiglipModel, transformers 4 SiglipVisionModel), none (transformers 5
SiglipVisionModel) or ``vit_model.vision_model.`` (BAGEL); it is detected from the patch-embedding key.

The key map is data (:data:`SIGLIP_KEY_MAP`); three named fix-ups change values, not just names:

* :func:`conv_patch_to_linear` — HF stores the patch embedding as Conv2d ``[hidden, 3, p, p]``; the encoder uses a
  Linear over patches flattened as (row-in-patch, col-in-patch, channel): ``w.permute(0, 2, 3, 1).reshape(hidden,
  -1)``. A weight already 2-D (BAGEL's Linear ``[hidden, p*p*3]``) passes through.
* :func:`fuse_qkv` — HF has separate q/k/v projections; the timm block fuses them as ``qkv = cat([q, k, v])``.
* :func:`place_position_grid` — HF SigLIP (without interpolation) has ``g² = (image_size / patch_size)²`` learned
  positions for a fixed ``g × g`` grid, index ``row * g + col``. The encoder's table is indexed ``row * max_side +
  col``; entry ``(r, c)`` for ``r, c < g`` is HF's ``(r, c)`` exactly — so images up to ``g × g`` patches match HF
  bit for bit — and entries beyond the grid repeat the nearest edge entry (``(min(r, g-1), min(c, g-1))``), a
  neutral start to be fine-tuned for larger images.

SigLIP's attention-pooling ``head.*`` is not used by an LLM connector and is skipped; with ``drop_last_layer=True``
the last encoder layer is skipped too (BAGEL's penultimate-layer features, SPEC §5). Any other key that maps to
nothing, or any encoder weight left unfilled, raises :class:`SiglipConversionError` listing them.

Example:
    >>> vit = load_siglip_vit("/path/to/siglip", llm_hidden=3584, drop_last_layer=True)   # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from chatumm_kit.components.vit import ViTEncoder

__all__ = [
    "SIGLIP_KEY_MAP",
    "SiglipConversionError",
    "conv_patch_to_linear",
    "fuse_qkv",
    "linear_patch_to_conv",
    "load_siglip_vit",
    "place_position_grid",
    "save_siglip_vit",
    "siglip_to_vit_state",
    "vit_kwargs_from_siglip_config",
    "vit_to_siglip_state",
]

# HF SigLIP vision key (after the prefix) -> ViTEncoder key. ``{i}`` is a layer index, ``{p}`` weight|bias.
SIGLIP_KEY_MAP: dict[str, str] = {
    "embeddings.patch_embedding.{p}": "patch_embedding.{p}",  # weight: conv_patch_to_linear
    "embeddings.position_embedding.weight": "position_embedding.weight",  # place_position_grid
    "encoder.layers.{i}.layer_norm1.{p}": "layers.{i}.norm1.{p}",
    "encoder.layers.{i}.self_attn.q_proj.{p}": "layers.{i}.attn.qkv.{p}",  # fuse_qkv (first third)
    "encoder.layers.{i}.self_attn.k_proj.{p}": "layers.{i}.attn.qkv.{p}",  # fuse_qkv (second third)
    "encoder.layers.{i}.self_attn.v_proj.{p}": "layers.{i}.attn.qkv.{p}",  # fuse_qkv (last third)
    "encoder.layers.{i}.self_attn.out_proj.{p}": "layers.{i}.attn.proj.{p}",
    "encoder.layers.{i}.layer_norm2.{p}": "layers.{i}.norm2.{p}",
    "encoder.layers.{i}.mlp.fc1.{p}": "layers.{i}.mlp.fc1.{p}",
    "encoder.layers.{i}.mlp.fc2.{p}": "layers.{i}.mlp.fc2.{p}",
    "post_layernorm.{p}": "post_layernorm.{p}",
}
# Vision keys deliberately not converted (SigLIP's attention-pooling head; the kit feeds all patch tokens).
SKIPPED_PREFIXES: tuple[str, ...] = ("head.",)
# Keys of a full SiglipModel outside the vision tower, tolerated next to it in one file.
FOREIGN_PREFIXES: tuple[str, ...] = ("text_model.", "logit_scale", "logit_bias")
# ViTEncoder parts a SigLIP checkpoint does not hold (connector is new; vit_pos_embed is a fixed sin-cos table).
NOT_IN_SIGLIP: tuple[str, ...] = ("connector.", "vit_pos_embed.")
_QKV_ORDER = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_PATCH_KEY = "embeddings.patch_embedding.weight"


class SiglipConversionError(ValueError):
    """A SigLIP checkpoint does not fit the ViT encoder (names the keys or settings at fault)."""


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern + "$")


_RULES = [(_compile(src), dst) for src, dst in SIGLIP_KEY_MAP.items()]
_QKV_TARGET = _compile("layers.{i}.attn.qkv.{p}")
_INVERSE_RULES = [(_compile(dst), src) for src, dst in SIGLIP_KEY_MAP.items() if dst != "layers.{i}.attn.qkv.{p}"]


def _match(rules: list[tuple[re.Pattern[str], str]], key: str) -> tuple[dict[str, str], str] | None:
    """First rule whose pattern matches ``key``: (its named groups, its template), or None."""
    for pattern, template in rules:
        m = pattern.match(key)
        if m:
            return m.groupdict(), template
    return None


# ---------------------------------------------------------------------------------------------------- fix-ups


def conv_patch_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d patch weight ``[hidden, 3, p, p]`` -> Linear ``[hidden, p*p*3]`` in (row, col, channel) order.

    Example:
        >>> conv_patch_to_linear(torch.zeros(8, 3, 2, 2)).shape
        torch.Size([8, 12])
    """
    if weight.ndim == 2:
        return weight
    if weight.ndim != 4 or weight.shape[1] != 3 or weight.shape[2] != weight.shape[3]:
        raise SiglipConversionError(f"patch embedding weight must be [hidden, 3, p, p], got {tuple(weight.shape)}")
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def linear_patch_to_conv(weight: torch.Tensor, *, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`conv_patch_to_linear`: ``[hidden, p*p*3] -> [hidden, 3, p, p]``."""
    return weight.reshape(weight.shape[0], patch_size, patch_size, 3).permute(0, 3, 1, 2).contiguous()


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Separate q/k/v projections (weights ``[D, D]`` or biases ``[D]``) -> the fused ``qkv`` of a timm block."""
    return torch.cat([q, k, v], dim=0)


def place_position_grid(table: torch.Tensor, *, max_side: int) -> torch.Tensor:
    """HF ``[g², D]`` position table of a ``g × g`` grid -> ``[max_side², D]`` indexed ``row * max_side + col``.

    Entries inside the ``g × g`` corner are copied exactly; the rest repeat the nearest edge entry.

    Example:
        >>> t = place_position_grid(torch.arange(4.0)[:, None], max_side=3)   # g = 2
        >>> t[:, 0].tolist()
        [0.0, 1.0, 1.0, 2.0, 3.0, 3.0, 2.0, 3.0, 3.0]
    """
    g = round(table.shape[0] ** 0.5)
    if g * g != table.shape[0]:
        raise SiglipConversionError(f"position table has {table.shape[0]} rows, not a square grid")
    if max_side < g:
        raise SiglipConversionError(
            f"max_patches_per_side={max_side} is smaller than the checkpoint's position grid side {g}"
        )
    idx = torch.arange(max_side).clamp(max=g - 1)
    flat = (idx[:, None] * g + idx[None, :]).reshape(-1)
    return table[flat].clone()


# ---------------------------------------------------------------------------------------------------- state dicts


def _detect_prefix(keys: list[str]) -> str:
    hits = [k[: -len(_PATCH_KEY)] for k in keys if k.endswith(_PATCH_KEY)]
    if len(hits) != 1:
        raise SiglipConversionError(
            f"expected exactly one '*{_PATCH_KEY}' key to locate the vision tower, found {hits}"
        )
    return hits[0]


def siglip_to_vit_state(
    state: dict[str, torch.Tensor], *, num_layers: int, max_patches_per_side: int, prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Map SigLIP vision keys under ``prefix`` to ViTEncoder keys (connector and ``vit_pos_embed`` excluded).

    Args:
        state: checkpoint tensors; keys outside ``prefix`` are not looked at.
        num_layers: encoder layers to keep; layers ``>= num_layers`` are skipped (BAGEL: depth − 1).
        max_patches_per_side: side of the encoder's position table (see :func:`place_position_grid`).
        prefix: vision-tower prefix; detected from the patch-embedding key when None.

    Raises:
        SiglipConversionError: a vision key maps to nothing, a layer is incomplete, or a fix-up's shape is wrong.
    """
    prefix = _detect_prefix(list(state)) if prefix is None else prefix
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[str, list[torch.Tensor | None]] = {}
    unexpected: list[str] = []
    for full_key, value in state.items():
        if not full_key.startswith(prefix):
            continue
        key = full_key[len(prefix) :]
        if key.startswith(SKIPPED_PREFIXES):
            continue
        hit = _match(_RULES, key)
        if hit is None:
            unexpected.append(full_key)
            continue
        groups, template = hit
        if "i" in groups and int(groups["i"]) >= num_layers:
            continue  # dropped layer (drop_last_layer / shallower encoder)
        target = template.format(**groups)
        if key == _PATCH_KEY:
            value = conv_patch_to_linear(value)
        elif key == "embeddings.position_embedding.weight":
            value = place_position_grid(value, max_side=max_patches_per_side)
        elif ".self_attn." in key and key.split(".")[-2] in _QKV_ORDER:
            qkv_parts.setdefault(target, [None, None, None])[_QKV_ORDER[key.split(".")[-2]]] = value
            continue
        out[target] = value
    if unexpected:
        raise SiglipConversionError(f"unexpected SigLIP keys (no mapping): {sorted(unexpected)}")
    for target, parts in qkv_parts.items():
        if any(p is None for p in parts):
            names = [n for n, p in zip(("q_proj", "k_proj", "v_proj"), parts) if p is None]
            raise SiglipConversionError(f"{target}: missing {names} in the checkpoint")
        out[target] = fuse_qkv(*parts)
    return out


def vit_to_siglip_state(vit: ViTEncoder) -> dict[str, torch.Tensor]:
    """ViTEncoder -> HF SigLIP vision keys (no prefix, transformers-5 ``SiglipVisionModel`` layout).

    Inverse of :func:`siglip_to_vit_state` for a table of ``max_side × max_side``: the position table is exported
    whole (``image_size = max_side · patch``), the patch embedding goes back to Conv2d and ``qkv`` is split into
    q/k/v. Connector and ``vit_pos_embed`` are not SigLIP's and are left out.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in vit.state_dict().items():
        if key.startswith(NOT_IN_SIGLIP):
            continue
        value = value.detach().clone()
        if key == "patch_embedding.weight":
            out[_PATCH_KEY] = linear_patch_to_conv(value, patch_size=vit.patch_size)
            continue
        qkv = _QKV_TARGET.match(key)
        if qkv:
            for name, part in zip(_QKV_ORDER, value.chunk(3, dim=0)):
                out[f"encoder.layers.{qkv['i']}.self_attn.{name}.{qkv['p']}"] = part.clone()
            continue
        hit = _match(_INVERSE_RULES, key)
        if hit is None:
            raise SiglipConversionError(f"ViTEncoder key {key!r} has no SigLIP name")
        groups, source = hit
        out[source.format(**groups)] = value
    return out


# ---------------------------------------------------------------------------------------------------- folders


def vit_kwargs_from_siglip_config(
    config: dict, *, llm_hidden: int, drop_last_layer: bool = False, max_patches_per_side: int | None = None
) -> dict:
    """ViTEncoder keyword arguments from a SigLIP (vision) config dict.

    ``max_patches_per_side`` defaults to the checkpoint's grid side ``image_size // patch_size``.
    """
    cfg = config.get("vision_config", config)
    act = cfg.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        raise SiglipConversionError(f"hidden_act={act!r} is not the tanh-approximated GELU the encoder uses")
    if cfg.get("num_channels", 3) != 3:
        raise SiglipConversionError(f"num_channels={cfg['num_channels']}: the encoder takes RGB (3) images")
    depth = int(cfg["num_hidden_layers"]) - (1 if drop_last_layer else 0)
    grid = int(cfg["image_size"]) // int(cfg["patch_size"])
    return dict(
        patch_size=int(cfg["patch_size"]),
        hidden=int(cfg["hidden_size"]),
        num_layers=depth,
        num_heads=int(cfg["num_attention_heads"]),
        mlp_dim=int(cfg["intermediate_size"]),
        max_patches_per_side=grid if max_patches_per_side is None else max_patches_per_side,
        llm_hidden=llm_hidden,
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
    )


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return load_file(single)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")


def load_siglip_vit(
    folder: str | Path,
    *,
    llm_hidden: int,
    drop_last_layer: bool = False,
    max_patches_per_side: int | None = None,
    config_name: str = "config.json",
    dtype: torch.dtype | None = None,
) -> ViTEncoder:
    """Build a :class:`ViTEncoder` from a local HF SigLIP folder and load its vision weights.

    The connector is freshly initialised (SigLIP has none) and ``vit_pos_embed`` is the fixed sin-cos table.

    Args:
        folder: directory with ``config_name`` and ``model.safetensors`` (or an index + shards).
        llm_hidden: connector output width.
        drop_last_layer: build and load ``depth − 1`` layers (BAGEL's penultimate-layer features).
        max_patches_per_side: position-table side (default: the checkpoint's grid side).
        config_name: config file inside ``folder`` (BAGEL: ``vit_config.json``).
        dtype: cast the loaded encoder to this dtype (default: float32).

    Raises:
        SiglipConversionError: unexpected keys (outside the known SigLIP text tower) or unfilled encoder weights.
    """
    folder = Path(folder)
    config = json.loads((folder / config_name).read_text())
    kwargs = vit_kwargs_from_siglip_config(
        config, llm_hidden=llm_hidden, drop_last_layer=drop_last_layer, max_patches_per_side=max_patches_per_side
    )
    state = _read_safetensors(folder)
    prefix = _detect_prefix(list(state))
    strays = [k for k in state if not k.startswith(prefix) and not k.startswith(FOREIGN_PREFIXES)]
    if strays:
        raise SiglipConversionError(f"{folder}: unexpected keys outside the vision tower {prefix!r}: {sorted(strays)}")
    vit = ViTEncoder(**kwargs)
    converted = siglip_to_vit_state(
        state, num_layers=kwargs["num_layers"], max_patches_per_side=kwargs["max_patches_per_side"], prefix=prefix
    )
    expected = {k for k in vit.state_dict() if not k.startswith(NOT_IN_SIGLIP)}
    missing, extra = sorted(expected - converted.keys()), sorted(converted.keys() - expected)
    if missing or extra:
        raise SiglipConversionError(f"{folder}: missing encoder weights {missing}; keys with no place {extra}")
    result = vit.load_state_dict(converted, strict=False)  # connector / vit_pos_embed stay as built
    assert not result.unexpected_keys, result.unexpected_keys
    return vit.to(dtype) if dtype is not None else vit


def save_siglip_vit(vit: ViTEncoder, folder: str | Path) -> Path:
    """Write the encoder's vision weights as a HF ``SiglipVisionModel`` folder (config.json + model.safetensors).

    ``image_size = max_patches_per_side · patch_size`` so the exported position grid is the whole table; the
    attention-pooling head is off (``vision_use_head: false``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hp = vit.hparams
    config = {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": hp.hidden,
        "intermediate_size": hp.mlp_dim,
        "num_hidden_layers": hp.num_layers,
        "num_attention_heads": hp.num_heads,
        "patch_size": hp.patch_size,
        "image_size": hp.max_patches_per_side * hp.patch_size,
        "layer_norm_eps": hp.layer_norm_eps,
        "num_channels": 3,
        "attention_dropout": 0.0,
        "vision_use_head": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.contiguous() for k, v in vit_to_siglip_state(vit).items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
