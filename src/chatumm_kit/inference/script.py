"""Script-driven chats: a JSON-lines dialogue script in, one record per assistant reply out (CLI and eval glue).

Each script line is an object:

* ``{"user": "text", "images": ["a.png", ...]}`` — a user turn (images first, then the text; either may be
  absent), followed by an assistant reply;
* optional ``"respond": {...}`` on that line — keyword overrides of :meth:`ChatSession.respond` for this reply
  (``max_new_tokens``, ``temperature``, ``top_p``, ``max_segments``, ``mode``, ``image_size``);
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

from torchvision.io import write_png

from chatumm_kit.data.dialogue import Role
from chatumm_kit.data.image_decode import ImageDecodeError, load_rgb
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.session import ChatSession, check_reply_options

__all__ = ["read_script", "run_script", "play_line"]

_RESPOND_KEYS = {"max_new_tokens", "temperature", "top_p", "max_segments", "mode", "image_size"}
_LINE_KEYS = {"user", "images", "respond", "rollback"}


def read_script(path: str | Path) -> list[dict[str, Any]]:
    """Parse a JSON-lines script (blank lines and ``#`` comments skipped); errors (``ValueError``) name the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"no such script file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read script {path}: {e}") from None
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
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


def _check_line(n: int, line: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming line ``n`` when its keys or value types are wrong (before the session changes)."""
    at = f"script line {n}"
    if not isinstance(line, Mapping):
        raise ValueError(f"{at}: must be a JSON object, got {type(line).__name__}")
    unknown = set(line) - _LINE_KEYS
    if unknown:
        raise ValueError(f"{at}: unknown keys {sorted(unknown)} (known: {sorted(_LINE_KEYS)})")
    if "rollback" in line:
        k = line["rollback"]
        if set(line) != {"rollback"} or isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(
                f"{at}: 'rollback' takes a turn index (an integer) and nothing else on its line, got {k!r}"
            )
        return
    text, paths = line.get("user"), line.get("images", [])
    if text is not None and (not isinstance(text, str) or not text):
        raise ValueError(f"{at}: 'user' must be a non-empty string, got {text!r}")
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"{at}: 'images' must be a list of file paths, got {paths!r}")
    if text is None and not paths:
        raise ValueError(f"{at}: needs 'user' text, 'images' or 'rollback'")
    options = line.get("respond", {})
    if not isinstance(options, Mapping):
        raise ValueError(f"{at}: 'respond' must be an object of options, got {options!r}")
    if set(options) - _RESPOND_KEYS:
        raise ValueError(f"{at}: unknown respond options {sorted(set(options) - _RESPOND_KEYS)}")
    defaults = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "max_segments": 4}
    try:
        check_reply_options(**{**defaults, **options})
    except ValueError as e:
        raise ValueError(f"{at}: {e}") from None


def play_line(
    session: ChatSession,
    n: int,
    line: Mapping[str, Any],
    *,
    image_dir: str | Path,
    sampler: SamplerConfig | None = None,
    base_dir: str | Path = ".",
    mode: str = "auto",
    respond_defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Play script line ``n``: its record (a reply), or ``None`` for a rollback. ``mode`` is the task mode of a
    line whose ``respond`` options give none; ``respond_defaults`` the other ``respond`` options it does not give
    (``max_new_tokens``, ``temperature``, ``top_p``, ``max_segments``: the chat command's flags).

    Raises:
        ValueError: a mistake in the line (keys, types, an image that is not there or not an image, a rollback
            outside the dialogue, respond options out of range), named by line; the session is left as it was.
    """
    _check_line(n, line)
    if "rollback" in line:
        try:
            session.rollback(line["rollback"])
        except (IndexError, ValueError) as e:
            raise ValueError(f"script line {n}: {e}") from None
        return None
    text, paths = line.get("user"), line.get("images", [])
    try:
        images = [load_rgb(Path(base_dir) / p) for p in paths]
    except ImageDecodeError as e:
        raise ValueError(f"script line {n}: {e}") from None
    options = {"mode": mode, **dict(respond_defaults or {}), **dict(line.get("respond") or {})}
    first = session.num_turns
    prompt = session.think_prompt(options["mode"])
    if prompt is not None and (first == 0 or session.dialogue.turns[-1].role is not Role.USER):
        session.add_system(prompt)  # the think prompt before the user turn: prefilled once (SPEC §4.1)
    session.add_user(text, images=images)
    try:
        if options.get("image_size") is not None:
            options["image_size"] = tuple(options["image_size"])
        reply = session.respond(sampler=sampler, **options)
    except Exception as e:  # whatever went wrong, the session goes back to before this line
        session.rollback(first)
        raise ValueError(f"script line {n}: the reply failed: {type(e).__name__}: {e}") from None
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, image in enumerate(reply.images):
        target = image_dir / f"turn{reply.turn_index}_{i}.png"
        write_png(image.contiguous(), str(target))
        written.append(str(target))
    return {
        "line": n,
        "turn": reply.turn_index,
        "user": text,
        "text": reply.text,
        "think": reply.think,
        "images": written,
        "intents": reply.intents,
        "finished": reply.finished,
    }


def run_script(
    session: ChatSession,
    lines: Iterable[Mapping[str, Any]],
    *,
    image_dir: str | Path,
    sampler: SamplerConfig | None = None,
    base_dir: str | Path = ".",
) -> list[dict[str, Any]]:
    """Play ``lines`` into ``session``; returns one record per reply (stops at the first bad line).

    Args:
        session: the chat (may already hold history).
        lines: script lines (see module docstring).
        image_dir: where generated images are written.
        sampler: image sampler settings for every reply.
        base_dir: folder that relative image paths in the script are resolved against.

    Returns:
        Per reply: ``{"line", "turn", "user", "text", "think" (the reasoning of a think mode, else ``""``),
        "images" (written paths), "intents", "finished"}``.

    Raises:
        ValueError: naming the first bad line (:func:`play_line`); ``chatumm chat --script`` reports it and goes on.
    """
    records = []
    for n, line in enumerate(lines):
        record = play_line(session, n, line, image_dir=image_dir, sampler=sampler, base_dir=base_dir)
        if record is not None:
            records.append(record)
    return records
