"""Running atomic operations through a backend: cache, strict parsing, validation, retries with feedback, drops.

:class:`OpRunner` looks each call up in the :class:`~.cache.AnswerCache` (key: operation, version, input, endpoint,
model, attempt), asks the backend on a miss, hands the raw text to the operation's parser and validator, and stores
the answer with the verdict (only accepted answers replay). A rejected answer is retried — the model is shown its answer and why it was rejected — up to ``max_attempts`` times; then
:class:`~.ops.OpFailed` carries the reason (``"<op>:<code>"``) to the pipeline, which records it and drops the dialogue.

Example:
    >>> from chatumm_kit.synth.ops import Caption2QueryIn
    >>> from chatumm_kit.synth.shapes_backend import ShapesRuleBackend
    >>> runner = OpRunner(backend=ShapesRuleBackend())
    >>> runner.run("caption2query", Caption2QueryIn(caption="A large red cross in the center.")).query != ""
    True
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from chatumm_kit.synth.cache import AnswerCache
from chatumm_kit.synth.ops import (
    OPERATIONS,
    Backend,
    BackendError,
    ChatMessage,
    Operation,
    OpFailed,
    OpOutputError,
    get_op,
)

__all__ = ["OpRunner", "OpStats"]


@dataclass
class OpStats:
    """Counters of one runner (thread-safe through the runner's lock)."""

    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    rejected: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)


class OpRunner:
    """Runs operations through a backend with caching, strict parsing, validation and retries.

    Args:
        backend: answers the calls (an LLM client or a rule-based backend).
        cache: stores every raw answer by (op, version, input, endpoint, model, attempt) with whether it was
            accepted; ``None`` to disable.
        ops: extra or replacement operations by name, on top of the global registry.
        max_attempts: tries per call before :class:`OpFailed`.

    Example:
        >>> runner = OpRunner(backend=my_backend)  # doctest: +SKIP
        >>> runner.run("caption2query", Caption2QueryIn(caption="a red circle")).query  # doctest: +SKIP
        'Could you draw a red circle?'
    """

    def __init__(
        self,
        *,
        backend: Backend,
        cache: AnswerCache | None = None,
        ops: Mapping[str, Operation] | None = None,
        max_attempts: int = 3,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"OpRunner.max_attempts must be >= 1, got {max_attempts}")
        self.backend = backend
        self.cache = cache
        for key, op in (ops or {}).items():
            if not isinstance(op, Operation) or op.name != key:
                raise ValueError(f"OpRunner.ops[{key!r}]: expected an Operation named {key!r}, got {op!r}")
        self.registry = {**OPERATIONS, **(ops or {})}
        self.max_attempts = max_attempts
        self.model_id = str(getattr(backend, "model_id", type(backend).__name__))
        self.endpoint = str(getattr(backend, "endpoint", ""))  # e.g. the server URL: its answers are its own
        self.stats = OpStats()
        self._lock = threading.Lock()
        self._inflight: dict[str, Future] = {}

    def _call(self, op: Operation, inputs: Any, attempt: int, feedback: list[ChatMessage]) -> str:
        with self._lock:
            self.stats.calls += 1
        text = self.backend.answer(op, inputs, attempt=attempt, feedback=tuple(feedback))
        if not isinstance(text, str):
            raise BackendError(
                f"{type(self.backend).__name__} returned {type(text).__name__}, expected str", stop_run=False
            )
        return text

    def _key(self, op: Operation, inputs: Any, attempt: int) -> str:
        return AnswerCache.key(
            op=op.name,
            version=op.version,
            inputs=op.cache_inputs(inputs),
            model=self.model_id,
            attempt=attempt,
            endpoint=self.endpoint,
        )

    def _raw(self, op: Operation, inputs: Any, attempt: int, feedback: list[ChatMessage]) -> tuple[str, bool]:
        """``(answer, replayed)``: from the cache when it holds an accepted answer, else from the backend."""
        if self.cache is None:
            return self._call(op, inputs, attempt, feedback), False
        key = self._key(op, inputs, attempt)
        # Identical calls in flight at once (two dialogues, two threads) share one backend answer: otherwise each
        # would use its own sample while the cache keeps one, and a replay from the cache would differ.
        with self._lock:
            pending = self._inflight.get(key)
            owner = pending is None
            if owner:
                pending = self._inflight[key] = Future()
        if not owner:
            text = pending.result()
            with self._lock:
                self.stats.cache_hits += 1
            return text, True
        try:
            text = self.cache.get(key)
            replayed = text is not None
            if replayed:
                with self._lock:
                    self.stats.cache_hits += 1
            else:
                text = self._call(op, inputs, attempt, feedback)
            pending.set_result(text)
            return text, replayed
        except BaseException as e:
            pending.set_exception(e)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _store(self, op: Operation, inputs: Any, attempt: int, text: str, *, valid: bool) -> None:
        if self.cache is not None:
            self.cache.put(self._key(op, inputs, attempt), text, valid=valid, op=op.name, model=self.model_id)

    def run(self, name: str, inputs: Any) -> Any:
        """The validated output of operation ``name`` on ``inputs``, or :class:`OpFailed`."""
        op = get_op(name, self.registry)
        if op.input_type is not object and not isinstance(inputs, op.input_type):
            raise TypeError(f"{name}: expected {op.input_type.__name__}, got {type(inputs).__name__}")
        errors: list[str] = []
        feedback: list[ChatMessage] = []
        text = ""
        code = "invalid"
        for attempt in range(self.max_attempts):
            if attempt:
                with self._lock:
                    self.stats.retries += 1
            text, replayed = self._raw(op, inputs, attempt, feedback)
            try:
                out = op(text, inputs)
            except OpOutputError as e:
                self._store(op, inputs, attempt, text, valid=False)  # never replayed (a replayed legacy row neither)
                code = e.code
                errors.append(str(e))
                with self._lock:
                    self.stats.rejected[f"{name}:{e.code}"] += 1
                feedback += [
                    ChatMessage("assistant", (text[:2000],)),
                    ChatMessage(
                        "user",
                        (f"That reply was rejected ({e}). Answer again with only the JSON object {op.schema()}.",),
                    ),
                ]
            else:
                if not replayed:
                    self._store(op, inputs, attempt, text, valid=True)
                return out
        with self._lock:
            self.stats.failed[f"{name}:{code}"] += 1
        raise OpFailed(name, errors, code=code, last_answer=text[:2000])
