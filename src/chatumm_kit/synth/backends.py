"""LLM backends for the atomic operations: an OpenAI-compatible chat-completions client (standard library only).

:class:`OpenAIChatBackend` POSTs ``{base_url}/chat/completions`` with the operation's messages; images go as
``data:<mime>;base64,...`` URLs in ``image_url`` parts. It bounds concurrency with a semaphore, spaces requests with a
token-bucket :class:`RateLimiter`, times out each request, and retries 408/409/425/429/5xx, timeouts and connection
errors with exponential backoff (honouring ``Retry-After``). Anything else — a 400, a 401 — fails at once with a
:class:`~.ops.BackendError` naming the status and the start of the body. The API key comes from an environment
variable (never from a recipe); with no key set, no ``Authorization`` header is sent (local servers).

Keys and environment values stay with the hosts you chose (README "Bad input"): the key is sent only to a loopback
host, or over https to ``api.openai.com`` or a host you list in ``$CHATUMM_API_HOSTS`` (comma-separated
``host[:port]``; an ``http://host[:port]`` entry also allows plain http to it). A backend pointed elsewhere while the
key is set refuses to start. No request may carry a value the recipe read with ``${oc.env:VAR}`` (in ``model``,
``extra_body``, the URL or a prompt): the backend refuses to start, or the request is not sent.

The deterministic rule-based backend for the ShapesChat world lives in :mod:`.shapes_backend`.

Example:
    >>> be = OpenAIChatBackend(model="qwen2.5-vl-7b", base_url="http://127.0.0.1:8000/v1")  # doctest: +SKIP
    >>> be.complete([ChatMessage("user", ("Say hi as JSON",))])  # doctest: +SKIP
    '{"text": "hi"}'
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatumm_kit.config.secrets import find_env_value
from chatumm_kit.synth.ops import BackendError, ChatMessage, Operation
from chatumm_kit.synth.records import ImageRef

__all__ = [
    "RateLimiter",
    "OpenAIChatBackend",
    "BackendStats",
    "image_data_url",
    "RETRY_STATUS",
    "API_HOSTS_ENV",
    "key_may_go_to",
]

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

API_HOSTS_ENV = "CHATUMM_API_HOSTS"
DEFAULT_API_HOSTS = ("api.openai.com",)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_may_go_to(url: str) -> bool:
    """Whether an API key may be sent to ``url``: a loopback host (any scheme), or https to ``api.openai.com`` or a
    host in ``$CHATUMM_API_HOSTS``; plain http only to an ``http://host[:port]`` entry there.

    Example:
        >>> key_may_go_to("http://127.0.0.1:8000/v1"), key_may_go_to("http://api.openai.com/v1")
        (True, False)
    """
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if _is_loopback(host):
        return True
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    entries = [e.strip().lower() for e in os.environ.get(API_HOSTS_ENV, "").split(",") if e.strip()]
    entries += DEFAULT_API_HOSTS
    if parts.scheme == "https":
        return host in entries or netloc in entries or f"https://{netloc}" in entries or f"https://{host}" in entries
    return parts.scheme == "http" and (f"http://{netloc}" in entries or f"http://{host}" in entries)


def image_data_url(image: ImageRef) -> str:
    """``data:<mime>;base64,<bytes>`` for an image (original bytes when known, else PNG)."""
    mime, data = image.encoded()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class RateLimiter:
    """A thread-safe token bucket: at most ``burst`` requests at once, refilled at ``per_minute / 60`` per second.

    Args:
        per_minute: sustained request rate; ``None`` or ``0`` disables limiting.
        burst: bucket size (requests that may go back to back).
        clock, sleep: injectable for tests.
    """

    def __init__(
        self,
        *,
        per_minute: float | None,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = (per_minute or 0) / 60.0
        self.burst = max(1, int(burst))
        self._tokens = float(self.burst)
        self._clock, self._sleep = clock, sleep
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping as needed; returns the seconds waited."""
        if self.rate <= 0:
            return 0.0
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return waited
                delay = (1.0 - self._tokens) / self.rate
            self._sleep(delay)
            waited += delay


@dataclass
class BackendStats:
    requests: int = 0
    retries: int = 0
    timeouts: int = 0
    failures: int = 0
    rate_limited_s: float = 0.0


