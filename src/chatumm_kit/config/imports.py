"""Resolving ``_component_`` dotted paths, limited to allowed import roots (a recipe is not a way to run code).

A dotted path is imported as the longest importable module prefix followed by attribute look-ups. The root package
must be allowed, no part may be private (``_name``), the object reached must itself live under an allowed root (so
``torch.os.system`` — ``os`` re-exported by ``torch`` — is refused), and a short deny-list blocks the few callables
inside allowed roots that load pickles or compile code.

Example:
    >>> resolve_callable("torch.nn.Linear")
    <class 'torch.nn.modules.linear.Linear'>
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from chatumm_kit.config.errors import RecipeError

__all__ = ["DEFAULT_ALLOWED_ROOTS", "DENIED_PREFIXES", "resolve_callable"]

DEFAULT_ALLOWED_ROOTS: frozenset[str] = frozenset(
    {"chatumm_kit", "torch", "lightning", "timm", "diffusers", "torchvision", "webdataset"}
)

# Callables inside allowed roots that would let a YAML file unpickle, download or compile arbitrary code.
DENIED_PREFIXES: tuple[str, ...] = (
    "torch.load",
    "torch.hub",
    "torch.jit.load",
    "torch.package",
    "torch.utils.cpp_extension",
    "torch.compiler",
    "torch.serialization",
    "torch.ops.load_library",
    "torch.classes.load_library",
    "torch.utils.data.datapipes",
    "lightning.fabric.utilities.cloud_io",
)


def _root(name: str) -> str:
    return name.split(".", 1)[0]


def _is_denied(dotted: str) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in DENIED_PREFIXES)


def resolve_callable(
    dotted: str, *, allowed_roots: Iterable[str] = DEFAULT_ALLOWED_ROOTS, where: str = "_component_"
) -> Callable[..., Any]:
    """Import the callable named by ``dotted``; raise :class:`RecipeError` naming ``where`` if refused or missing."""
    allowed = frozenset(allowed_roots)
    if not isinstance(dotted, str) or not dotted or dotted.strip() != dotted:
        raise RecipeError(f"{where}: _component_ must be a dotted path string, got {dotted!r}")
    parts = dotted.split(".")
    if _root(dotted) not in allowed:
        raise RecipeError(
            f"{where}: {dotted!r} is outside the allowed import roots ({', '.join(sorted(allowed))}); "
            "add a root explicitly (chatumm --allow-root NAME) if you trust it"
        )
    if any(not p or p.startswith("_") for p in parts):
        raise RecipeError(f"{where}: {dotted!r} names a private or empty attribute; only public callables can be built")
    if _is_denied(dotted):
        raise RecipeError(f"{where}: {dotted!r} is denied in recipes (it can load pickles or compile code)")

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
        if owner is not None and (
            _root(owner) not in allowed or _is_denied(f"{owner}.{getattr(obj, '__qualname__', '')}")
        ):
            raise RecipeError(f"{where}: {dotted!r} resolves to {owner}, outside the allowed import roots")
    if inspect.ismodule(obj) or not callable(obj):
        raise RecipeError(f"{where}: {dotted!r} is not callable")
    return obj
