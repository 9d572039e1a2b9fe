"""The keyword signature of a dataclass, for a callable that takes its fields as ``**kwargs``.

Lets one dataclass be the single definition of a set of arguments (``MoTConfig`` for ``MoTBackbone``, ``FSDP2Plan``
for ``fsdp2``) while the callable still shows them by name to ``chatumm validate``, ``help()`` and Lightning.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Sizes:
    ...     width: int
    ...     depth: int = 2
    >>> str(keyword_signature(Sizes))
    '(*, width: int, depth: int = 2) -> None'
"""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields

__all__ = ["keyword_signature"]


def keyword_signature(config_cls: type, *extra: inspect.Parameter) -> inspect.Signature:
    """``(*, field=default, ..., *extra)``: the dataclass's fields as keyword-only parameters, then ``extra``."""
    params = []
    for f in fields(config_cls):
        if not f.init:
            continue
        default = f.default if f.default is not MISSING else inspect.Parameter.empty
        if f.default_factory is not MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=f.type))
    return inspect.Signature([*params, *extra], return_annotation=None)
