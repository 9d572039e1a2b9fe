"""Chat turn latency: a :class:`~chatumm_kit.inference.session.ChatSession` that keeps its KV caches across turns vs
recomputing the whole history every turn.

**The dialogue.** Eight ShapesChat exchanges (``chatumm_kit.data.shapes``, 32×32 scenes), cycling through an edit,
a question and a caption request. Every user turn carries a rendered scene and a sentence; the assistant turns of the
history hold what a ShapesChat dialogue holds there: the edited scene plus its caption, a short answer, a caption.
A user turn adds ~50 tokens to the full context (a clean VAE view and a ViT view of 16 tokens each with their
markers, and the text); an assistant turn ~10 (text) to ~50 (image and caption).

**Turn k** (k = 1..8) is the user turn ``k`` followed by a reply, after ``k - 1`` complete exchanges:

* *cached* — the real session: ``add_turn`` of the user turn (its pieces embedded once — ViT and VAE encodings
  included — and prefilled into the three CFG contexts that the session keeps) and ``respond``;
* *recompute* — what an implementation without cross-turn caches pays: a fresh ``ChatSession`` (built outside the
  timer) is given the whole history again (all ``k`` user turns and ``k - 1`` assistant turns, every image
  re-encoded, every context re-prefilled), then the same ``respond``. The reply itself still decodes with a KV cache
  inside the turn, so this baseline is the conservative one; a decoder with no cache at all would pay far more.

Two kinds of reply, forced so that every run does the same work: the session's task modes
(``respond(mode="text" | "image")``, SPEC §4.1: the opening marker is forced and the turn ends after one segment),
and for text a bias holding ``im_e`` back (a forward hook on ``lm_head``) so it runs to ``max_new_tokens``:

* *text* — one text segment of exactly ``--tokens`` tokens (``im_e`` held back): ``tokens + 2`` decoding steps;
* *image* — one 32×32 image of ``--steps`` Euler steps with the SPEC's CFG defaults (three contexts inside the
  interval (0.4, 1], the full context alone outside it), then decoded and appended to the contexts.

Each timed reply is rolled back afterwards (not timed), and the dialogue's own assistant turn is appended instead, so
both methods and both reply kinds see the same history at every turn. Per turn, the methods alternate order every
repeat and the median is kept (after three untimed replies of each kind at turn 1, and one warm-up run per turn).

**Edit** — the cached turn 8 answered with ``mode="edit"`` and BAGEL's edit preset (``bagel_edit``: three contexts
on every step, ``text_channel`` renorm, ``--steps`` Euler steps counted the kit's way).

**Think** — the cached turn 8 answered with ``mode="think_image"`` (BAGEL's think mode, SPEC §4.1): its system
prompt goes in before the user turn (which is prefilled again after it), ``--tokens`` tokens of reasoning (``im_e``
held back, and the random model never writes ``</think>``) into the full context only, then the same image as the
*image* reply; ``think_over_image`` is its cost over the plain image turn.

**CFG cost** — the cached image turn 8 with one context (``cfg_text_scale = cfg_image_scale = 1``: only the full
context runs) vs three (scales 4 and 1.5 with ``cfg_interval = (0, 1)``: all three contexts at every step).

**Growth** — the cached turn 8 over the cached turn 1 (timed again at the end, interleaved with turn 1 on a fresh
session, so that a change of machine load during the run does not enter the ratio): with caches a turn computes only
its own tokens, and the history enters only through attention over a longer cache (plus one copy of the cache rows
when the user turn forks the text-unconditional context). To check that, this measurement also clocks the time
spent inside cached attention (mask over the cache + SDPA: the methods of the backbone's attention strategies
``mot_attention.CachedAttention`` and ``mot_attention.StackedCachedAttention``, wrapped for this measurement only)
and reports the growth of the rest. The table also splits
the cached turn into the user-turn prefill and the reply.

``--clock cpu`` times process CPU time instead of wall time: with one thread the two agree on an idle machine, and
CPU time does not count the waits when other processes share the cores.

The figure of merit is recompute / cached at turn 8 (target ≥ 4, i.e. the cached turn costs ≤ 1/4 of recompute).

    python benchmarks/bench_chat.py [--quick] [--json] [--threads 1] [--repeats 5] [--tokens 32] [--steps 20]
                                    [--hidden 128] [--layers 4] [--clock wall|cpu]

Example:
    >>> result = main(["--quick", "--json"])                  # doctest: +SKIP
    >>> result["turn8_recompute_over_cached"] > 1             # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from chatumm_kit.components import mot_attention
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import Role
from chatumm_kit.data.shapes import (
    WorldConfig,
    render,
    sample_caption,
    sample_edit,
    sample_scene,
    sample_text_to_image,
    sample_vqa,
)
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.sampler_presets import sampler_preset
from chatumm_kit.inference.session import ChatSession, SessionConfig
from chatumm_kit.model import ChatUMM
from chatumm_kit.presets import build_model

EXCHANGES = 8
KINDS = ("text", "image")
WORLD = WorldConfig()  # 32×32 scenes
SESSION = SessionConfig(vit_patch_size=8, vae_token_stride=8, max_image_side=32, image_size=(32, 32))

Part = str | torch.Tensor
TurnParts = tuple[Role, list[Part]]


# ---------------------------------------------------------------------------------------------- the dialogue
def shapes_dialogue(seed: int = 0, exchanges: int = EXCHANGES) -> list[TurnParts]:
    """``exchanges`` user/assistant pairs; each user turn is a rendered scene and a sentence.

    Exchange ``i`` is an edit (``i % 3 == 0``: the assistant shows the edited scene and its caption), a question
    (answered in words) or a caption request (answered with the caption).
    """
    rng = random.Random(seed)
    turns: list[TurnParts] = []
    for i in range(exchanges):
        if i % 3 == 0:
            edit = sample_edit(rng, config=WORLD)
            user: list[Part] = [render(edit.source, WORLD), edit.instruction]
            reply: list[Part] = [
                render(edit.target, WORLD),
                sample_caption(rng, config=WORLD, scene=edit.target).caption,
            ]
        elif i % 3 == 1:
            vqa = sample_vqa(rng, config=WORLD)
            user, reply = [render(vqa.scene, WORLD), vqa.question], [f"It is {vqa.answer}."]
        else:
            cap = sample_caption(rng, config=WORLD)
            user, reply = [render(cap.scene, WORLD), cap.prompt], [cap.caption]
        turns += [(Role.USER, user), (Role.ASSISTANT, reply)]
    return turns


def corpus(seed: int = 1, n: int = 300) -> list[str]:
    """ShapesChat sentences to train the benchmark's tokenizer on (requests, edits, questions, captions)."""
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(n):
        t2i = sample_text_to_image(rng, config=WORLD)
        vqa = sample_vqa(rng, config=WORLD, scene=sample_scene(rng, WORLD))
        texts += [t2i.prompt, t2i.caption, sample_edit(rng, config=WORLD).instruction, vqa.question, vqa.answer]
        texts.append(sample_caption(rng, config=WORLD).prompt)
    return texts


