"""Synthesis throughput (SPEC §6): the rule backend, and the HTTP backend at concurrency 1 vs 8, in one run.

Every run builds the shipped recipe ``shapes/synth`` (chain → distractors → interleave, 32×32 ShapesChat scenes) into a
temporary directory with the answer cache off, so every operation call really reaches its backend.

- ``rule``: the recipe as shipped, :class:`~chatumm_kit.synth.ShapesRuleBackend` answering in-process.
- ``http_c1`` / ``http_c8``: the real :class:`~chatumm_kit.synth.OpenAIChatBackend` (full prompts, JSON bodies,
  data-URL images, semaphore, retries) against a chat-completions server on a free 127.0.0.1 port that answers after
  a fixed latency (``--latency-ms``, a remote LLM's round trip). Concurrency ``c`` sets both knobs that must agree:
  the pipeline's ``workers`` (threads making candidates) and the backend's ``max_concurrency`` (requests in flight).

To keep every answer valid without an LLM, the client computes the rule backend's answer for the call and appends it
to the request as a last ``ECHO:`` message, which the server returns as the completion; the pipeline's parsers and
validators therefore see the same answers as with the rule backend, and both concurrencies make the same calls.

Each run uses ``shard_size = min(recipe's, dialogues)`` so a chunk does not make far more candidates than are
written (a chunk's candidates all run before the first ``num_dialogues`` are kept).

    python benchmarks/bench_synth.py [--quick] [--json] [--latency-ms 20]

Example:
    >>> main(["--quick", "--json"])["http_concurrency8_speedup"] > 1  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from chatumm_kit.config import instantiate, load_recipe
from chatumm_kit.synth import ChatMessage, OpenAIChatBackend, ShapesRuleBackend

ECHO = "ECHO:"
RECIPE = "shapes/synth"


class EchoServer:
    """A chat-completions endpoint on a free loopback port: sleeps ``latency_s``, then returns the ``ECHO:`` text.

    Example:
        >>> with EchoServer(latency_s=0.02) as srv:  # doctest: +SKIP
        ...     OpenAIChatBackend(model="echo", base_url=srv.base_url).complete([...])
    """

    def __init__(self, *, latency_s: float) -> None:
        latency = latency_s

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                last = body["messages"][-1]["content"]
                text = last if isinstance(last, str) else "".join(p.get("text", "") for p in last)
                if not text.startswith(ECHO):
                    self.send_error(400, f"last message does not start with {ECHO!r}")
                    return
                time.sleep(latency)  # the remote model's round trip
                reply = {"choices": [{"message": {"role": "assistant", "content": text[len(ECHO) :]}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # keep the table readable
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> EchoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


class EchoingHTTPBackend(OpenAIChatBackend):
    """The real HTTP backend, with the rule backend's answer riding along for :class:`EchoServer` to return."""

    def __init__(self, *, rule: ShapesRuleBackend, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rule = rule

    def answer(self, op, inputs, *, attempt, feedback):
        expected = self.rule.answer(op, inputs, attempt=attempt, feedback=feedback)
        return self.complete([*op.messages(inputs), *feedback, ChatMessage(role="user", content=(ECHO + expected,))])


@dataclass
class Row:
    """One pipeline run. ``llm_calls``: backend calls made by the op runner (HTTP requests for the HTTP rows)."""

    name: str
    concurrency: int
    dialogues: int
    seconds: float
    llm_calls: int
    http_requests: int | None = None

    @property
    def dialogues_per_s(self) -> float:
        return self.dialogues / self.seconds

    @property
    def calls_per_s(self) -> float:
        return self.llm_calls / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dialogues_per_s": self.dialogues_per_s, "calls_per_s": self.calls_per_s}


def run_pipeline(name: str, *, n: int, folder: Path, workers: int = 1, backend: Any = None) -> Row:
    """Synthesise ``n`` dialogues with the shipped recipe (backend replaced when given) and time ``run()``."""
    cfg = load_recipe(RECIPE, [f"output_dir={folder}"])
    kwargs: dict[str, Any] = dict(
        num_dialogues=n,
        shard_size=min(int(cfg.synth.shard_size), n),
        workers=workers,
        use_cache=False,  # every call must reach the backend
        progress=False,
        report_png=False,
    )
    if backend is not None:
        kwargs["backend"] = backend
    pipeline = instantiate(cfg.synth, path="synth", **kwargs)
    start = time.perf_counter()
    report = pipeline.run()
    seconds = time.perf_counter() - start
    requests = backend.stats.requests if isinstance(backend, OpenAIChatBackend) else None
    return Row(name, workers, report.written, seconds, pipeline.runner.stats.calls, requests)


def _bypass_proxy_for_loopback() -> None:
    """urllib honours ``http_proxy``; the fake server lives on 127.0.0.1, so make sure no proxy is asked for it."""
    for var in ("no_proxy", "NO_PROXY"):
        hosts = [h for h in os.environ.get(var, "").split(",") if h]
        if "127.0.0.1" not in hosts:
            os.environ[var] = ",".join([*hosts, "127.0.0.1"])


def _measure(*, n_rule: int, n_http: int, latency_s: float) -> list[Row]:
    """The rule run, then the HTTP runs at concurrency 1 and 8 against one echo server."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        rows.append(run_pipeline("rule", n=n_rule, folder=Path(tmp) / "rule"))
        cfg = load_recipe(RECIPE, [f"output_dir={tmp}"])
        with EchoServer(latency_s=latency_s) as server:
            for conc in (1, 8):
                backend = EchoingHTTPBackend(
                    rule=instantiate(cfg.synth.backend, path="synth.backend"),
                    model="echo-llm",
                    base_url=server.base_url,
                    max_concurrency=conc,
                    timeout_s=30.0,
                )
                folder = Path(tmp) / f"http{conc}"
                rows.append(run_pipeline(f"http_c{conc}", n=n_http, folder=folder, workers=conc, backend=backend))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the three measurements, print the table (and with ``--json`` a last JSON line); return that object."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (a few seconds)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="fake server's latency per request")
    ap.add_argument("--rule-dialogues", type=int, default=None)
    ap.add_argument("--http-dialogues", type=int, default=None)
    args = ap.parse_args(argv)
    n_rule = args.rule_dialogues or (100 if args.quick else 2000)
    n_http = args.http_dialogues or (8 if args.quick else 80)
    _bypass_proxy_for_loopback()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # rendering 32×32 scenes: intra-op thread start-up costs ~30× the work
    try:
        rows = _measure(n_rule=n_rule, n_http=n_http, latency_s=args.latency_ms / 1000)
    finally:
        torch.set_num_threads(threads)  # main() is also called from a test; leave the process as found

    by_name = {r.name: r for r in rows}
    speedup = by_name["http_c8"].dialogues_per_s / by_name["http_c1"].dialogues_per_s
    print(
        f"synthesis throughput — recipe {RECIPE}, torch threads 1, no cache; "
        f"HTTP: fake chat-completions server, {args.latency_ms:g} ms per request"
    )
    print(
        f"{'run':8s} {'conc':>4s} {'dialogues':>9s} {'seconds':>8s} {'dialogues/s':>11s} {'LLM calls':>9s} {'calls/s':>8s}"
    )
    for r in rows:
        print(
            f"{r.name:8s} {r.concurrency:4d} {r.dialogues:9d} {r.seconds:8.2f} {r.dialogues_per_s:11.1f} "
            f"{r.llm_calls:9d} {r.calls_per_s:8.1f}"
        )
    print(f"HTTP speed-up from concurrency 8 vs 1: {speedup:.2f}x (ideal ≤ 8x)")
    result = {
        "rule_dialogues_per_s": by_name["rule"].dialogues_per_s,
        "rule_calls_per_s": by_name["rule"].calls_per_s,
        "http_concurrency1_dialogues_per_s": by_name["http_c1"].dialogues_per_s,
        "http_concurrency8_dialogues_per_s": by_name["http_c8"].dialogues_per_s,
        "http_concurrency8_speedup": speedup,
        "latency_ms": args.latency_ms,
        "rows": [r.to_dict() for r in rows],
    }
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
