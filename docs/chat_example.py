"""Play the README's example chat against a checkpoint: print the transcript and write the images as one PNG strip.

    python docs/chat_example.py runs/shapes/chat_tiny_long/checkpoints/last.ckpt --out docs/chat_example.png

Each user turn is added to one :class:`~chatumm_kit.inference.ChatSession`, which keeps its KV caches across the
turns; the model chooses each reply's modality. Images are sampled with 25 Euler steps, seed 0, three-context CFG
(the sampler's defaults otherwise) and drawn 4× enlarged, in order, in the strip.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from chatumm_kit.data.shapes import WorldConfig
from chatumm_kit.inference import ChatSession, SamplerConfig, SessionConfig
from chatumm_kit.training.loading import load_checkpoint

USER_TURNS: tuple[str, ...] = (
    "Could you draw a large red circle in the center?",
    "Now draw a small blue square in the top left.",
    "What is 9 times 8?",
    "In the picture with the red circle, what colour is the circle?",
    "Take the picture with the red circle and make the circle green.",
)


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--out", default="docs/chat_example.png", help="where the strip of generated images goes")
    parser.add_argument("--steps", type=int, default=25, help="Euler steps per image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    loaded = load_checkpoint(args.checkpoint)
    world = WorldConfig(image_size=32)  # the ShapesChat world of recipes/shapes/*.yaml
    config = SessionConfig.for_model(loaded.model, image_size=world.image_size)
    session = ChatSession(model=loaded.model, tokenizer=loaded.tokenizer, config=config)
    lines: list[str] = []
    images: list[torch.Tensor] = []
    for text in USER_TURNS:
        session.add_user(text=text)
        reply = session.respond(sampler=SamplerConfig(num_steps=args.steps, seed=args.seed))
        shown = []
        for image in reply.images:
            images.append(image)
            shown.append(f"[image {len(images)}]")
        if reply.text:
            shown.append(reply.text)
        lines += [f"user:      {text}", f"assistant: {' '.join(shown)}"]
    print("\n".join(lines))
    if images:
        big = [F.interpolate(im[None].float() / 255, scale_factor=4, mode="nearest")[0] for im in images]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(big, nrow=len(big), padding=4, pad_value=0.5), out)
        print(f"{len(images)} image(s) → {out}")
    return lines


if __name__ == "__main__":
    main()
