"""Fakes shared by the synthesis tests: a deterministic LLM stand-in for real-data runs and tiny datasets on disk."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from chatumm_kit.synth.ops import ChatMessage, Operation


class EchoBackend:
    """Answers every built-in operation the way a cooperative LLM would, from the inputs' text only (no world truth).

    Counts calls; ``refuse`` is a set of operation names it refuses (to test drops).
    """

    model_id = "echo-1"

    def __init__(self, *, refuse: frozenset[str] = frozenset()) -> None:
        self.calls = 0
        self.refuse = refuse
        self._lock = threading.Lock()

    def answer(self, op: Operation, inputs, *, attempt: int, feedback: tuple[ChatMessage, ...]) -> str:
        with self._lock:
            self.calls += 1
        if op.name in self.refuse:
            return "I'm sorry, but I can't help with that."
        name = op.name
        if name == "caption2query":
            out = {"query": f"Please draw {inputs.caption.rstrip('.')}."}
        elif name == "edit2query":
            out = {"query": inputs.instruction if inputs.context == "uploaded" else f"Now, {inputs.instruction}"}
        elif name == "vqa2query":
            out = {"query": inputs.question}
        elif name == "caption_request":
            out = {"query": "Describe this picture." if inputs.context == "uploaded" else "Describe what you made."}
        elif name == "query2dep_q":
            out = {"query": f"Going back to the picture of {inputs.target.rstrip('.')}: {inputs.query}"}
        elif name == "make_distractor":
            out = {"question": f"Tell me one fact about {inputs.topic} (#{inputs.seed})?", "answer": "A fact."}
        elif name == "image2qa":
            out = {"question": "What does the picture show?", "answer": (inputs.description or "a picture")[:60]}
        else:
            raise AssertionError(f"EchoBackend: no answer for {name}")
        return json.dumps(out)


def png_bytes(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def echo_backend() -> EchoBackend:
    return EchoBackend()


@pytest.fixture(autouse=True)
def _one_thread_no_proxy(monkeypatch):
    torch.set_num_threads(1)  # tiny renders are ~30x slower with intra-op threads on a busy 2-core box
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # the fake server lives on 127.0.0.1


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
