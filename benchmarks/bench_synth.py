"""Synthesis throughput: the rule backend, and the OpenAI-compatible HTTP backend at concurrency 1 vs 8, one run.

The HTTP side runs the real ``OpenAIChatBackend`` (full prompts, JSON bodies, data-URL images, threads, retries)
against a chat-completions server on 127.0.0.1 that answers after a fixed latency (``--latency-ms``, a remote LLM's
round trip). To keep every answer valid without an LLM, the benchmark's backend computes the rule backend's answer
locally and appends it to the request as a final ``ECHO:`` message, which the server returns as the completion — so
the pipeline's parsers and validators see the same answers as with the rule backend.

    python benchmarks/bench_synth.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from chatumm_kit.config import instantiate, load_recipe
from chatumm_kit.synth import OpenAIChatBackend, ShapesRuleBackend
from chatumm_kit.synth.ops import ChatMessage

ECHO = "ECHO:"


class EchoServer:
    """A chat-completions endpoint on a free loopback port that returns the request's ``ECHO:`` text."""

    def __init__(self, *, latency_s: float) -> None:
        latency = latency_s

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                text = text if isinstance(text, str) else "".join(p.get("text", "") for p in text)
                time.sleep(latency)
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": text[len(ECHO) :]}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(reply.encode())

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> EchoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class EchoingHTTPBackend(OpenAIChatBackend):
    """The real HTTP backend, with the rule backend's answer riding along for the echo server to return."""

    def __init__(self, *, rule: ShapesRuleBackend, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rule = rule

    def answer(self, op, inputs, *, attempt, feedback):
        expected = self.rule.answer(op, inputs, attempt=attempt, feedback=feedback)
        return self.complete([*op.messages(inputs), *feedback, ChatMessage(role="user", content=(ECHO + expected,))])


def run(n: int, folder: Path, *, backend=None, workers: int = 1) -> tuple[float, int]:
    """Synthesise ``n`` dialogues; return (seconds, dialogues written)."""
    cfg = load_recipe("shapes/synth", [f"output_dir={folder}"])
    kwargs = {"num_dialogues": n, "workers": workers, "progress": False, "report_png": False, "use_cache": False}
    if backend is not None:
        kwargs["backend"] = backend
    pipeline = instantiate(cfg.synth, path="synth", **kwargs)
    start = time.perf_counter()
    report = pipeline.run()
    return time.perf_counter() - start, report.written


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # rendering 32×32 scenes: thread start-up dominates otherwise
    n_rule, n_http = (100, 8) if args.quick else (2000, 40)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        secs, written = run(n_rule, Path(tmp) / "rule")
        rows["rule"] = {"dialogues": written, "seconds": secs, "calls": None}
        with EchoServer(latency_s=args.latency_ms / 1000) as server:
            for conc in (1, 8):
                backend = EchoingHTTPBackend(
                    rule=ShapesRuleBackend(), model="echo", base_url=server.base_url, max_concurrency=conc
                )
                secs, written = run(n_http, Path(tmp) / f"http{conc}", backend=backend, workers=conc)
                rows[f"http_c{conc}"] = {"dialogues": written, "seconds": secs, "calls": backend.stats.requests}
    print(f"synthesis throughput, ShapesChat, 1 thread; HTTP server latency {args.latency_ms:.0f} ms per call")
    print(f"{'backend':10s} {'dialogues':>9s} {'seconds':>8s} {'dialogues/s':>12s} {'LLM calls':>10s} {'calls/s':>8s}")
    for name, r in rows.items():
        r["dialogues_per_s"] = r["dialogues"] / r["seconds"]
        calls = r["calls"]
        cps = f"{calls / r['seconds']:8.1f}" if calls else f"{'-':>8s}"
        print(
            f"{name:10s} {r['dialogues']:9d} {r['seconds']:8.2f} {r['dialogues_per_s']:12.1f} {calls or '-':>10} {cps}"
        )
    speedup = rows["http_c8"]["dialogues_per_s"] / rows["http_c1"]["dialogues_per_s"]
    print(f"HTTP concurrency 8 vs 1: {speedup:.2f}x")
    result = {
        "rule_dialogues_per_s": rows["rule"]["dialogues_per_s"],
        "http_concurrency1_dialogues_per_s": rows["http_c1"]["dialogues_per_s"],
        "http_concurrency8_dialogues_per_s": rows["http_c8"]["dialogues_per_s"],
        "http_concurrency8_speedup": speedup,
        "latency_ms": args.latency_ms,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