def build(hidden: int, layers: int, vocab_size: int = 512) -> tuple[ChatUMM, ChatTokenizer]:
    """``chatumm_tiny`` at ``hidden`` × ``layers`` (4 heads, 2 KV heads, MLP 3× wide; the ``shapes/chat_tiny``
    width at 128 × 4) with random weights, jittered so the experts differ and the velocity head is non-zero."""
    tokenizer = ChatTokenizer.train(corpus(), vocab_size=vocab_size)
    torch.manual_seed(0)
    spec = {"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": tokenizer.vocab_size, "hidden_size": hidden,
            "num_layers": layers, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 3 * hidden}  # fmt: skip
    model = build_model(spec)
    with torch.no_grad():
        for p in [*model.backbone.parameters(), *model.vae.llm2vae.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------- forcing a reply
@contextmanager
def forced(model: ChatUMM, tokenizer: ChatTokenizer, kind: str) -> Iterator[None]:
    """Bias ``lm_head`` so that the text of a ``kind="text"`` or think reply never closes early (``im_e`` never wins, so
    it runs to ``max_new_tokens``); the reply's modality itself is forced by the task mode."""
    bias = torch.zeros(model.backbone.lm_head.out_features)
    if kind == "text" or kind.startswith("think"):
        bias[tokenizer.im_end_id] = -100.0
    handle = model.backbone.lm_head.register_forward_hook(lambda m, args, out: out + bias.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class Reply:
    """One forced reply: its kind (a task mode: ``text``, ``image``, ``edit`` or ``think_image``), text length and
    sampler."""

    kind: str
    tokens: int
    sampler: SamplerConfig

    def run(self, session: ChatSession) -> None:
        with forced(session.model, session.tokenizer, self.kind):
            session.respond(max_new_tokens=self.tokens, sampler=self.sampler, mode=self.kind)


# ---------------------------------------------------------------------------------------------- timing
def median_ms(fns: dict[str, Callable[[], dict[str, float]]], *, repeats: int) -> dict[str, dict[str, float]]:
    """Median milliseconds of each part each fn reports (it returns its own elapsed seconds by part) over
    ``repeats``, the order of the fns alternating; one untimed warm-up call each first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[dict[str, float]]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(fns[name]())
    return {k: {part: 1e3 * statistics.median(t[part] for t in v) for part in v[0]} for k, v in times.items()}


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@contextmanager
def attention_meter(clock: Callable[[], float]) -> Iterator[list[float]]:
    """Accumulate, into the yielded ``[seconds]``, the time spent in cached attention: building each chunk's mask over
    its cache and attending over it — ``mot_attention.CachedAttention`` (prefill and decoded tokens) and
    ``mot_attention.StackedCachedAttention`` (an image's CFG contexts stacked into one forward), the only code whose work
    grows with the history besides copying cache rows. Wraps the classes' methods for the duration of the block."""
    total = [0.0]
    classes = (mot_attention.CachedAttention, mot_attention.StackedCachedAttention)
    originals = [(cls, cls.__init__, cls.__call__) for cls in classes]

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            out = fn(self, *args, **kwargs)
            total[0] += clock() - t0
            return out

        return wrapper

    for cls, init, call in originals:
        cls.__init__, cls.__call__ = timed(init), timed(call)  # type: ignore[method-assign]
    try:
        yield total
    finally:
        for cls, init, call in originals:
            cls.__init__, cls.__call__ = init, call  # type: ignore[method-assign]


def metered(fn: Callable[[], dict[str, float]], meter: list[float]) -> Callable[[], dict[str, float]]:
    """``fn`` with an ``"attention"`` part: what :func:`attention_meter` counted during the call."""

    def go() -> dict[str, float]:
        meter[0] = 0.0
        out = fn()
        return {**out, "attention": meter[0]}

    return go


class Bench:
    """The live session (history up to the current user turn) and the timed ways of playing turn k.

    ``clock``: ``"wall"`` (elapsed time) or ``"cpu"`` (this process's CPU time: with one thread the same on an idle
    machine, and blind to other processes that compete for the cores on a shared one).
    """

    def __init__(
        self, model: ChatUMM, tokenizer: ChatTokenizer, dialogue: list[TurnParts], *, clock: str = "wall"
    ) -> None:
        self.model, self.tokenizer, self.dialogue = model, tokenizer, dialogue
        self.now = CLOCKS[clock]
        self.session = ChatSession(model=model, tokenizer=tokenizer, config=SESSION)

    def new_session(self) -> ChatSession:
        return ChatSession(model=self.model, tokenizer=self.tokenizer, config=SESSION)

    def cached(self, k: int, reply: Reply) -> Callable[[], dict[str, float]]:
        """Turn ``k`` on the live session (holding exchanges 1..k-1): add user turn k, reply; then roll back."""
        user = self.dialogue[2 * (k - 1)]

        def go() -> dict[str, float]:
            s = self.session
            start = s.num_turns
            t0 = self.now()
            s.add_turn(*user)
            t1 = self.now()
            reply.run(s)
            t2 = self.now()
            s.rollback(start)
            return {"turn": t2 - t0, "prefill": t1 - t0, "reply": t2 - t1}

        return go

    def recompute(self, k: int, reply: Reply) -> Callable[[], dict[str, float]]:
        """Turn ``k`` without cross-turn caches: a fresh session prefills turns 1..2k-1, then replies."""
        history = self.dialogue[: 2 * k - 1]

        def go() -> dict[str, float]:
            s = self.new_session()
            t0 = self.now()
            for role, parts in history:
                s.add_turn(role, parts)
            t1 = self.now()
            reply.run(s)
            t2 = self.now()
            return {"turn": t2 - t0, "prefill": t1 - t0, "reply": t2 - t1}

        return go

    def advance(self, k: int) -> None:
        """Append exchange ``k`` (its user turn and the dialogue's assistant turn) to the live session, untimed."""
        for role, parts in self.dialogue[2 * (k - 1) : 2 * k]:
            self.session.add_turn(role, parts)


def outside(growth: dict[str, float]) -> float:
    """Turn 8 / turn 1 of the time spent outside cached attention."""
    return (growth["turn8_turn_ms"] - growth["turn8_attention_ms"]) / (
        growth["turn1_turn_ms"] - growth["turn1_attention_ms"]
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short replies, one repeat, hidden 64 × 2 (a smoke run)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per turn, median kept (default 5)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per text reply (default 32; quick 4)")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps per image reply (default 20; quick 2)")
    ap.add_argument("--hidden", type=int, default=None, help="backbone width (default 128, shapes/chat_tiny; quick 64)")
    ap.add_argument("--layers", type=int, default=None, help="backbone layers (default 4; quick 2)")
    ap.add_argument(
        "--clock", choices=tuple(CLOCKS), default="wall", help="wall time or process CPU time (default wall)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokens = args.tokens or (4 if args.quick else 32)
    steps = args.steps or (2 if args.quick else 20)
    hidden = args.hidden or (64 if args.quick else 128)
    layers = args.layers or (2 if args.quick else 4)
    repeats = 1 if args.quick else args.repeats

    model, tokenizer = build(hidden, layers)
    dialogue = shapes_dialogue()
    bench = Bench(model, tokenizer, dialogue, clock=args.clock)
    replies = {
        "text": Reply("text", tokens, SamplerConfig(num_steps=steps, seed=0)),
        "image": Reply("image", tokens, SamplerConfig(num_steps=steps, seed=0)),
    }
    cfg1 = Reply("image", tokens, SamplerConfig(num_steps=steps, seed=0, cfg_text_scale=1.0, cfg_image_scale=1.0))
    cfg3 = Reply("image", tokens, SamplerConfig(num_steps=steps, seed=0, cfg_interval=(0.0, 1.0)))
    edit = Reply("edit", tokens, sampler_preset("bagel_edit", num_steps=steps, step_convention="euler_steps", seed=0))
    think = Reply("think_image", tokens, SamplerConfig(num_steps=steps, seed=0))

    # first calls run slow (allocator, kernels): settle before timing
    for reply in (*replies.values(), cfg1, cfg3, edit, think):
        for _ in range(1 if args.quick else 3):
            bench.cached(1, reply)()
    rows: list[dict[str, Any]] = []
    cfg: dict[str, float] = {}
    growth: dict[str, dict[str, float]] = {}
    for k in range(1, EXCHANGES + 1):
        row: dict[str, Any] = {"turn": k, "history_tokens": bench.session.contexts.full.num_tokens}
        for kind, reply in replies.items():
            t = median_ms({"cached": bench.cached(k, reply), "recompute": bench.recompute(k, reply)}, repeats=repeats)
            cached, recompute = t["cached"], t["recompute"]
            row[f"cached_{kind}_ms"], row[f"recompute_{kind}_ms"] = cached["turn"], recompute["turn"]
            row[f"ratio_{kind}"] = recompute["turn"] / cached["turn"]
            row[f"cached_{kind}_prefill_ms"], row[f"cached_{kind}_reply_ms"] = cached["prefill"], cached["reply"]
            row[f"recompute_{kind}_prefill_ms"] = recompute["prefill"]
        if k == EXCHANGES:
            fns = {"cfg1": bench.cached(k, cfg1), "cfg3": bench.cached(k, cfg3), "edit": bench.cached(k, edit)}
            fns |= {"image": bench.cached(k, replies["image"]), "think": bench.cached(k, think)}
            t = median_ms(fns, repeats=repeats)
            cfg = {"cfg1_ms": t["cfg1"]["turn"], "cfg3_ms": t["cfg3"]["turn"], "edit_bagel_ms": t["edit"]["turn"]}
            cfg |= {"think_image_ms": t["think"]["turn"], "think_image_reply_ms": t["think"]["reply"]}
            cfg |= {"think_over_image": t["think"]["turn"] / t["image"]["turn"]}
            cfg |= {"cfg1_reply_ms": t["cfg1"]["reply"], "cfg3_reply_ms": t["cfg3"]["reply"]}
            fresh = Bench(model, tokenizer, dialogue, clock=args.clock)  # turn 1 again, interleaved with turn 8
            for kind, reply in replies.items():
                with attention_meter(bench.now) as meter:
                    fns = {
                        "turn1": metered(fresh.cached(1, reply), meter),
                        "turn8": metered(bench.cached(k, reply), meter),
                    }
                    t = median_ms(fns, repeats=repeats)
                growth[kind] = {f"{turn}_{part}_ms": t[turn][part] for turn in t for part in ("turn", "attention")}
        rows.append(row)
        bench.advance(k)

    first, last = rows[0], rows[-1]
    result: dict[str, Any] = {
        "turn8_recompute_over_cached": last["ratio_text"],
        "turn8_recompute_over_cached_image": last["ratio_image"],
        "target_met": last["ratio_text"] >= 4.0,
        "target_met_image": last["ratio_image"] >= 4.0,
        "cached_growth_turn8_over_turn1": growth["text"]["turn8_turn_ms"] / growth["text"]["turn1_turn_ms"],
        "cached_growth_turn8_over_turn1_image": growth["image"]["turn8_turn_ms"] / growth["image"]["turn1_turn_ms"],
        **{
            f"cached_growth_turn8_over_turn1{suffix}_outside_attention": outside(growth[kind])
            for kind, suffix in (("text", ""), ("image", "_image"))
        },  # fmt: skip
        "cached_growth_ms": growth,
        "recompute_growth_turn8_over_turn1": last["recompute_text_ms"] / first["recompute_text_ms"],
        "recompute_growth_turn8_over_turn1_image": last["recompute_image_ms"] / first["recompute_image_ms"],
        **cfg,
        "cfg3_over_cfg1": cfg["cfg3_ms"] / cfg["cfg1_ms"],
        "turns": [r["turn"] for r in rows],
        "history_tokens": [r["history_tokens"] for r in rows],
        **{key: [r[key] for r in rows] for key in rows[0] if key not in ("turn", "history_tokens")},
        "threads": args.threads,
        "clock": args.clock,
        "repeats": repeats,
        "text_tokens": tokens,
        "image_steps": steps,
        "hidden": hidden,
        "layers": layers,
    }

    print(f"CPU, torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, chatumm_tiny hidden {hidden} "
          f"x {layers} layers fp32; text reply = {tokens} tokens, image reply = {steps} Euler steps (CFG (0.4, 1]); "
          f"median of {repeats}")  # fmt: skip
    head = (f"{'turn':>4s} {'history':>7s} | {'text cached':>11s} {'recompute':>9s} {'ratio':>6s} | "
            f"{'image cached':>12s} {'recompute':>9s} {'ratio':>6s} | {'prefill':>7s} {'text rep':>8s} "
            f"{'img rep':>8s}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['turn']:4d} {r['history_tokens']:7d} | {r['cached_text_ms']:11.1f} {r['recompute_text_ms']:9.1f} "
              f"{r['ratio_text']:5.2f}x | {r['cached_image_ms']:12.1f} {r['recompute_image_ms']:9.1f} "
              f"{r['ratio_image']:5.2f}x | {r['cached_text_prefill_ms']:7.1f} {r['cached_text_reply_ms']:8.1f} "
              f"{r['cached_image_reply_ms']:8.1f}")  # fmt: skip
    print("(ms; history = tokens in the full context before the turn; prefill / text rep / img rep split the cached "
          "turn into the user-turn prefill and the reply)")  # fmt: skip
    print(f"turn 8: recompute / cached = {result['turn8_recompute_over_cached']:.2f}x text, "
          f"{result['turn8_recompute_over_cached_image']:.2f}x image (target >= 4: "
          f"{'met' if result['target_met'] else 'NOT met'} for text, "
          f"{'met' if result['target_met_image'] else 'NOT met'} for image)")  # fmt: skip
    print(f"cached turn 8 / turn 1 (timed interleaved; history {rows[-1]['history_tokens']} vs 0 tokens; recompute "
          f"from the table: {result['recompute_growth_turn8_over_turn1']:.2f}x text, "
          f"{result['recompute_growth_turn8_over_turn1_image']:.2f}x image):")  # fmt: skip
    for kind, suffix in (("text", ""), ("image", "_image")):
        g = growth[kind]
        print(f"  {kind:5s} {g['turn1_turn_ms']:6.1f} -> {g['turn8_turn_ms']:6.1f} ms "
              f"({result['cached_growth_turn8_over_turn1' + suffix]:.2f}x); in cached attention "
              f"{g['turn1_attention_ms']:5.1f} -> {g['turn8_attention_ms']:5.1f} ms; outside it "
              f"{g['turn1_turn_ms'] - g['turn1_attention_ms']:6.1f} -> {g['turn8_turn_ms'] - g['turn8_attention_ms']:6.1f}"
              f" ms ({result['cached_growth_turn8_over_turn1' + suffix + '_outside_attention']:.2f}x)")  # fmt: skip
    print(f"CFG at turn 8 (cached image turn): 1 context {cfg['cfg1_ms']:.1f} ms, 3 contexts {cfg['cfg3_ms']:.1f} ms "
          f"-> {result['cfg3_over_cfg1']:.2f}x; edit (mode='edit', bagel_edit preset) {cfg['edit_bagel_ms']:.1f} ms")  # fmt: skip
    print(f"think at turn 8 (mode='think_image': system prompt, {tokens} reasoning tokens, the same image): "
          f"{cfg['think_image_ms']:.1f} ms = {cfg['think_over_image']:.2f}x the image turn")  # fmt: skip
    if not all(math.isfinite(v) for v in (result["turn8_recompute_over_cached"], result["cfg3_over_cfg1"])):
        raise RuntimeError("bench_chat: a timing is not finite")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
