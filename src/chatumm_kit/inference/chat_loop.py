"""The chat loops behind ``chatumm chat``: a terminal chat over a built :class:`ChatSession`, or a scripted one.

Loading the checkpoint is the command's part (:mod:`chatumm_kit.cli`); these take a session already built.

Interactive commands (anything else is a user message):

* ``/image PATH`` — attach a picture to the next message;
* ``/rollback N`` — return to the state before turn N;
* ``/save DIR`` — save the session (dialogue JSON + images);
* ``/quit`` — leave.

Generated images are written to ``out`` and their paths printed. :func:`play_script` reads a JSON-lines dialogue
script instead (see :mod:`chatumm_kit.inference.script`) and writes ``replies.jsonl`` into ``out``.

Example:
    >>> session = ChatSession(model=model, tokenizer=tok, config=SessionConfig.for_model(model, image_size=32))
    >>> play_script(session, "dialogue.jsonl", out=Path("replies"), sampler=SamplerConfig())   # doctest: +SKIP
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from torchvision.io import write_png

from chatumm_kit.data.dialogue import Role
from chatumm_kit.data.image_decode import ImageDecodeError, load_rgb
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.script import play_line, read_script
from chatumm_kit.inference.session import ChatSession
from chatumm_kit.inference.think import split_think

__all__ = ["interactive", "play_script"]


def _command(line: str, name: str) -> str | None:
    """The argument of ``/name ARG`` (``""`` for a bare ``/name``), or ``None`` when ``line`` is another thing."""
    if line == name:
        return ""
    return line[len(name) + 1 :].strip() if line.startswith(name + " ") else None


def interactive(
    session: ChatSession, *, sampler: SamplerConfig, out: Path, lines: Iterable[str], write: TextIO, respond_kwargs
) -> None:
    """The terminal loop over ``lines`` (stdin in the CLI; a list in tests).

    Every mistake — a missing or non-image file, a bad turn number, a folder that cannot be written, a reply that
    fails — is one ``error:`` line, and the session goes on as it was.
    """
    pending: list = []
    out.mkdir(parents=True, exist_ok=True)
    write.write("chat: type a message; /image PATH, /rollback N, /save DIR, /quit\n")
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if (arg := _command(line, "/image")) is not None:
            try:
                pending.append(load_rgb(arg))
                write.write(f"attached {arg}\n")
            except ImageDecodeError as e:
                write.write(f"error: {e}\n")
            continue
        if (arg := _command(line, "/rollback")) is not None:
            try:
                session.rollback(int(arg))
                write.write(f"rolled back to before turn {arg}\n")
            except (ValueError, IndexError) as e:
                write.write(f"error: /rollback N takes a turn number in [0, {session.num_turns}): {e}\n")
            continue
        if (arg := _command(line, "/save")) is not None:
            try:
                if not arg:
                    raise ValueError("/save takes a folder")
                write.write(f"saved to {session.save(arg)}\n")
            except (OSError, ValueError) as e:
                write.write(f"error: cannot save to {arg!r}: {getattr(e, 'strerror', None) or e}\n")
            continue
        if line.startswith("/"):
            write.write(f"error: unknown command {line.split()[0]!r} (/image PATH, /rollback N, /save DIR, /quit)\n")
            continue
        turn = session.num_turns
        prompt = session.think_prompt(respond_kwargs.get("mode", "auto"))
        if prompt is not None and (turn == 0 or session.dialogue.turns[-1].role is not Role.USER):
            session.add_system(prompt)  # the think prompt before the message: prefilled once (SPEC §4.1)
        session.add_user(text=line, images=pending)
        pending = []
        try:
            reply = session.respond(sampler=sampler, **respond_kwargs)
        except Exception as e:  # the session goes back to before this message and the chat goes on
            session.rollback(turn)
            write.write(f"error: the reply failed: {type(e).__name__}: {e}\n")
            continue
        answer = split_think(reply.text)[1]  # a think_text reply: its answer after the reasoning
        if reply.think:
            write.write(f"assistant (think): {reply.think}\n")
        if answer:
            write.write(f"assistant: {answer}\n")
        for i, img in enumerate(reply.images):
            path = out / f"turn{reply.turn_index}_{i}.png"
            write_png(img, str(path))
            write.write(f"assistant image: {path}\n")
        write.flush()


def play_script(
    session: ChatSession,
    script: str | Path,
    *,
    out: Path,
    sampler: SamplerConfig,
    errors: TextIO | None = None,
    mode: str = "auto",
    respond_defaults: Mapping[str, Any] | None = None,
) -> tuple[Path, int]:
    """Play a JSON-lines dialogue script (:mod:`chatumm_kit.inference.script`) through ``session``.

    Each reply is appended to ``out/replies.jsonl`` (and its images written) as soon as it is made, so a failure on
    line 3 keeps the replies of lines 1–2. A bad line is one ``error:`` line on ``errors`` (stderr by default) and
    the script goes on with the next. ``mode`` is the task mode of every reply whose line names none, and
    ``respond_defaults`` its other ``respond`` options (:func:`~.script.play_line`). Returns ``(replies.jsonl path,
    number of bad lines)``.

    Raises:
        ValueError: the script itself cannot be read (missing file, a line that is not a JSON object).
    """
    errors = errors if errors is not None else sys.stderr
    lines = read_script(script)
    out.mkdir(parents=True, exist_ok=True)
    replies = out / "replies.jsonl"
    failed = 0
    with open(replies, "w", encoding="utf-8") as f:
        for n, line in enumerate(lines):
            try:
                rec = play_line(
                    session,
                    n,
                    line,
                    image_dir=out,
                    sampler=sampler,
                    base_dir=Path(script).parent,
                    mode=mode,
                    respond_defaults=respond_defaults,
                )
            except ValueError as e:
                failed += 1
                errors.write(f"error: {script}: {e}\n")
                continue
            if rec is None:
                continue
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(f"turn {rec['turn']}: {rec['text']!r} {rec['images']}")
    return replies, failed
