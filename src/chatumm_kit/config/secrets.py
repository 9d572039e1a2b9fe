"""Environment values stay out of what the kit writes and sends.

A recipe may read the environment with OmegaConf's ``${oc.env:VAR}``; the value is used where the recipe puts it,
but every file the kit writes about the run (``recipe.yaml``, the recipe and hyper-parameters inside checkpoints,
the logger's ``hparams.yaml``, ``chatumm print``) holds ``${oc.env:VAR}`` in its place, and no synthesis request may
carry it (:func:`find_env_value`). To know the values, the kit registers ``oc.env`` again as a thin wrapper around
OmegaConf's own that remembers each value it returned (:func:`env_values`), nested interpolations and defaults
included — so the rule holds however the recipe reached the variable.

Values shorter than :data:`MIN_SECRET_LENGTH` characters are not tracked: ``"1"`` or ``"yes"`` is no secret, and
replacing it everywhere would garble text.

Example:
    >>> import os; os.environ["DOC_TOKEN"] = "s3cr3t-value"
    >>> from omegaconf import DictConfig, ListConfig, OmegaConf
    >>> cfg = OmegaConf.create({"key": "Bearer ${oc.env:DOC_TOKEN}"})
    >>> cfg.key
    'Bearer s3cr3t-value'
    >>> redact({"key": cfg.key})
    {'key': 'Bearer ${oc.env:DOC_TOKEN}'}
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.resolvers import oc

__all__ = ["MIN_SECRET_LENGTH", "env_values", "redact", "restore_env", "find_env_value", "install_env_tracking"]

MIN_SECRET_LENGTH = 4

_SEEN: dict[str, str] = {}
_LOCK = threading.Lock()
_NO_DEFAULT = object()


def _tracking_env(key: str, default: Any = _NO_DEFAULT) -> str | None:
    value = oc.env(key) if default is _NO_DEFAULT else oc.env(key, default)
    if str(key) in os.environ and isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH:  # not the default
        with _LOCK:
            _SEEN[str(key)] = value
    return value


def install_env_tracking() -> None:
    """Register the remembering ``oc.env`` (idempotent; done when :mod:`chatumm_kit.config` is imported)."""
    register = getattr(OmegaConf, "register_resolver", None)  # omegaconf 2.4; register_new_resolver before
    if register is not None:
        register("oc.env", _tracking_env, replace=True, annotation_validation="off")
    else:
        OmegaConf.register_new_resolver("oc.env", _tracking_env, replace=True)


def env_values() -> dict[str, str]:
    """Variable → value for every environment value a recipe in this process has read through ``${oc.env:...}``."""
    with _LOCK:
        return dict(_SEEN)


def _redact_text(text: str, pairs: list[tuple[str, str]]) -> str:
    for var, value in pairs:
        if value in text:
            text = text.replace(value, "${oc.env:" + var + "}")
    return text


def redact(obj: Any) -> Any:
    """``obj`` with every environment value read by a recipe replaced by ``${oc.env:VAR}`` (strings inside dicts,
    lists and tuples; keys included; other objects are returned as they are)."""
    pairs = sorted(env_values().items(), key=lambda kv: -len(kv[1]))  # longest first: a value inside another
    if not pairs:
        return obj
    return _redact(obj, pairs)


def _redact(obj: Any, pairs: list[tuple[str, str]]) -> Any:
    if isinstance(obj, (DictConfig, ListConfig)):
        obj = OmegaConf.to_container(obj, resolve=False)
    if isinstance(obj, str):
        return _redact_text(obj, pairs)
    if isinstance(obj, dict):  # a dict subclass (Lightning's AttributeDict) comes back as a plain dict
        return {_redact(k, pairs): _redact(v, pairs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v, pairs) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_redact(v, pairs) for v in obj)
    return obj


_ENV_REF = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)\}")


def restore_env(obj: Any) -> Any:
    """The inverse of :func:`redact` on this machine: each ``${oc.env:VAR}`` in strings becomes ``$VAR``'s value when
    it is set (hyper-parameters read back from a checkpoint, e.g. a tokenizer path under ``${oc.env:DATA}``)."""
    if isinstance(obj, str):
        return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(0)), obj)
    if isinstance(obj, dict):
        return {k: restore_env(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(restore_env(v) for v in obj)
    return obj


def find_env_value(text: str) -> str | None:
    """The name of an environment variable a recipe read whose value occurs in ``text``, or None."""
    for var, value in env_values().items():
        if value in text:
            return var
    return None
