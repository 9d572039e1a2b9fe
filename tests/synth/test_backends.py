"""The OpenAI-compatible backend against a fake chat-completions server on 127.0.0.1 (random port, in a thread)."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from chatumm_kit.synth.backends import OpenAIChatBackend, RateLimiter
from chatumm_kit.synth.cache import AnswerCache
from chatumm_kit.synth.ops import BackendError, Caption2QueryIn, ChatMessage, Image2QAIn
from chatumm_kit.synth.records import ImageRef
from chatumm_kit.synth.runner import OpRunner
from conftest import jpeg_bytes

GOOD = '{"query": "Could you draw a red circle?"}'


class FakeServer:
    """A chat-completions endpoint whose replies follow a script: ``("ok", text)``, ``("status", code, headers)``
    or ``("sleep", seconds, text)``; after the script, every request gets ``default``."""

    def __init__(self, script=(), default=("ok", GOOD)):
        self.script = list(script)
        self.default = default
        self.requests: list[dict] = []
        self.arrivals: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                    server.arrivals.append(time.monotonic())
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    action = server.script.pop(0) if server.script else server.default
                try:
                    if action[0] == "status":
                        self.send_response(action[1])
                        for k, v in (action[2] if len(action) > 2 else {}).items():
                            self.send_header(k, v)
                        self.send_header("Content-Length", "2")
                        self.end_headers()
                        self.wfile.write(b"{}")
                        return
                    if action[0] == "sleep":
                        time.sleep(action[1])
                    text = action[-1]
                    if action[0] == "echo":  # a drawing request built from the caption in the prompt
                        caption = re.search(r"Caption: '([^']*)'", json.dumps(body["messages"])).group(1)
                        text = json.dumps({"query": f"Please draw {caption}."})
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def backend(url, **kw):
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 5.0)
    return OpenAIChatBackend(model="fake-vlm", base_url=url, **kw)


def ask(be):
    return be.complete([ChatMessage("user", ("Write a drawing request as JSON.",))])


def test_request_format_and_api_key_from_env(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-test")
    with FakeServer() as srv:
        be = backend(srv.url, api_key_env="FAKE_KEY", temperature=0.3, max_tokens=64, json_mode=True)
        assert ask(be) == GOOD
        monkeypatch.delenv("FAKE_KEY")
        ask(be)
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    assert "Authorization" not in srv.requests[1]["headers"]  # unset key: no header (local servers)
    assert req["body"]["model"] == "fake-vlm" and req["body"]["temperature"] == 0.3 and req["body"]["max_tokens"] == 64
    assert req["body"]["response_format"] == {"type": "json_object"}
    assert req["body"]["messages"] == [{"role": "user", "content": "Write a drawing request as JSON."}]


def test_retries_429_and_500_with_backoff_honouring_retry_after():
    slept: list[float] = []
    script = [("status", 429, {"Retry-After": "0.25"}), ("status", 500), ("status", 503)]
    with FakeServer(script) as srv:
        be = backend(srv.url, max_retries=3, backoff_s=0.01, sleep=slept.append)
        assert ask(be) == GOOD
    assert len(srv.requests) == 4 and be.stats.retries == 3
    assert slept[0] == 0.25  # the server's Retry-After wins
    assert 0.02 <= slept[2] <= 0.04 * 1.1 + 1e-9 and slept[2] > slept[1]  # exponential: 0.01 * 2**attempt


def test_gives_up_after_max_retries_and_says_so():
    with FakeServer(default=("status", 500)) as srv:
        be = backend(srv.url, max_retries=2, sleep=lambda s: None)
        with pytest.raises(BackendError, match="gave up after 3 tries: HTTP 500") as e:
            ask(be)
    assert len(srv.requests) == 3 and e.value.stop_run


@pytest.mark.parametrize("code,stop_run", [(400, False), (401, True)])
def test_client_errors_are_not_retried(code, stop_run):
    with FakeServer(default=("status", code)) as srv:
        with pytest.raises(BackendError, match=f"HTTP {code}") as e:
            ask(backend(srv.url, max_retries=3))
    assert len(srv.requests) == 1 and e.value.stop_run is stop_run


def test_timeout_is_retried():
    with FakeServer([("sleep", 1.0, '{"query": "late"}')]) as srv:
        be = backend(srv.url, timeout_s=0.3, max_retries=2)
        t0 = time.monotonic()
        assert ask(be) == GOOD
        assert time.monotonic() - t0 < 0.9  # did not wait for the slow reply
    assert be.stats.timeouts == 1 and len(srv.requests) == 2


def test_malformed_response_is_retried_then_reported():
    with FakeServer(default=("ok", None)) as srv:  # content null
        with pytest.raises(BackendError, match="content is NoneType"):
            ask(backend(srv.url, max_retries=1, sleep=lambda s: None))
    assert len(srv.requests) == 2


def test_rate_limiter_spaces_requests():
    with FakeServer() as srv:
        be = backend(srv.url, requests_per_minute=600, burst=1)  # one request per 0.1 s
        for _ in range(5):
            ask(be)
    gaps = [b - a for a, b in zip(srv.arrivals, srv.arrivals[1:])]
    assert min(gaps) > 0.08 and srv.arrivals[-1] - srv.arrivals[0] > 0.35


def test_rate_limiter_token_bucket_with_fake_clock():
    now = [0.0]
    waits: list[float] = []

    def sleep(s):
        waits.append(s)
        now[0] += s

    rl = RateLimiter(per_minute=120, burst=2, clock=lambda: now[0], sleep=sleep)  # 2 per second, bucket of 2
    assert [rl.acquire() for _ in range(2)] == [0.0, 0.0]  # the burst goes through
    assert rl.acquire() == pytest.approx(0.5)  # then one every 0.5 s
    now[0] += 10.0  # a long pause refills only up to the burst
    assert [rl.acquire() for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
    assert RateLimiter(per_minute=None).acquire() == 0.0


def test_concurrency_limit_bounds_requests_in_flight():
    with FakeServer(default=("sleep", 0.15, GOOD)) as srv:
        be = backend(srv.url, max_concurrency=2)
        threads = [threading.Thread(target=ask, args=(be,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(srv.requests) == 6 and srv.max_in_flight == 2


def test_images_go_as_data_urls():
    pixels = torch.randint(0, 256, (3, 6, 5), dtype=torch.uint8)
    jpeg = jpeg_bytes((10, 200, 30))
    with FakeServer(default=("ok", '{"question": "What colour is it?", "answer": "green"}')) as srv:
        runner = OpRunner(backend=backend(srv.url))
        runner.run("image2qa", Image2QAIn(image=ImageRef.from_tensor(pixels), description="noise"))
        runner.run("image2qa", Image2QAIn(image=ImageRef.from_bytes(jpeg), description="green"))
    parts = [r["body"]["messages"][1]["content"] for r in srv.requests]
    assert parts[0][0]["type"] == "image_url" and parts[0][1]["type"] == "text" and "noise" in parts[0][1]["text"]
    url = parts[0][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = np.array(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    assert torch.equal(torch.from_numpy(decoded).permute(2, 0, 1), pixels)
    url2 = parts[1][0]["image_url"]["url"]  # encoded bytes we already have travel untouched
    assert url2.startswith("data:image/jpeg;base64,") and base64.b64decode(url2.split(",", 1)[1]) == jpeg


def test_cached_rerun_issues_zero_requests(tmp_path):
    captions = ["a red circle", "a blue square", "a green cross"]
    with FakeServer(default=("echo",)) as srv:
        cache = AnswerCache(path=tmp_path / "llm.sqlite")
        first = [OpRunner(backend=backend(srv.url), cache=cache).run("caption2query", Caption2QueryIn(caption=c))
                 for c in captions]  # fmt: skip
        cache.close()
        n = len(srv.requests)
        cache = AnswerCache(path=tmp_path / "llm.sqlite")  # a new process would open the file like this
        runner = OpRunner(backend=backend(srv.url), cache=cache)
        again = [runner.run("caption2query", Caption2QueryIn(caption=c)) for c in captions]
    assert n == 3 and len(srv.requests) == 3  # the second pass did not reach the server
    assert again == first and runner.stats.calls == 0 and runner.stats.cache_hits == 3
    assert [q.query for q in again] == [f"Please draw {c}." for c in captions]
