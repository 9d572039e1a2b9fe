"""Which checkpoint a run resumes from, and whether a checkpoint can be read at all.

``resume_from`` in a training recipe (or on the command line) is one of:

* ``null`` — a fresh run;
* ``last`` — the newest *readable* checkpoint in the run's checkpoint folder (``last.ckpt`` first). When the newest
  one is damaged (truncated, flipped bytes, zero bytes, not a checkpoint at all), one line names it and the one the
  run resumes from instead. With no checkpoint to resume from it is an error: a resume that silently starts over
  would train from scratch into the same folder;
* ``last_or_fresh`` — like ``last``, but a fresh run when there is no checkpoint yet (for recipes that are launched
  and relaunched alike, e.g. on a preemptible cluster);
* a checkpoint path — a ``*.ckpt`` file or a sharded (DCP) checkpoint folder, checked before training starts; a
  damaged one is refused with the newest readable checkpoint beside it named;
* a folder of checkpoints — its newest readable checkpoint, as for ``last``.

Readability is checked the way the kit reads checkpoints: ``torch.load(weights_only=True)`` (nothing but tensors and
plain values is unpickled). Messages never suggest loading with ``weights_only=False``.

Example:
    >>> resolve_resume("last_or_fresh", Path("runs/new/checkpoints"))  # doctest: +SKIP
    resume_from=last_or_fresh: no checkpoint in runs/new/checkpoints yet; starting fresh
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from chatumm_kit.config import RecipeError

__all__ = [
    "LAST",
    "LAST_OR_FRESH",
    "checkpoint_problem",
    "describe_load_error",
    "find_checkpoints",
    "resolve_resume",
    "unreadable_message",
]

LAST = "last"
LAST_OR_FRESH = "last_or_fresh"
_META_FILE = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the DCP shards


def describe_load_error(err: BaseException) -> str:
    """What went wrong reading a checkpoint, in a few words — never torch's advice to unpickle arbitrary objects."""
    text = str(err).strip()
    first = text.splitlines()[0].split(". ")[0][:120] if text else type(err).__name__
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in text:
        return "holds objects that safe loading (weights_only=True) refuses, or its pickled part is damaged"
    if isinstance(err, (zipfile.BadZipFile, EOFError)) or any(
        m in text for m in ("central directory", "zip archive", "mmap can only be used", "_use_new_zipfile")
    ):
        return f"truncated, or not a torch checkpoint ({first})"
    return f"damaged ({type(err).__name__}: {first})"


def unreadable_message(path: str | Path, problem: str) -> str:
    """One line: ``path`` cannot be read because of ``problem``, and the newest readable checkpoint beside it."""
    path = Path(path)
    beside, _ = _newest_readable([p for p in find_checkpoints(path.parent) if p.resolve() != path.resolve()])
    hint = f"; the newest readable checkpoint beside it is {beside}" if beside else ""
    return f"checkpoint {str(path)!r} is unreadable ({problem}){hint}"


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be resumed from or loaded, in a few words; ``None`` when it reads as a Lightning checkpoint.

    Reads the file (or a DCP folder's ``meta.pt``) with ``torch.load(weights_only=True, mmap=True)``: tensors are
    mapped, not copied, so this costs little even for a large checkpoint.
    """
    path = Path(path)
    target = path
    if path.is_dir():
        if not (path / ".metadata").is_file():
            return "a folder that is not a sharded checkpoint (no .metadata)"
        target = path / _META_FILE
        if not target.is_file():
            return f"a sharded checkpoint folder without {_META_FILE}"
    elif not path.exists():
        return "does not exist"
    size = target.stat().st_size
    if size == 0:
        return "zero bytes"
    try:
        ckpt = torch.load(target, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # bad zip, unpickling errors, truncated storages: bad data is data
        return describe_load_error(err)
    if not isinstance(ckpt, Mapping):
        return f"not a Lightning checkpoint (a {type(ckpt).__name__})"
    if path.is_file() and "state_dict" not in ckpt:
        return "not a Lightning checkpoint (no 'state_dict')"
    return None


def find_checkpoints(directory: Path) -> list[Path]:
    """The checkpoints in ``directory`` (files or DCP folders named ``*.ckpt``), ``last*.ckpt`` first, then newest
    first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("*.ckpt") if p.is_file() or p.is_dir()]
    return sorted(found, key=lambda p: (not p.name.startswith("last"), -p.stat().st_mtime, p.name))


def _newest_readable(candidates: list[Path]) -> tuple[Path | None, list[tuple[Path, str]]]:
    damaged: list[tuple[Path, str]] = []
    for p in candidates:
        problem = checkpoint_problem(p)
        if problem is None:
            return p, damaged
        damaged.append((p, problem))
    return None, damaged


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _from_folder(folder: Path, *, key: str, fresh_ok: bool) -> str | None:
    candidates = find_checkpoints(folder)
    if not candidates:
        if fresh_ok:
            print(f"resume_from={key}: no checkpoint in {folder} yet; starting fresh")
            return None
        raise RecipeError(
            f"resume_from={key}: no checkpoint in {folder} to resume from; use resume_from={LAST_OR_FRESH} to start "
            "fresh when there is none, or resume_from=null"
        )
    chosen, damaged = _newest_readable(candidates)
    if chosen is None:
        listed = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise RecipeError(f"resume_from={key}: no readable checkpoint in {folder} ({listed})")
    if damaged:
        bad, why = damaged[0]
        others = f" (and {len(damaged) - 1} more unreadable)" if len(damaged) > 1 else ""
        _warn(f"{bad} is unreadable ({why}){others}; resuming from {chosen}, the newest readable checkpoint")
    return str(chosen)


def resolve_resume(value: Any, checkpoint_dir: Path) -> str | None:
    """The checkpoint to resume from, or ``None`` for a fresh run (see the module docstring for the values).

    Raises:
        RecipeError: one line — nothing to resume from (``last``), a damaged or missing checkpoint (the newest
            readable one beside it named), a folder without a readable checkpoint.
    """
    if value in (None, "", False):
        return None
    text = str(value)
    if text in (LAST, LAST_OR_FRESH):
        return _from_folder(checkpoint_dir, key=text, fresh_ok=text == LAST_OR_FRESH)
    path = Path(text)
    if path.is_dir() and not (path / ".metadata").is_file():
        return _from_folder(path, key=text, fresh_ok=False)
    problem = checkpoint_problem(path)
    if problem is None:
        return str(path)
    raise RecipeError(f"resume_from: {unreadable_message(path, problem)}")
