"""A crash-safe cache of LLM answers, keyed by (operation, input, model, attempt), in one sqlite file.

Every raw answer a backend returns is stored — valid or not — so a re-run replays the same answers, makes the same
keep/retry/drop decisions and issues zero backend calls (SPEC §6: resume where it stopped). Each ``put`` commits
its own transaction in WAL mode: a killed process loses at most the answer being written, never the file.

The key is a SHA-256 over a canonical JSON of the parts; images inside an input enter by their key, so the cache never
holds pixels.

Example:
    >>> c = AnswerCache(path=":memory:")
    >>> k = AnswerCache.key(op="caption2query", version="1", inputs={"caption": "a cat"}, model="m", attempt=0)
    >>> c.get(k) is None
    True
    >>> c.put(k, '{"query": "Draw a cat."}'); c.get(k)
    '{"query": "Draw a cat."}'
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

__all__ = ["AnswerCache", "canonical_json"]


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces); objects with ``cache_token()`` enter by that token."""

    def default(o: Any) -> Any:
        token = getattr(o, "cache_token", None)
        if callable(token):
            return token()
        raise TypeError(f"canonical_json: cannot serialise {type(o).__name__}")

    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=default)


class AnswerCache:
    """Raw LLM answers by key. Thread-safe; ``path=":memory:"`` for tests.

    Attributes:
        hits, misses: lookups that found / did not find an answer since construction.
    """

    def __init__(self, *, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, op TEXT, model TEXT, answer TEXT)")
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*, op: str, version: str, inputs: Any, model: str, attempt: int) -> str:
        blob = canonical_json({"op": op, "version": version, "inputs": inputs, "model": model, "attempt": attempt})
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
            return row[0]

    def put(self, key: str, answer: str, *, op: str = "", model: str = "") -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers (key, op, model, answer) VALUES (?, ?, ?, ?)", (key, op, model, answer)
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
