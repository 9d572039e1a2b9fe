"""Resolving ``_component_`` dotted paths, limited to the recipe allow-list (a recipe is not a way to run code).

The decision is made on the text, before anything is imported: the path must be on the
:class:`~chatumm_kit.config.allowlist.AllowList` in force, with no private part (``_name``). Then the path is
imported as its longest importable module prefix followed by attribute look-ups; a name admitted through a
user-given root must resolve to an object defined under such a root too (``mylab.os.system`` is refused).

Example:
    >>> resolve_callable("torch.nn.Linear")
    <class 'torch.nn.modules.linear.Linear'>
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from chatumm_kit.config.allowlist import AllowList, current_allow_list
from chatumm_kit.config.errors import RecipeError

__all__ = ["resolve_callable", "check_allowed"]


def check_allowed(dotted: Any, *, allow: AllowList | None = None, where: str = "_component_") -> str:
    """Raise :class:`RecipeError` naming ``where`` unless ``dotted`` may be built; return it."""
    allow = allow or current_allow_list()
    if not isinstance(dotted, str) or not dotted or dotted.strip() != dotted:
        raise RecipeError(f"{where}: _component_ must be a dotted path string, got {dotted!r}")
    if any(not p or p.startswith("_") for p in dotted.split(".")):
        raise RecipeError(f"{where}: {dotted!r} names a private or empty attribute; only public callables can be built")
    if not allow.admits(dotted):
        hint = allow.near_miss(dotted)
        raise RecipeError(
            f"{where}: {dotted!r} is not on the recipe allow-list"
            + (f" (did you mean {hint}?)" if hint and hint != dotted else "")
            + f"; if you trust it, run chatumm --allow {dotted} ... (README: Recipes cannot run code)"
        )
    return dotted


def resolve_callable(dotted: str, *, allow: AllowList | None = None, where: str = "_component_") -> Callable[..., Any]:
    """Import the callable named by ``dotted``; raise :class:`RecipeError` naming ``where`` if refused or missing."""
    allow = allow or current_allow_list()
    check_allowed(dotted, allow=allow, where=where)
    parts = dotted.split(".")
    module = None
    split = len(parts)
    while split > 0:
        try:
            module = importlib.import_module(".".join(parts[:split]))
            break
        except ModuleNotFoundError as e:
            # Only "this prefix is not a module" moves us on; a module failing to import its own deps is real.
            if e.name is not None and not ".".join(parts[:split]).startswith(e.name):
                raise RecipeError(f"{where}: importing {'.'.join(parts[:split])!r} failed: {e}") from None
            split -= 1
    if module is None:
        raise RecipeError(f"{where}: unknown _component_ {dotted!r}: no module {parts[0]!r}")
    obj: Any = module
    for i, attr in enumerate(parts[split:], start=split):
        if not hasattr(obj, attr):
            raise RecipeError(
                f"{where}: unknown _component_ {dotted!r}: {'.'.join(parts[:i])!r} has no attribute {attr!r}"
            )
        obj = getattr(obj, attr)
        owner = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None)
        if not allow.admits_owner(dotted, owner):
            raise RecipeError(f"{where}: {dotted!r} resolves to {owner}, outside the roots allowed with --allow-root")
    if inspect.ismodule(obj) or not callable(obj):
        raise RecipeError(f"{where}: {dotted!r} is not callable")
    return obj
