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
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from torchvision.io import ImageReadMode, read_image, write_png

from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.script import read_script, run_script
from chatumm_kit.inference.session import ChatSession

__all__ = ["interactive", "play_script"]


def interactive(
    session: ChatSession, *, sampler: SamplerConfig, out: Path, lines: Iterable[str], write: TextIO, respond_kwargs
) -> None:
    """The terminal loop over ``lines`` (stdin in the CLI; a list in tests)."""
    pending: list = []
    out.mkdir(parents=True, exist_ok=True)
    write.write("chat: type a message; /image PATH, /rollback N, /save DIR, /quit\n")
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line.startswith("/image "):
            path = Path(line[len("/image ") :].strip())
            if not path.is_file():
                write.write(f"error: no such image: {path}\n")
                continue
            pending.append(read_image(str(path), mode=ImageReadMode.RGB))
            write.write(f"attached {path}\n")
            continue
        if line.startswith("/rollback "):
            try:
                session.rollback(int(line.split()[1]))
                write.write(f"rolled back to before turn {line.split()[1]}\n")
            except (ValueError, IndexError) as e:
                write.write(f"error: {e}\n")
            continue
        if line.startswith("/save "):
            write.write(f"saved to {session.save(line.split(maxsplit=1)[1])}\n")
            continue
        session.add_user(text=line, images=pending)
        pending = []
        reply = session.respond(sampler=sampler, **respond_kwargs)
        if reply.text:
            write.write(f"assistant: {reply.text}\n")
        for i, img in enumerate(reply.images):
            path = out / f"turn{reply.turn_index}_{i}.png"
            write_png(img, str(path))
            write.write(f"assistant image: {path}\n")
        write.flush()


def play_script(session: ChatSession, script: str | Path, *, out: Path, sampler: SamplerConfig) -> Path:
    """Play a JSON-lines dialogue script (:mod:`chatumm_kit.inference.script`) through ``session``; write the images
    and ``replies.jsonl`` into ``out``, print one line per reply, return the ``replies.jsonl`` path.

    Raises ``ValueError`` naming the script line at fault.
    """
    records = run_script(session, read_script(script), image_dir=out, sampler=sampler, base_dir=Path(script).parent)
    out.mkdir(parents=True, exist_ok=True)
    replies = out / "replies.jsonl"
    with open(replies, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
            print(f"turn {rec['turn']}: {rec['text']!r} {rec['images']}")
    return replies
