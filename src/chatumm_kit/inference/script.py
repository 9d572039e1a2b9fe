"""Script-driven chats: a JSON-lines dialogue script in, one record per assistant reply out (CLI and eval glue).

Each script line is an object:

* ``{"user": "text", "images": ["a.png", ...]}`` — a user turn (images first, then the text; either may be
  absent), followed by an assistant reply;
* optional ``"respond": {...}`` on that line — keyword overrides of :meth:`ChatSession.respond` for this reply
  (``max_new_tokens``, ``temperature``, ``top_p``, ``max_segments``);
* ``{"rollback": k}`` — forget turn ``k`` and everything after it (no reply).

Generated images are written as ``<image_dir>/turn<k>_<i>.png``.

Example:
    >>> lines = [{"user": "draw a red circle"}, {"user": "make it blue", "respond": {"max_segments": 1}}]
    >>> records = run_script(session, lines, image_dir="out")                       # doctest: +SKIP
    >>> records[0]["intents"], records[0]["images"]                                 # doctest: +SKIP
    (['image', 'end'], ['out/turn1_0.png'])
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torchvision.io import ImageReadMode, read_image, write_png

from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.session import ChatSession

__all__ = ["read_script", "run_script"]

_RESPOND_KEYS = {"max_new_tokens", "temperature", "top_p", "max_segments"}
_LINE_KEYS = {"user", "images", "respond", "rollback"}


def read_script(path: str | Path) -> list[dict[str, Any]]:
    """Parse a JSON-lines script (blank lines and ``#`` comments skipped); errors name the line."""
    out = []
    for n, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: malformed JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: each line must be a JSON object, got {type(obj).__name__}")
        out.append(obj)
    return out


def run_script(
    session: ChatSession,
    lines: Iterable[Mapping[str, Any]],
    *,
    image_dir: str | Path,
    sampler: SamplerConfig | None = None,
    base_dir: str | Path = ".",
) -> list[dict[str, Any]]:
    """Play ``lines`` into ``session``; returns one record per reply.

    Args:
        session: the chat (may already hold history).
        lines: script lines (see module docstring).
        image_dir: where generated images are written.
        sampler: image sampler settings for every reply.
        base_dir: folder that relative image paths in the script are resolved against.

    Returns:
        Per reply: ``{"line", "turn", "user", "text", "images" (written paths), "intents", "finished"}``.
    """
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for n, line in enumerate(lines):
        unknown = set(line) - _LINE_KEYS
        if unknown:
            raise ValueError(f"script line {n}: unknown keys {sorted(unknown)} (known: {sorted(_LINE_KEYS)})")
        if "rollback" in line:
            session.rollback(int(line["rollback"]))
            continue
        text, paths = line.get("user"), line.get("images") or []
        if text is None and not paths:
            raise ValueError(f"script line {n}: needs 'user' text, 'images' or 'rollback'")
        options = dict(line.get("respond") or {})
        if set(options) - _RESPOND_KEYS:
            raise ValueError(f"script line {n}: unknown respond options {sorted(set(options) - _RESPOND_KEYS)}")
        images = [read_image(str(Path(base_dir) / p), mode=ImageReadMode.RGB) for p in paths]
        session.add_user(text, images=images)
        reply = session.respond(sampler=sampler, **options)
        written = []
        for i, image in enumerate(reply.images):
            target = image_dir / f"turn{reply.turn_index}_{i}.png"
            write_png(image.contiguous(), str(target))
            written.append(str(target))
        records.append(
            {
                "line": n,
                "turn": reply.turn_index,
                "user": text,
                "text": reply.text,
                "images": written,
                "intents": reply.intents,
                "finished": reply.finished,
            }
        )
    return records
