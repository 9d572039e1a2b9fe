"""A loopback OpenAI-compatible ``/chat/completions`` server for the fault tests.

``plan``: a list of actions taken one per request (then ``default``): ``"ok"`` (a cooperative answer built from the
prompt, per operation), ``"garbage"`` (not JSON), ``"down"`` (HTTP 503). Every request body is kept in ``requests``.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _text(body: dict) -> str:
    parts = []
    for m in body["messages"]:
        c = m["content"]
        parts.extend([c] if isinstance(c, str) else [p.get("text", "") for p in c])
    return "\n".join(parts)


def cooperative_answer(body: dict) -> str:
    """What a helpful model would answer to one of the kit's operations (read from the prompt)."""
    text = _text(body)
    if "Rewrite this image caption" in text:
        caption = re.search(r"Caption: '([^']*)'", text).group(1)
        return json.dumps({"query": f"Please draw {caption.rstrip('.')}."})
    if "Rewrite this visual question" in text:
        return json.dumps({"query": re.search(r"Question: '([^']*)'", text).group(1)})
    if "returns to an earlier picture" in text:
        request = re.search(r"Request: '([^']*)'", text).group(1)
        return json.dumps({"query": f"Back to the photo of the yellow flower I sent at the start: {request}"})
    if "self-contained user question" in text:
        return json.dumps({"question": "How long does a kettle take to boil?", "answer": "About three minutes."})
    if "describe a picture" in text:
        return json.dumps({"query": "Describe this picture."})
    raise AssertionError(f"no cooperative answer for: {text[:200]}")


class LoopbackLLM:
    def __init__(self, *, plan=(), default: str = "ok") -> None:
        self.plan = list(plan)
        self.default = default
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    action = server.plan.pop(0) if server.plan else server.default
                if action == "down":
                    self.send_response(503)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                content = cooperative_answer(body) if action == "ok" else "<html>502 Bad Gateway</html>"
                out = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
