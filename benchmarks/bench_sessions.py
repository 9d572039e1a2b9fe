"""Chat sessions replying one by one vs together (:func:`chatumm_kit.inference.batch.respond_batch`).

``N`` = 1, 2, 4, 8 independent sessions over one ``chatumm_tiny`` model (a 300-token BPE trained like the tests',
32×32 images, weights jittered so the experts differ and the velocity head is non-zero), each with a short history
(a user turn with an image and text, an assistant reply, a new user request). Two kinds of reply, forced by a bias
on the intent logits so every run does the same work:

* *text* — one text segment of exactly ``--tokens`` tokens (``im_e`` held back): ``tokens + 2`` decoding steps;
* *image* — one image, ``--steps`` Euler steps with three-context CFG (full, text- and image-unconditional inside
  the default interval (0.4, 1], full only outside it).

*one by one* calls ``session.respond`` for each session in turn; *batched* calls ``respond_batch`` once (one forward
per step for all sessions and all their CFG contexts). Each repeat rolls the replies back afterwards (not timed), so
every run starts from the same caches; the two ways alternate order each repeat and the median is kept. The figure
of merit is one-by-one time / batched time (> 1: batching is faster).

    python benchmarks/bench_sessions.py [--quick] [--json] [--threads 1] [--repeats 5] [--sizes 1 2 4 8]

Example:
    >>> result = main(["--quick", "--json"])     # doctest: +SKIP
    >>> result["speedup"]["text"]["8"] > 0        # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.inference.batch import respond_batch
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.session import ChatSession, SessionConfig
from chatumm_kit.model import ChatUMM
from chatumm_kit.presets import build_model

TEXTS = ["draw a red circle", "what colour is it", "it is red", "make it blue", "a blue square"]
CONFIG = SessionConfig(vit_patch_size=8, vae_token_stride=8, max_image_side=32, image_size=(32, 32))
SIZES = (1, 2, 4, 8)
KINDS = ("text", "image")


def tiny_model() -> tuple[ChatUMM, ChatTokenizer]:
    """``chatumm_tiny`` and its tokenizer, built as ``tests/inference/test_session.py`` builds them."""
    tokenizer = ChatTokenizer.train(TEXTS * 5, vocab_size=300)
    torch.manual_seed(0)
    model = build_model({"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": tokenizer.vocab_size})
    with torch.no_grad():  # make the experts differ and the velocity head non-zero
        for p in [*model.backbone.parameters(), *model.vae.llm2vae.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), tokenizer


def image(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def sessions(model: ChatUMM, tokenizer: ChatTokenizer, n: int) -> list[ChatSession]:
    """``n`` sessions with different short histories, each ending with a user turn."""
    out = []
    for i in range(n):
        s = ChatSession(model=model, tokenizer=tokenizer, config=CONFIG)
        s.add_user(TEXTS[i % len(TEXTS)], images=[image(i)])
        s.add_assistant(TEXTS[(i + 2) % len(TEXTS)])
        s.add_user(TEXTS[(i + 3) % len(TEXTS)] + " now" * (i % 3))
        out.append(s)
    return out


@contextmanager
def forced_reply(model: ChatUMM, tokenizer: ChatTokenizer, kind: str):
    """Bias ``lm_head`` so every reply is one segment of ``kind``: text (``im_e`` never chosen) or an image."""
    bias = torch.zeros(model.backbone.lm_head.out_features)
    if kind == "text":
        bias[tokenizer.im_start_id] = 100.0
        bias[tokenizer.im_end_id] = -100.0
    else:
        bias[tokenizer.vision_start_id] = 100.0
    handle = model.backbone.lm_head.register_forward_hook(lambda m, a, out: out + bias.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


def median_times(fns: dict[str, Callable[[], None]], *, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, alternating their order every repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(fns[name]())
    return {k: statistics.median(v) for k, v in times.items()}


def measure(
    model: ChatUMM, tokenizer: ChatTokenizer, kind: str, n: int, *, tokens: int, steps: int, repeats: int
) -> dict[str, Any]:
    """Time ``n`` replies of ``kind`` one by one and batched; returns a row of the table."""
    chats = sessions(model, tokenizer, n)
    samplers = [SamplerConfig(num_steps=steps, seed=i) for i in range(n)]
    settings = dict(max_new_tokens=tokens, max_segments=1)
    turn = chats[0].num_turns

    def timed(run: Callable[[], None]) -> Callable[[], float]:
        def go() -> float:
            t0 = time.perf_counter()
            run()
            elapsed = time.perf_counter() - t0
            for s in chats:
                s.rollback(turn)
            return elapsed

        return go

    def one_by_one() -> None:
        for s, c in zip(chats, samplers):
            s.respond(sampler=c, **settings)

    def batched() -> None:
        respond_batch(chats, samplers=samplers, **settings)

    with forced_reply(model, tokenizer, kind):
        t = median_times({"one_by_one": timed(one_by_one), "batched": timed(batched)}, repeats=repeats)
    work = tokens + 2 if kind == "text" else steps
    return {
        "reply": kind,
        "sessions": n,
        "steps_per_reply": work,
        "one_by_one_s": t["one_by_one"],
        "batched_s": t["batched"],
        "speedup": t["one_by_one"] / t["batched"],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short replies, one repeat (a smoke run)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats, median kept (default 5)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per text reply (default 32; quick 4)")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps per image (default 20; quick 2)")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="session counts (default 1 2 4 8)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokens = args.tokens or (4 if args.quick else 32)
    steps = args.steps or (2 if args.quick else 20)
    repeats = 1 if args.quick else args.repeats
    model, tokenizer = tiny_model()

    rows = [
        measure(model, tokenizer, kind, n, tokens=tokens, steps=steps, repeats=repeats)
        for kind in KINDS
        for n in args.sizes
    ]
    print(f"CPU, torch {torch.__version__}, {args.threads} thread(s), chatumm_tiny fp32; text reply = {tokens} "
          f"tokens, image reply = {steps} Euler steps x CFG contexts; median of {repeats}")  # fmt: skip
    head = f"{'reply':6s} {'N':>3s} {'one by one ms':>14s} {'batched ms':>11s} {'ms/reply 1x1':>13s} " \
           f"{'ms/reply batched':>17s} {'speedup':>8s}"  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        n = r["sessions"]
        print(f"{r['reply']:6s} {n:3d} {r['one_by_one_s'] * 1e3:14.1f} {r['batched_s'] * 1e3:11.1f} "
              f"{r['one_by_one_s'] * 1e3 / n:13.1f} {r['batched_s'] * 1e3 / n:17.1f} {r['speedup']:7.2f}x")  # fmt: skip
    result: dict[str, Any] = {
        "speedup": {kind: {str(r["sessions"]): r["speedup"] for r in rows if r["reply"] == kind} for kind in KINDS},
        "threads": args.threads,
        "repeats": repeats,
        "text_tokens": tokens,
        "image_steps": steps,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
