"""``chatumm chat CHECKPOINT``: a terminal chat with a trained ChatUMM, or a non-interactive scripted one.

Interactive commands (anything else is a user message):

* ``/image PATH`` — attach a picture to the next message;
* ``/rollback N`` — return to the state before turn N;
* ``/save DIR`` — save the session (dialogue JSON + images);
* ``/quit`` — leave.

Generated images are written to ``--out`` and their paths printed. ``--script FILE`` reads a JSON-lines dialogue
script instead (see :mod:`chatumm_kit.inference.script`) and writes ``replies.jsonl`` into ``--out``.

Example:
    chatumm chat runs/shapes/chat_tiny/checkpoints/last.ckpt --script dialogue.jsonl --out replies/
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from torchvision.io import ImageReadMode, read_image, write_png

from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.script import read_script, run_script
from chatumm_kit.inference.session import ChatSession, SessionConfig

__all__ = ["add_arguments", "run", "session_config_for", "interactive"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a ChatUMMSystem checkpoint (.ckpt file or sharded folder)")
    p.add_argument("--script", help="a JSON-lines dialogue script to play instead of chatting interactively")
    p.add_argument("--out", default="chat_out", help="where generated images (and replies.jsonl) go")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=(32, 32), help="generated image size")
    p.add_argument("--steps", type=int, default=50, help="Euler steps per generated image")
    p.add_argument("--cfg-text", type=float, default=4.0, help="text guidance scale")
    p.add_argument("--cfg-image", type=float, default=1.5, help="image guidance scale")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy text decoding")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if EMA weights were saved")


def session_config_for(model, *, image_size: tuple[int, int]) -> SessionConfig:
    """The stream settings a model was trained with, read off its ViT and VAE."""
    return SessionConfig(
        vit_patch_size=model.vit.patch_size,
        vae_token_stride=model.vae.downsample * model.vae.latent_patch,
        max_image_side=max(image_size),
        image_size=tuple(image_size),
    )


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


def run(args: argparse.Namespace) -> int:
    from chatumm_kit.eval.loading import load_checkpoint

    try:
        loaded = load_checkpoint(args.checkpoint, use_ema=False if args.no_ema else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    session = ChatSession(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        config=session_config_for(loaded.model, image_size=tuple(args.image_size)),
    )
    sampler = SamplerConfig(
        num_steps=args.steps, cfg_text_scale=args.cfg_text, cfg_image_scale=args.cfg_image, seed=args.seed
    )
    out = Path(args.out)
    respond_kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.script:
        try:
            lines = read_script(args.script)
            records = run_script(session, lines, image_dir=out, sampler=sampler, base_dir=Path(args.script).parent)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "replies.jsonl", "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
                print(f"turn {rec['turn']}: {rec['text']!r} {rec['images']}")
        print(f"replies: {out / 'replies.jsonl'}")
        return 0
    interactive(session, sampler=sampler, out=out, lines=sys.stdin, write=sys.stdout, respond_kwargs=respond_kwargs)
    return 0
