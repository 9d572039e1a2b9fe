"""`chatumm chat` on a BAGEL-7B-shaped random model in bf16: a text-to-image, an edit and a VQA turn (issue 14).

A BAGEL-7B-MoT-shaped ChatUMM (the architecture of ``bench_bagel_step.bagel_7b_spec``, cut to ``--layers`` decoder
and ViT layers, random weights) is written as a kit folder (what ``chatumm convert bagel-to-kit`` writes, recorded
as BAGEL's released weights: uploads enter as the ViT view only), then the chat command plays a three-line script
on it — ``--mode``-forced per line as BAGEL's inferencer is driven: text-to-image (``image``, ``bagel_t2i``
settings), an edit of an uploaded photo (``edit``: the photo re-enters as VAE + ViT; output at its VAE view's size)
and a question about it (``text``) — with ``--device``/``--dtype``, BAGEL's view sizing and ``--steps`` Euler steps.

Every model step of a reply goes through ``ChatSession._answer``; the benchmark times each (synchronised on CUDA):
an Euler step is one stacked forward of the image's CFG contexts (up to three) at ``1024² → 4096`` latent tokens
each; a text token one cached decoder step. Reported: the mean ms per Euler step for the T2I and the edit turn, per
text token, the load time, and each turn's intents.

``--device cpu --tiny`` runs the same path on a tiny BAGEL-shaped model (32-pixel images, fp32) so a test can smoke it.

    python benchmarks/bench_bagel_chat.py [--device cuda] [--layers 2] [--steps 10] [--json]
    python benchmarks/bench_bagel_chat.py --device cpu --tiny --steps 2 --json

Example:
    >>> result = main(["--device", "cpu", "--tiny", "--steps", "2", "--json"])   # doctest: +SKIP
    >>> result["intents"]                                                        # doctest: +SKIP
    [['image', 'end'], ['image', 'end'], ['text', 'end']]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.io import write_png

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bagel_step import bagel_7b_spec, tiny_spec  # noqa: E402  (the one BAGEL-shaped model builder)

from chatumm_kit.cli import main as chatumm  # noqa: E402
from chatumm_kit.components.tokenizer import ChatTokenizer  # noqa: E402
from chatumm_kit.convert.bagel import save_kit_folder  # noqa: E402
from chatumm_kit.convert.provenance import WeightsOrigin, write_weights_origin  # noqa: E402
from chatumm_kit.inference.session import ChatSession  # noqa: E402
from chatumm_kit.inference.steps import VelocityStep  # noqa: E402
from chatumm_kit.presets import build_model  # noqa: E402

TEXTS = ["draw a harbour at dawn", "make it night", "what is in this photo", "a street with boats"]


def write_kit(folder: Path, *, tiny: bool, layers: int, device: torch.device, dtype: torch.dtype) -> None:
    """A random BAGEL-shaped model as a kit folder (weights stored in ``dtype``) with a small tokenizer."""
    spec = tiny_spec(layers) if tiny else bagel_7b_spec(layers)
    torch.manual_seed(0)
    with torch.device(device):  # random init where it is fast (a GPU for the 7B widths)
        model = build_model(spec).to(dtype)
    with torch.no_grad():  # the released llm2vae is not zero: give the velocity head weights
        for p in model.vae.llm2vae.parameters():
            p.normal_(0.0, 0.02)
    tokenizer = ChatTokenizer.train(TEXTS * 10, vocab_size=300)
    save_kit_folder(model, spec, folder, tokenizer=tokenizer)
    write_weights_origin(folder, WeightsOrigin.BAGEL_RELEASE)
    del model


@contextlib.contextmanager
def timed_steps(device: torch.device):
    """Time every model step a session answers, by kind: ``{"euler": [s, ...], "token": [s, ...]}`` per reply."""
    times: dict[str, list[float]] = defaultdict(list)
    inner = ChatSession._answer

    def answer(self, step):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = inner(self, step)
        sync()
        times["euler" if isinstance(step, VelocityStep) else "token"].append(time.perf_counter() - start)
        return out

    ChatSession._answer = answer
    try:
        yield times
    finally:
        ChatSession._answer = inner


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    work = Path(args.work or tempfile.mkdtemp(prefix="bagel_chat_"))
    kit = work / "kit"
    start = time.perf_counter()
    write_kit(kit, tiny=args.tiny, layers=args.layers, device=device, dtype=dtype)
    write_s = time.perf_counter() - start
    side, (h, w) = (32, (24, 32)) if args.tiny else (1024, (600, 800))  # the photo: 600x800 as a real upload
    photo = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    write_png(photo, str(work / "photo.png"))
    lines = [
        {"user": TEXTS[0], "respond": {"mode": "image"}},
        {"user": TEXTS[1], "images": ["photo.png"], "respond": {"mode": "edit"}},
        {"user": TEXTS[2], "images": ["photo.png"], "respond": {"mode": "text", "max_new_tokens": args.tokens}},
    ]
    (work / "script.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["chat", str(kit), "--script", str(work / "script.jsonl"), "--out", str(work / "out")]
    argv += ["--device", args.device, "--dtype", args.dtype, "--preset", "bagel_t2i", "--steps", str(args.steps)]
    argv += ["--step-convention", "euler_steps", "--image-size", str(side), str(side)]
    argv += ["--view-sizing", "capped"] if args.tiny else ["--view-sizing", "bagel"]
    turns = []
    with timed_steps(device) as times:
        printed = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            code = chatumm(argv)
        chat_s = time.perf_counter() - start
        marks = dict(times)
    if code != 0:
        raise RuntimeError(f"chatumm chat exited {code}:\n{printed.getvalue()}")
    records = [json.loads(x) for x in (work / "out" / "replies.jsonl").read_text().splitlines()]
    for r in records:
        turns.append(r["intents"])
    euler, token = marks.get("euler", []), marks.get("token", [])
    n = args.steps  # the first two replies are images: steps each
    return {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "dtype": args.dtype,
        "layers": args.layers,
        "model": "tiny" if args.tiny else "BAGEL-7B-shaped",
        "intents": turns,
        "image_sizes": [r["images"] and list(_png_size(r["images"][0])) for r in records],
        "euler_steps": len(euler),
        "t2i_euler_step_ms": 1e3 * sum(euler[:n]) / max(1, len(euler[:n])),
        "edit_euler_step_ms": 1e3 * sum(euler[n : 2 * n]) / max(1, len(euler[n : 2 * n])),
        "text_tokens": len(token),
        "text_token_ms": 1e3 * sum(token) / max(1, len(token)),
        "write_kit_s": write_s,
        "chat_s": chat_s,
        "chat_log": printed.getvalue().splitlines()[:3],
    }


def _png_size(path: str) -> tuple[int, int]:
    from torchvision.io import read_image

    return tuple(read_image(path).shape[1:])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="chat dtype (default bf16)")
    ap.add_argument("--tiny", action="store_true", help="a tiny BAGEL-shaped model (CPU smoke run)")
    ap.add_argument("--layers", type=int, default=2, help="decoder (and ViT) layers (default 2)")
    ap.add_argument("--steps", type=int, default=10, help="Euler steps per image (default 10)")
    ap.add_argument("--tokens", type=int, default=32, help="text tokens of the VQA reply at most (default 32)")
    ap.add_argument("--work", help="folder for the kit folder, script and replies (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    args = ap.parse_args(argv)
    result = run(args)
    rows = [
        ("device", f"{result['device']}, {result['dtype']}"),
        ("model", f"{result['model']}, {result['layers']} layers (random weights, kit folder)"),
        ("turns", " | ".join(f"{m}: {i}" for m, i in zip(("t2i", "edit", "vqa"), result["intents"], strict=False))),
        ("image sizes", str(result["image_sizes"][:2])),
        ("Euler step (t2i)", f"{result['t2i_euler_step_ms']:.1f} ms"),
        ("Euler step (edit)", f"{result['edit_euler_step_ms']:.1f} ms"),
        ("text token", f"{result['text_token_ms']:.2f} ms ({result['text_tokens']} tokens)"),
        ("load + chat", f"{result['chat_s']:.1f} s (kit folder written in {result['write_kit_s']:.1f} s)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
