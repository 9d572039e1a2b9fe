"""A loopback OpenAI-compatible judge for tests, benchmarks and offline dry runs (127.0.0.1 only, a daemon thread).

:class:`LoopbackJudgeServer` answers ``POST /v1/chat/completions`` with a deterministic verdict computed from the
request's text by :func:`scripted_verdict` — so a test can recompute every score by hand from what the report
records — or misbehaves on purpose (``mode``): ``garbage`` answers prose instead of JSON, ``error`` answers HTTP 500,
``slow`` answers after ``slow_s`` seconds (past a client's timeout). ``latency_s`` delays every answer (a remote
judge's round trip); ``block_after`` answers that many requests and then holds every later one unanswered (to kill a
client mid-run). It counts what it answered: ``hits`` (every request), ``answered`` (request-body digests of the 200
answers, in order).

:func:`scripted_verdict`'s rules, by prompt (recognised from the rendered template):

* ``reply_quality`` — ``score = (7 + 2 * k) % 11`` where ``k`` is the number of user turns in the history shown;
* ``gedit`` — ``semantic_consistency = len(instruction) % 11``, ``perceptual_quality = (3 * len(instruction)) % 11``;
* ``t2i_adherence`` — ``score = len(prompt) % 11``.

Example:
    >>> with LoopbackJudgeServer() as server:                                             # doctest: +SKIP
    ...     backend = OpenAIChatBackend(model="loopback", base_url=server.base_url)
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LoopbackJudgeServer", "scripted_verdict", "MODES"]

MODES = ("ok", "garbage", "error", "slow")


def _text_of(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message (content parts joined; pictures as ``<image>``)."""
    content = [m for m in messages if m.get("role") == "user"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") if p.get("type") == "text" else "<image>" for p in content)


def scripted_verdict(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The deterministic verdict (module docstring) for a chat-completions ``messages`` list."""
    text = _text_of(messages)
    if "Editing instruction:" in text:
        instruction = re.search(r"Editing instruction: (.*)\n", text).group(1)  # type: ignore[union-attr]
        n = len(instruction)
        return {"semantic_consistency": n % 11, "perceptual_quality": (3 * n) % 11, "reason": f"instruction {n}"}
    if text.startswith("Prompt: "):
        prompt = re.match(r"Prompt: (.*)\n", text).group(1)  # type: ignore[union-attr]
        return {"score": len(prompt) % 11, "reason": f"prompt of {len(prompt)} characters"}
    history = text.split("The user's latest turn:")[0]
    k = history.count("\nUser: ") + history.startswith("User: ")
    return {"score": (7 + 2 * k) % 11, "reason": f"{k} user turns before this one"}


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default listen backlog (5) drops concurrent connects into 1 s SYN retries
    daemon_threads = True


class LoopbackJudgeServer:
    """A chat-completions judge on ``127.0.0.1`` (module docstring); use as a context manager or call
    :meth:`close`."""

    def __init__(
        self,
        *,
        mode: str = "ok",
        latency_s: float = 0.0,
        slow_s: float = 2.0,
        block_after: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"LoopbackJudgeServer.mode must be one of {MODES}, got {mode!r}")
        self.mode, self.latency_s, self.slow_s, self.block_after = mode, latency_s, slow_s, block_after
        self.hits = 0
        self.answered: list[str] = []
        self.blocked = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner._handle(self, body)

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        with self._lock:
            self.hits += 1
            hold = self.block_after is not None and len(self.answered) >= self.block_after
        if hold:
            self.blocked.set()
            self._release.wait(timeout=60.0)  # bounded: released at close
            return
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.mode == "error":
            self._send(handler, 500, b'{"error": "loopback judge: internal error"}')
            return
        if self.mode == "slow":
            time.sleep(self.slow_s)
        request = json.loads(body)
        if self.mode == "garbage":
            content = "Honestly I'd rate this one a solid 7/10, nice work!"
        else:
            content = json.dumps(scripted_verdict(request["messages"]))
        reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        with self._lock:
            self.answered.append(hashlib.sha256(body).hexdigest())
        self._send(handler, 200, json.dumps(reply).encode())

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, data: bytes) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) or was killed
            pass

    def release(self) -> None:
        """Stop holding requests (``block_after``): held ones end unanswered, later ones are answered."""
        with self._lock:
            self.block_after = None
        self._release.set()

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LoopbackJudgeServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
