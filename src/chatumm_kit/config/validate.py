"""Checking a recipe without building anything.

Every node with ``_component_`` is resolved (allow-list included) and its keys are bound to the callable's
signature; values whose type is plainly wrong for an annotated parameter (a string for an ``int``, a list for a
``float``) are reported. A callable with a ``check_recipe_arguments(kwargs) -> list[str]`` attribute adds its own
problems (each ``"key: message"``), for arguments whose shape a signature cannot express. Arguments a node leaves out are fine: they may be supplied at the call site.

Example:
    >>> from omegaconf import OmegaConf
    >>> validate_recipe(OmegaConf.create({"lin": {"_component_": "torch.nn.Linear", "in_feature": 2}}))
    Traceback (most recent call last):
    ...
    chatumm_kit.config.errors.RecipeError: lin.in_feature: unexpected keyword argument 'in_feature' for torch.nn.Linear
"""

from __future__ import annotations

import inspect
import types
import typing
from collections import abc
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from chatumm_kit.config.allowlist import AllowList, current_allow_list
from chatumm_kit.config.errors import RecipeError
from chatumm_kit.config.imports import resolve_callable
from chatumm_kit.config.instantiate import COMPONENT_KEY, PARTIAL_KEY, RESERVED_KEYS

__all__ = ["validate_recipe", "check_type"]

_NO_CHECK = object()


def _signature_target(fn: Any) -> Any:
    return fn.__init__ if inspect.isclass(fn) else fn


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(_signature_target(fn))
    except Exception:  # unresolvable forward references: skip type checks, keep the signature check
        return {}


def _component_type(value: Any, allow: AllowList) -> Any:
    if isinstance(value, dict) and COMPONENT_KEY in value and not value.get(PARTIAL_KEY):
        try:
            fn = resolve_callable(value[COMPONENT_KEY], allow=allow)
        except RecipeError:
            return _NO_CHECK
        return fn if inspect.isclass(fn) else _NO_CHECK
    return None


def check_type(value: Any, annotation: Any, *, built_class: Any = None) -> bool:
    """Whether a YAML value fits ``annotation``; unknown or complex annotations are accepted (no false alarms).

    ``built_class`` is the class a ``_component_`` node will build, checked with ``issubclass``.
    """
    if annotation is inspect.Parameter.empty or annotation is Any or built_class is _NO_CHECK:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(check_type(value, a, built_class=built_class) for a in args)
    if origin is typing.Literal:
        return value in args
    if built_class is not None:
        target = origin or annotation
        return not inspect.isclass(target) or issubclass(built_class, target) or target in (dict, list)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is Path:
        return isinstance(value, (str, Path))
    container = origin or annotation
    if container in (list, tuple, abc.Sequence, abc.MutableSequence):
        if not isinstance(value, (list, tuple)):
            return False
        if container is not tuple and len(args) == 1:
            return all(check_type(v, args[0]) for v in value if not isinstance(v, dict))
        return True
    if container in (dict, abc.Mapping, abc.MutableMapping):
        return isinstance(value, dict)
    return True


def _describe(v: Any) -> str:
    return f"{type(v).__name__} {v!r}" if not isinstance(v, (dict, list)) else type(v).__name__


def _check_node(node: dict, path: str, allow: AllowList, problems: list[str]) -> None:
    where = path or "<root>"
    try:
        fn = resolve_callable(node[COMPONENT_KEY], allow=allow, where=f"{path}._component_" if path else COMPONENT_KEY)
    except RecipeError as e:
        problems.extend(e.problems)
        return
    name = node[COMPONENT_KEY]
    kwargs = {k: v for k, v in node.items() if k not in RESERVED_KEYS}
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to bind
    params = sig.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        p = params.get(key)
        if (p is None and not takes_kwargs) or (p is not None and p.kind is inspect.Parameter.POSITIONAL_ONLY):
            known = [n for n, q in params.items() if q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD) and n != "self"]
            problems.append(
                f"{where}.{key}: unexpected keyword argument {key!r} for {name}"
                + (f" (accepted: {', '.join(known)})" if known else "")
            )
    # A callable may check what its signature cannot express (e.g. a model spec held as a plain mapping).
    hook = getattr(fn, "check_recipe_arguments", None)
    if callable(hook):
        problems.extend(f"{where}.{msg}" for msg in hook(kwargs))
    hints = _hints(fn)
    for key, value in kwargs.items():
        if key in params and key in hints:
            built = _component_type(value, allow)
            if not check_type(value, hints[key], built_class=built):
                problems.append(f"{where}.{key}: expected {_fmt(hints[key])} for {name}, got {_describe(value)}")


def _fmt(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _walk(node: Any, path: str, allow: AllowList, problems: list[str]) -> None:
    if isinstance(node, dict):
        if COMPONENT_KEY in node:
            _check_node(node, path, allow, problems)
        for k, v in node.items():
            if k not in RESERVED_KEYS:
                _walk(v, f"{path}.{k}" if path else str(k), allow, problems)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _walk(v, f"{path}[{i}]", allow, problems)


def validate_recipe(cfg: DictConfig | dict, *, allow: AllowList | None = None) -> None:
    """Raise :class:`RecipeError` listing every problem found (one line each, YAML path first)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    problems: list[str] = []
    _walk(plain, "", allow or current_allow_list(), problems)
    if problems:
        raise RecipeError(problems)
