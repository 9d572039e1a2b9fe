"""Checkpoints for release: read a training checkpoint offline, export one safetensors file, load it back strictly.

Training checkpoints come in two shapes:

* a **file** (``*.ckpt``, ``torch.save``): DDP, one device, or ``ModelParallelStrategy(save_distributed_checkpoint
  =False)`` — the model under ``"state_dict"``, the EMA (if :class:`~chatumm_kit.training.ema.EMACallback` ran) in
  the callback's state;
* a **folder** written by ``torch.distributed.checkpoint`` (DCP): ``ModelParallelStrategy`` / :func:`~chatumm_kit
  .training.strategies.fsdp2` with ``save_distributed_checkpoint=True`` (the default): every rank wrote its own
  shards, nothing was gathered on rank 0. Lightning saves ``{"state_dict": ..., "optimizer_0": ...}`` through DCP
  plus ``meta.pt`` (loops, callbacks); the EMA shards sit in ``"state_dict"`` under ``_ema.<name>``.

:func:`read_weights` consolidates either shape on **one process without a process group**: it reads the DCP
metadata, allocates full tensors for the model (or EMA) entries only — optimizer moments, twice the model size,
are never read — and lets DCP fill them from the shard files (the offline path of
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``, restricted to the needed keys).

**Reading for inference** (``read_weights(..., convert=...)``): each tensor is handed to ``convert`` (e.g. cast to
bf16 and moved to the GPU) as soon as it is read, so the stored-dtype copy never exists whole on the host: a file
checkpoint is memory-mapped (its tensors are views of the page cache), and a DCP folder is read in groups of at most
``DCP_READ_GROUP_BYTES`` — only the averaged value of each weight is read when ``use_ema`` (not both).

Example:
    >>> export_safetensors("runs/chat/checkpoints/last.ckpt", "release/ema.safetensors", use_ema=True,
    ...                    prefix="model.")  # doctest: +SKIP
    >>> load_safetensors_into(model, "release/ema.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import torch
from torch import nn

from chatumm_kit.training.ema import EMA_CALLBACK_MARKER, EMA_KEY_PREFIX
from chatumm_kit.training.resume import describe_load_error, unreadable_message

__all__ = [
    "StateDictMismatchError",
    "export_safetensors",
    "is_sharded_checkpoint",
    "load_safetensors_into",
    "read_weights",
]

_MODEL_KEY = "state_dict"  # Lightning's name for the model entry, in files and DCP folders alike

DCP_READ_GROUP_BYTES = 1 << 30
"""Stored bytes read from a DCP folder at once when ``read_weights`` converts as it reads (one group alive at a time)."""

TensorConvert = Callable[[str, torch.Tensor], torch.Tensor]


class StateDictMismatchError(ValueError):
    """Keys or shapes of a weight file do not match a module; lists what is ``missing``, ``unexpected``, ``mismatched``."""

    def __init__(
        self, where: str, *, missing: list[str], unexpected: list[str], mismatched: list[str] | None = None
    ) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched or []

        def show(keys: list[str]) -> str:
            return f"{len(keys)} {keys[:20]}" + (" ..." if len(keys) > 20 else "")

        super().__init__(
            f"{where}: missing keys: {show(self.missing)}; unexpected keys: {show(self.unexpected)}; "
            f"shape mismatches: {show(self.mismatched)}"
        )


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a DCP checkpoint folder (it holds DCP's ``.metadata`` file)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def _check_ema_entries(path: str | Path, ema_names: Collection[str], model_names: Collection[str]) -> None:
    """The EMA weights asked for exist, and each averages a model weight (both read paths check the same way)."""
    if not ema_names:
        raise ValueError(f"read_weights: {path} holds no EMA weights (was EMACallback in the run?)")
    stray = sorted(set(ema_names) - set(model_names))
    if stray:
        raise ValueError(f"read_weights: {path}: EMA entries without a model weight: {stray[:20]}")


def _read_dcp(
    path: Path, *, use_ema: bool, prefix: str = "", convert: TensorConvert | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(model, ema)`` full tensors from a DCP folder; ``ema`` is empty unless ``use_ema``.

    With ``convert``: only the keys under ``prefix`` are read, the EMA value in place of each averaged weight (``ema``
    comes back empty, ``model`` already holds them), in groups of at most :data:`DCP_READ_GROUP_BYTES` stored bytes,
    each tensor converted as soon as its group is read.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    metadata = reader.read_metadata()
    names: dict[str, str] = {}  # DCP flat key -> model state-dict key
    for flat_key in metadata.state_dict_metadata:
        nested = metadata.planner_data.get(flat_key) if metadata.planner_data else None
        if nested is not None and len(nested) >= 2 and nested[0] == _MODEL_KEY:
            names[flat_key] = ".".join(str(p) for p in nested[1:])
        elif nested is None and flat_key.startswith(_MODEL_KEY + "."):
            names[flat_key] = flat_key[len(_MODEL_KEY) + 1 :]
    if not names:
        raise ValueError(f"read_weights: {path} is a DCP folder without a {_MODEL_KEY!r} entry (not a Lightning one?)")
    wanted = {k: n for k, n in names.items() if use_ema or not n.startswith(EMA_KEY_PREFIX)}
    not_tensors = sorted(
        n for k, n in wanted.items() if not isinstance(metadata.state_dict_metadata[k], TensorStorageMetadata)
    )
    if not_tensors:
        raise ValueError(f"read_weights: {path}: non-tensor model entries cannot be exported: {not_tensors}")

    def empty(k: str) -> torch.Tensor:
        md = metadata.state_dict_metadata[k]
        return torch.empty(tuple(md.size), dtype=md.properties.dtype)

    def load(target: dict[str, torch.Tensor]) -> None:
        with warnings.catch_warnings():  # DCP warns that no process group exists: single-process reading is the point
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(target, storage_reader=reader, no_dist=True)

    if convert is None:
        target = {k: empty(k) for k in wanted}
        load(target)
        model = {n: target[k] for k, n in wanted.items() if not n.startswith(EMA_KEY_PREFIX)}
        ema = {n[len(EMA_KEY_PREFIX) :]: target[k] for k, n in wanted.items() if n.startswith(EMA_KEY_PREFIX)}
        return model, ema
    source = {n: k for k, n in wanted.items() if not n.startswith(EMA_KEY_PREFIX)}  # model key -> flat key read
    if use_ema:
        averaged = {n[len(EMA_KEY_PREFIX) :]: k for k, n in wanted.items() if n.startswith(EMA_KEY_PREFIX)}
        _check_ema_entries(path, averaged.keys(), source.keys())
        source.update(averaged)
    source = {n: k for n, k in source.items() if n.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    group: dict[str, str] = {}
    size = 0
    for i, (n, k) in enumerate(source.items()):
        md = metadata.state_dict_metadata[k]
        group[n], size = k, size + md.size.numel() * md.properties.dtype.itemsize
        if size >= DCP_READ_GROUP_BYTES or i == len(source) - 1:
            target = {k: empty(k) for k in group.values()}
            load(target)
            for name, flat in group.items():
                out[name] = convert(name, target.pop(flat))
            group, size = {}, 0
    return out, {}


def _read_file(
    path: Path, *, use_ema: bool, weights_only: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    except Exception as err:  # damaged, or holding objects safe loading refuses: one line, and what else there is
        raise ValueError(f"read_weights: {unreadable_message(path, describe_load_error(err))}") from None
    if not isinstance(ckpt, Mapping) or _MODEL_KEY not in ckpt:
        raise ValueError(f"read_weights: {path} is not a Lightning checkpoint (no {_MODEL_KEY!r} entry)")
    model = dict(ckpt[_MODEL_KEY])
    if not use_ema:
        return model, {}
    states = [
        s
        for s in (ckpt.get("callbacks") or {}).values()
        if isinstance(s, Mapping) and s.get("format") == EMA_CALLBACK_MARKER and "shadow" in s
    ]
    if len(states) > 1:
        raise ValueError(f"read_weights: {path} holds {len(states)} EMA callback states; keep one EMACallback")
    return model, dict(states[0]["shadow"]) if states else {}


def read_weights(
    checkpoint: str | Path,
    *,
    use_ema: bool = False,
    prefix: str = "",
    weights_only: bool = True,
    convert: TensorConvert | None = None,
) -> dict[str, torch.Tensor]:
    """Full model weights from a checkpoint file or DCP folder, on CPU, on one process.

    Args:
        checkpoint: ``*.ckpt`` file or sharded checkpoint folder.
        use_ema: replace every averaged parameter by its EMA value (buffers and frozen weights stay the model's);
            errors if the checkpoint holds no EMA.
        prefix: keep only keys starting with ``prefix`` and strip it (``"model."`` → the inner model's keys).
        weights_only: ``torch.load`` safety for checkpoint files (DCP folders never unpickle model data).
        convert: ``(full key, tensor) -> tensor`` applied to each kept tensor as soon as it is read (a cast, a move
            to the GPU), so the stored copy never exists whole on the host (see the module docstring).

    Returns:
        ``{state-dict key: tensor}`` in the checkpoint's dtypes (or as ``convert`` made them).

    Example:
        >>> w = read_weights("last.ckpt", prefix="model.", convert=lambda k, t: t.to("cuda", torch.bfloat16))  # doctest: +SKIP
    """
    path = Path(checkpoint)
    if is_sharded_checkpoint(path):
        if convert is not None:
            model, _ = _read_dcp(path, use_ema=use_ema, prefix=prefix, convert=convert)
            if prefix:
                if not model:
                    raise ValueError(f"read_weights: {path}: no key starts with prefix {prefix!r}")
                model = {k[len(prefix) :]: v for k, v in model.items()}
            return model
        model, ema = _read_dcp(path, use_ema=use_ema)
    elif path.is_file():
        model, ema = _read_file(path, use_ema=use_ema, weights_only=weights_only)
    else:
        raise FileNotFoundError(f"read_weights: {path} is neither a checkpoint file nor a DCP checkpoint folder")
    if use_ema:
        _check_ema_entries(path, ema.keys(), model.keys())
        model.update(ema)
    if prefix:
        model = {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}
        if not model:
            raise ValueError(f"read_weights: {path}: no key starts with prefix {prefix!r}")
    if convert is not None:  # a memory-mapped file: each converted tensor is the only new allocation
        model = {k: convert(prefix + k, v) for k, v in model.items()}
    return model


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with its own storage (safetensors refuses tied/shared tensors)."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return out


def export_safetensors(
    checkpoint: str | Path,
    out_file: str | Path,
    *,
    use_ema: bool = False,
    prefix: str = "",
    dtype: torch.dtype | None = None,
    weights_only: bool = True,
) -> Path:
    """Consolidate a checkpoint (file or sharded folder) into one safetensors file for release.

    Args:
        checkpoint, use_ema, prefix, weights_only: see :func:`read_weights`.
        out_file: the ``.safetensors`` file to write (parent folders are created).
        dtype: cast floating-point tensors (e.g. ``torch.bfloat16``); ``None`` keeps the training dtype.

    Returns:
        ``out_file`` as a ``Path``.

    Example:
        >>> export_safetensors("runs/x/checkpoints/epoch=0.ckpt", "ema.safetensors", use_ema=True)  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    weights = read_weights(checkpoint, use_ema=use_ema, prefix=prefix, weights_only=weights_only)
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(_unshared(weights), str(out), metadata={"format": "pt", "ema": str(bool(use_ema)).lower()})
    return out


def load_safetensors_into(module: nn.Module, file: str | Path, *, prefix: str = "") -> None:
    """Load a safetensors file into ``module`` with exact key and shape checking.

    Args:
        module: a plain (unsharded) module.
        file: the ``.safetensors`` file.
        prefix: keep only file keys starting with ``prefix`` and strip it; other keys count as unexpected.

    Raises:
        StateDictMismatchError: listing missing keys, unexpected keys and shape mismatches (nothing is loaded).

    Example:
        >>> load_safetensors_into(model, "ema.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    raw = load_file(str(file), device="cpu")
    weights = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    expected = module.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys()) + sorted(k for k in raw if not k.startswith(prefix))
    mismatched = sorted(
        f"{k}: file {tuple(weights[k].shape)} vs module {tuple(expected[k].shape)}"
        for k in expected.keys() & weights.keys()
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(
            f"load_safetensors_into({type(module).__name__}, {file})",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    module.load_state_dict(weights, strict=True)
