"""Building objects from recipe nodes that carry ``_component_: dotted.path``.

A node ``{_component_: f, a: 1, b: {...}}`` becomes ``f(a=1, b=<built b>)``; children are built first, lists are
walked, plain mappings become ``dict`` s. ``_partial_: true`` returns ``functools.partial(f, ...)`` instead of
calling it (optimizer factories that receive parameters later). A callable whose ``config_arguments`` attribute names
some of its keyword arguments receives those nodes unbuilt (``ChatUMMSystem`` keeps its model spec and schedule as
configs and builds them in ``configure_model`` / ``configure_optimizers``). Runtime objects are passed at the call site:
``instantiate(cfg.system.optimizer, params)`` or ``instantiate(cfg.data, tokenizer=tok)``; call-site keyword
arguments win over the recipe's.

Example:
    >>> from omegaconf import OmegaConf
    >>> lin = instantiate(OmegaConf.create({"_component_": "torch.nn.Linear", "in_features": 2, "out_features": 3}))
    >>> tuple(lin.weight.shape)
    (3, 2)
"""

from __future__ import annotations

import functools
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from chatumm_kit.config.allowlist import AllowList, current_allow_list
from chatumm_kit.config.errors import RecipeError
from chatumm_kit.config.imports import resolve_callable

__all__ = ["instantiate", "COMPONENT_KEY", "CONFIG_ARGUMENTS", "PARTIAL_KEY", "RESERVED_KEYS"]

COMPONENT_KEY = "_component_"
PARTIAL_KEY = "_partial_"
RESERVED_KEYS = frozenset({COMPONENT_KEY, PARTIAL_KEY})
# A callable's attribute naming keyword arguments it takes as recipe nodes (plain dicts, ``_component_`` kept) and
# builds itself later — a system storing its model spec so a checkpoint can rebuild the model (ARCHITECTURE.md).
CONFIG_ARGUMENTS = "config_arguments"


def _to_plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _build(node: Any, path: str, allow: AllowList) -> Any:
    if isinstance(node, dict):
        if COMPONENT_KEY in node:
            return _call(node, path, allow, (), {})
        return {k: _build(v, f"{path}.{k}" if path else str(k), allow) for k, v in node.items()}
    if isinstance(node, list):
        return [_build(v, f"{path}[{i}]", allow) for i, v in enumerate(node)]
    return node


def _call(node: dict, path: str, allow: AllowList, args: tuple, kwargs: dict) -> Any:
    where = path or "<root>"
    fn = resolve_callable(node[COMPONENT_KEY], allow=allow, where=where)
    kept = getattr(fn, CONFIG_ARGUMENTS, ())
    built = {
        k: v if k in kept else _build(v, f"{path}.{k}" if path else str(k), allow)
        for k, v in node.items()
        if k not in RESERVED_KEYS
    }
    built.update(kwargs)
    if node.get(PARTIAL_KEY, False):
        return functools.partial(fn, *args, **built)
    try:
        return fn(*args, **built)
    except RecipeError:
        raise
    except (TypeError, ValueError) as e:
        # Wrong or missing arguments, or values the callable refuses: say which node and which callable.
        raise RecipeError(f"{where}: building {node[COMPONENT_KEY]} failed: {e}") from e


def instantiate(node: Any, *args: Any, allow: AllowList | None = None, path: str = "", **kwargs: Any) -> Any:
    """Build ``node`` (a DictConfig/dict with ``_component_``, a list, or a plain value) recursively.

    Args:
        node: the recipe node.
        *args: positional runtime objects for the top-level callable.
        allow: what ``_component_`` may name (default: the list in force, :func:`current_allow_list`).
        path: the node's YAML path in its recipe (``"model"``), used in error messages.
        **kwargs: runtime keyword arguments for the top-level callable; they override the recipe's.
    """
    allow = allow or current_allow_list()
    plain = _to_plain(node)
    if isinstance(plain, dict) and COMPONENT_KEY in plain:
        return _call(plain, path, allow, args, kwargs)
    if args or kwargs:
        raise RecipeError(f"{path or '<root>'}: runtime arguments given but the node has no _component_")
    return _build(plain, path, allow)
