"""A crash-safe cache of LLM answers, keyed by (operation, input, endpoint, model, attempt), in one sqlite file.

Each answer is stored with whether the operation accepted it. Accepted answers replay: a re-run makes the same
decisions and issues no backend call for them (SPEC §6: resume where it stopped). Rejected answers are kept for
inspection but never replayed — a re-run asks again, so answers of a broken endpoint do not outlive its fix. The
endpoint (a backend's ``endpoint``, e.g. its URL) is part of the key beside the model, so two servers' answers never
mix; answers longer than ``max_answer_chars`` are not stored. Each ``put`` commits its own transaction in WAL mode:
a killed process loses at most the answer being written, never the file.

The key is a SHA-256 over a canonical JSON of the parts; images inside an input enter by their key, so the cache never
holds pixels.

Example:
    >>> c = AnswerCache(path=":memory:")
    >>> k = AnswerCache.key(op="caption2query", version="1", inputs={"caption": "a cat"}, model="m", attempt=0)
    >>> c.get(k) is None
    True
    >>> c.put(k, "not json", valid=False); c.get(k) is None
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
    """Raw LLM answers by key, with their validity. Thread-safe; ``path=":memory:"`` for tests.

    Args:
        path: the sqlite file (created with its folder).
        max_answer_chars: longer answers are not stored (an endpoint that streams megabytes cannot fill the disk).

    Attributes:
        hits, misses: lookups that found / did not find a replayable answer since construction.
    """

    def __init__(self, *, path: str | Path, max_answer_chars: int = 65536) -> None:
        self.path = str(path)
        self.max_answer_chars = int(max_answer_chars)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, op TEXT, model TEXT, answer TEXT)")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(answers)")}
        if "valid" not in columns:  # a cache written before validity was stored: its rows are re-validated on use
            self._db.execute("ALTER TABLE answers ADD COLUMN valid INTEGER")
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*, op: str, version: str, inputs: Any, model: str, attempt: int, endpoint: str = "") -> str:
        parts = {"op": op, "version": version, "inputs": inputs, "model": model, "attempt": attempt}
        if endpoint:
            parts["endpoint"] = endpoint
        return hashlib.sha256(canonical_json(parts).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        """The stored answer if it may be replayed: accepted, or stored before validity was recorded."""
        with self._lock:
            row = self._db.execute(
                "SELECT answer FROM answers WHERE key = ? AND (valid IS NULL OR valid = 1)", (key,)
            ).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
            return row[0]

    def put(self, key: str, answer: str, *, valid: bool = True, op: str = "", model: str = "") -> bool:
        """Store an answer and whether the operation accepted it; returns False when it is too long to store."""
        if len(answer) > self.max_answer_chars:
            return False
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers (key, op, model, answer, valid) VALUES (?, ?, ?, ?, ?)",
                (key, op, model, answer, int(bool(valid))),
            )
        return True

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
