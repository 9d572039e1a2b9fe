"""Judged turns per second: the judged reply scorer at judge concurrency 1 vs 16, in one run.

A loopback chat-completions judge (:class:`~chatumm_kit.eval.loopback.LoopbackJudgeServer` on a free 127.0.0.1 port)
answers every request after a fixed latency (``--latency-ms``, default 50: a remote judge's round trip). The kit's
:class:`~chatumm_kit.eval.scoring.JudgedReplyScorer` scores ``--turns`` distinct dialogue turns (a two-exchange history
with a 32×32 picture, the reference and the candidate: the full ``reply_quality`` prompt, pictures as data URLs)
through the real :class:`~chatumm_kit.synth.OpenAIChatBackend` with no cache, so every verdict is a request. Concurrency
``c`` sets both the judge's threads and the backend's ``max_concurrency``.

    python benchmarks/bench_eval.py [--json] [--turns 96] [--latency-ms 50]

Example:
    >>> main(["--json", "--turns", "32"])["judge_concurrency16_speedup"] > 1  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from chatumm_kit.data.dialogue import Role
from chatumm_kit.eval import ExpectedTurn, Judge, JudgedReplyScorer, Reply, ScoreRequest
from chatumm_kit.eval.loopback import LoopbackJudgeServer
from chatumm_kit.synth import OpenAIChatBackend


def requests(n: int) -> list[ScoreRequest]:
    """``n`` distinct judged turns (distinct texts, so no two share a cache key or an in-flight answer)."""
    g = torch.Generator().manual_seed(0)
    picture = torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8)
    out = []
    for i in range(n):
        history = ((Role.USER, (f"Draw picture number {i}.",)), (Role.ASSISTANT, (picture,)))
        e = ExpectedTurn(dialogue_id=f"d{i}", index=1, task="understand", output="text", distance=0,
                         distractor=False, answer="red", answer_scene=None, target=None,
                         user=[f"What colour is picture {i}?"], reply=["red"])  # fmt: skip
        out.append(ScoreRequest(expected=e, reply=Reply(parts=[f"It is blue ({i})."]), history=history))
    return out


def judged_turns_per_s(url: str, turns: list[ScoreRequest], concurrency: int) -> tuple[float, int]:
    backend = OpenAIChatBackend(model="loopback", base_url=url, max_concurrency=concurrency, temperature=0.0,
                                timeout_s=30.0, max_retries=0)  # fmt: skip
    scorer = JudgedReplyScorer(judge=Judge(backend=backend, cache=None, max_concurrency=concurrency))
    start = time.perf_counter()
    scores = scorer.score_many(turns)
    elapsed = time.perf_counter() - start
    failed = sum(s.judged is None or s.judged.get("judge_failed", 0.0) > 0 for s in scores)
    return len(turns) / elapsed, failed


def main(argv: list[str] | None = None) -> dict:
    """Measure both concurrencies, print the table (and with ``--json`` a last JSON line); return that object."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    ap.add_argument("--turns", type=int, default=96, help="judged turns per measurement")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="the loopback judge's answer latency")
    args = ap.parse_args(argv)
    turns = requests(args.turns)
    with LoopbackJudgeServer(latency_s=args.latency_ms / 1000.0) as server:
        judged_turns_per_s(server.base_url, turns[:4], 4)  # warm-up: imports, sockets, PNG encoding
        c1, f1 = judged_turns_per_s(server.base_url, turns, 1)
        c16, f16 = judged_turns_per_s(server.base_url, turns, 16)
    result = {
        "judged_turns": args.turns,
        "judge_latency_ms": args.latency_ms,
        "judged_turns_per_s_concurrency1": round(c1, 2),
        "judged_turns_per_s_concurrency16": round(c16, 2),
        "judge_concurrency16_speedup": round(c16 / c1, 2),
        "failed_verdicts": f1 + f16,
    }
    print(f"judged reply scoring, {args.turns} turns, loopback judge answering after {args.latency_ms:.0f} ms")
    print(f"{'judge concurrency':>18}  {'turns/s':>8}")
    print(f"{1:>18}  {c1:>8.2f}")
    print(f"{16:>18}  {c16:>8.2f}")
    print(f"speedup 16 vs 1: {c16 / c1:.2f}x  (ideal 16x; failed verdicts: {f1 + f16})")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