class OpenAIChatBackend:
    """An OpenAI-compatible ``/chat/completions`` client that answers operation calls.

    Args:
        model: model name sent in the request; also the ``model`` part of the cache key.
        base_url: API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1`` (vLLM, llama.cpp).
        api_key_env: environment variable holding the API key (read at each request; unset or ``None`` → no auth
            header). Sent only where :func:`key_may_go_to` allows.
        timeout_s: per-request timeout.
        max_retries: retries after the first try for retryable failures.
        backoff_s, max_backoff_s: exponential backoff base and cap (``Retry-After`` wins when the server sends it).
        max_concurrency: requests in flight at once across threads.
        requests_per_minute, burst: client-side rate limit (``None`` = off).
        temperature, max_tokens: sampling settings sent with every request.
        json_mode: also send ``response_format: {"type": "json_object"}``.
        extra_body: more JSON fields merged into every request (server-specific options).
        max_response_bytes: a longer response body is refused (this input's dialogue is dropped), never read whole.
    """

    def __init__(
        self,
        *,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_concurrency: int = 8,
        requests_per_minute: float | None = None,
        burst: int = 1,
        temperature: float = 0.7,
        max_tokens: int = 512,
        json_mode: bool = False,
        extra_body: Mapping[str, Any] | None = None,
        max_response_bytes: int = 1 << 20,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"OpenAIChatBackend.base_url must start with http:// or https://, got {base_url!r}")
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        if api_key_env and os.environ.get(api_key_env) and not key_may_go_to(self.url):
            host = urllib.parse.urlsplit(self.url).netloc
            raise ValueError(
                f"OpenAIChatBackend: not sending ${api_key_env} to {self.url} (API keys go to loopback hosts, or over "
                f"https to {', '.join(DEFAULT_API_HOSTS)} or a host in ${API_HOSTS_ENV}); trust it with "
                f"export {API_HOSTS_ENV}={'http://' if self.url.startswith('http:') else ''}{host}, or set "
                "api_key_env: null"
            )
        leaked = find_env_value(json.dumps([model, self.url, dict(extra_body or {})], default=str))
        if leaked:
            raise ValueError(
                f"OpenAIChatBackend: model, base_url or extra_body holds the value of ${leaked} (read with "
                "${oc.env:...}); environment values are never sent in requests"
            )
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.json_mode = json_mode
        self.extra_body = dict(extra_body or {})
        self.max_response_bytes = int(max_response_bytes)
        self.limiter = RateLimiter(per_minute=requests_per_minute, burst=burst, sleep=sleep)
        self._slots = threading.BoundedSemaphore(max(1, max_concurrency))
        self._sleep = sleep
        self.stats = BackendStats()
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.model

    @property
    def endpoint(self) -> str:
        """The URL answers come from: part of the answer cache's key, so two servers' answers never mix."""
        return self.url

    # ------------------------------------------------------------------ request building
    @staticmethod
    def encode_message(message: ChatMessage) -> dict[str, Any]:
        """One message in the chat-completions format; plain string content when there are no images."""
        if all(isinstance(c, str) for c in message.content):
            return {"role": message.role, "content": "\n".join(message.content)}  # type: ignore[arg-type]
        parts: list[dict[str, Any]] = []
        for c in message.content:
            if isinstance(c, ImageRef):
                parts.append({"type": "image_url", "image_url": {"url": image_data_url(c)}})
            else:
                parts.append({"type": "text", "text": c})
        return {"role": message.role, "content": parts}

    def payload(self, messages: Sequence[ChatMessage]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [self.encode_message(m) for m in messages],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        body.update(self.extra_body)
        return body

    # ------------------------------------------------------------------ calls
    def answer(self, op: Operation, inputs: Any, *, attempt: int, feedback: Sequence[ChatMessage]) -> str:
        return self.complete([*op.messages(inputs), *feedback])

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key and key_may_go_to(self.url):  # checked again: the environment may have changed since construction
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._slots:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                body = resp.read(self.max_response_bytes + 1)
        if len(body) > self.max_response_bytes:
            raise BackendError(
                f"response from {self.url} is larger than max_response_bytes={self.max_response_bytes}", stop_run=False
            )
        return body

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff_s, max(0.0, float(retry_after)))
            except ValueError:
                pass
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return base * (1.0 + 0.1 * random.random())  # jitter spreads retries of parallel workers

    def complete(self, messages: Sequence[ChatMessage]) -> str:
        """The assistant's text for ``messages``; raises :class:`BackendError` when retries are exhausted."""
        text = json.dumps(self.payload(messages))
        leaked = find_env_value(text)
        if leaked:
            raise BackendError(
                f"not sending a request to {self.url}: it would carry the value of ${leaked} (read by the recipe with "
                "${oc.env:...}); environment values are never sent",
                stop_run=True,
            )
        body = text.encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            waited = self.limiter.acquire()
            with self._lock:
                self.stats.requests += 1
                self.stats.rate_limited_s += waited
            retry_after = None
            try:
                raw = self._post(body)
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace") if e.fp is not None else ""
                last = f"HTTP {e.code} from {self.url}: {detail}"
                if e.code not in RETRY_STATUS:
                    with self._lock:
                        self.stats.failures += 1
                    # 401/403/404 mean the whole run is misconfigured (stop); other 4xx are about this input (drop).
                    raise BackendError(last, stop_run=e.code in (401, 403, 404)) from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
                    with self._lock:
                        self.stats.timeouts += 1
                last = f"{type(e).__name__} talking to {self.url}: {reason}"
            else:
                try:
                    return self._content(raw)
                except BackendError as e:
                    last = str(e)
            if attempt < self.max_retries:
                with self._lock:
                    self.stats.retries += 1
                self._sleep(self._delay(attempt, retry_after))
        with self._lock:
            self.stats.failures += 1
        raise BackendError(f"gave up after {self.max_retries + 1} tries: {last}")

    @staticmethod
    def _content(raw: bytes) -> str:
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise BackendError(f"malformed chat-completions response ({e}): {raw[:200]!r}") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise BackendError(f"chat-completions content is {type(content).__name__}, expected a string")
        return content
