"""A judge for what has no exact answer: any OpenAI-compatible vision-language endpoint, with prompts kept as data.

**Prompts are data.** Each judge prompt is a YAML file in ``chatumm_kit/eval/prompts/`` (or any path): ``name``,
``version``, ``system``, ``template`` (text with ``{slot}`` placeholders; a slot's value may be text or a sequence of
texts and pictures, interleaved in place) and ``scores`` (score name → ``[lowest, highest]`` integers). The version
and a digest of the file's text enter the cache key, so a changed prompt never reuses an older verdict.

**The machinery is the synthesis backends'.** A :class:`JudgePrompt` becomes an atomic operation
(:class:`JudgeOperation`, SPEC §6) run by :class:`~chatumm_kit.synth.runner.OpRunner` through any
:class:`~chatumm_kit.synth.ops.Backend` — usually :class:`~chatumm_kit.synth.backends.OpenAIChatBackend` (bounded
concurrency, client-side rate limit, timeouts, retries of 429/5xx with backoff, pictures sent as ``data:`` URLs) —
with its sqlite :class:`~chatumm_kit.synth.cache.AnswerCache` (keyed by prompt, version, content, endpoint and judge
model). Every raw answer is stored; accepted verdicts are replayed, so an interrupted evaluation resumes without asking
the judge again for any verdict it gave, while a rejected answer is asked again on a rerun (the cache's rule: only
accepted answers replay). :class:`Judge` fans requests out over threads.

**Strict parsing, nothing guessed.** A verdict must be exactly one JSON object (optionally in one ```json fence) with
the prompt's score keys as integers in range and a non-empty ``reason`` string — ``7.5``, ``"7"``, ``11``, a missing
or extra key, prose around the object: all rejected. A rejected answer is retried with the reason shown to the judge
(``max_attempts``); when every attempt fails the :class:`Verdict` records the error code, each attempt's rejection and
the last raw answer, and carries no score. A transport failure (timeouts, 5xx after the backend's retries) is
recorded the same way (``error`` starts ``backend:``) and, not being an answer, is not cached: a rerun asks again.

Example:
    >>> prompt = JudgePrompt.load("t2i_adherence")
    >>> prompt.scores
    {'score': (0, 10)}
    >>> prompt.parse('{"score": 7, "reason": "the circle is red but small"}')
    JudgeScores(scores={'score': 7}, reason='the circle is red but small')
    >>> judge = Judge(backend=OpenAIChatBackend(model="qwen2.5-vl", base_url="http://127.0.0.1:8000/v1"),
    ...               cache="runs/eval/judge_cache.sqlite")                                    # doctest: +SKIP
    >>> judge.verdicts("t2i_adherence", [prompt.render({"prompt": "a red circle", "image": [picture]})])  # doctest: +SKIP
    [Verdict(prompt='t2i_adherence@1', scores={'score': 8}, reason='...', ...)]
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from chatumm_kit.synth.cache import AnswerCache
from chatumm_kit.synth.ops import Backend, BackendError, ChatMessage, Operation, OpFailed, OpOutputError
from chatumm_kit.synth.records import ImageRef
from chatumm_kit.synth.runner import OpRunner

__all__ = ["JudgePrompt", "JudgeScores", "JudgeInput", "JudgeOperation", "Verdict", "Judge", "judge_picture"]

Content = tuple[str | ImageRef, ...]
_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FENCE = re.compile(r"^```(?:json|JSON)?\s*\n?(.*?)\n?\s*```$", re.DOTALL)
_REASON_MAX = 2000


def judge_picture(image: torch.Tensor) -> ImageRef:
    """A ``uint8 [3, H, W]`` picture as the judge receives it (its cache identity is a digest of the pixels)."""
    return ImageRef.from_tensor(image.contiguous())


@dataclass(frozen=True)
class JudgeScores:
    """A parsed verdict: integer scores by name and the judge's reason."""

    scores: dict[str, int]
    reason: str


@dataclass(frozen=True, kw_only=True)
class JudgePrompt:
    """A versioned judge prompt (the module docstring describes the file).

    Attributes:
        name, version: identity; ``name@version`` is recorded with every verdict.
        system: the system message.
        template: the user message, ``{slot}`` placeholders filled by :meth:`render`.
        scores: score name → ``(lowest, highest)`` accepted integers.
        digest: SHA-256 prefix of the file's text (enters the cache key with the version).
        source: where it was read from.
    """

    name: str
    version: str
    system: str
    template: str
    scores: dict[str, tuple[int, int]]
    digest: str
    source: str = ""

    @property
    def slots(self) -> list[str]:
        """The placeholder names of the template, in order."""
        return _SLOT.findall(self.template)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def load(cls, name_or_path: str | Path) -> JudgePrompt:
        """A packaged prompt by name (``reply_quality``, ``gedit``, ``t2i_adherence``) or a YAML file by path.

        Raises:
            FileNotFoundError: no such packaged prompt or file (the packaged names are listed).
            ValueError: the file lacks a key or a score range is malformed (named).
        """
        path = Path(str(name_or_path))
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.is_file():
                raise FileNotFoundError(f"judge prompt file not found: {path}")
            text, source = path.read_text(encoding="utf-8"), str(path)
        else:
            packaged = resources.files("chatumm_kit.eval") / "prompts" / f"{name_or_path}.yaml"
            if not packaged.is_file():
                known = sorted(p.name.removesuffix(".yaml") for p in (resources.files("chatumm_kit.eval") / "prompts")
                               .iterdir() if p.name.endswith(".yaml"))  # fmt: skip
                raise FileNotFoundError(f"no judge prompt named {name_or_path!r}; packaged prompts: {known}")
            text, source = packaged.read_text(encoding="utf-8"), f"chatumm_kit/eval/prompts/{name_or_path}.yaml"
        data = yaml.safe_load(text)
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a judge prompt must be a YAML mapping")
        missing = [k for k in ("name", "version", "system", "template", "scores") if k not in data]
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        scores: dict[str, tuple[int, int]] = {}
        for key, rng in dict(data["scores"]).items():
            if key == "reason" or not (
                isinstance(rng, list) and len(rng) == 2 and all(type(v) is int for v in rng) and rng[0] < rng[1]
            ):
                raise ValueError(f"{source}: scores.{key} must be [lowest, highest] integers (and not 'reason')")
            scores[str(key)] = (rng[0], rng[1])
        if not scores:
            raise ValueError(f"{source}: scores is empty")
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            system=str(data["system"]).strip(),
            template=str(data["template"]),
            scores=scores,
            digest=hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
            source=source,
        )

    def render(self, values: Mapping[str, str | Sequence[str | ImageRef]]) -> Content:
        """The user message's content: the template with every slot replaced by its text or its parts in place.

        Raises:
            KeyError: a slot has no value, or a value names no slot.
        """
        missing = [s for s in self.slots if s not in values]
        extra = sorted(set(values) - set(self.slots))
        if missing or extra:
            raise KeyError(f"judge prompt {self.label}: missing slots {missing}, unknown values {extra}")
        out: list[str | ImageRef] = []
        text = ""
        pos = 0
        for m in _SLOT.finditer(self.template):
            text += self.template[pos : m.start()]
            pos = m.end()
            value = values[m.group(1)]
            for part in [value] if isinstance(value, str) else value:
                if isinstance(part, str):
                    text += part
                else:
                    if text:
                        out.append(text)
                    out.append(part)
                    text = ""
        text += self.template[pos:]
        if text:
            out.append(text)
        return tuple(out)

    def schema(self) -> str:
        return json.dumps({**{k: f"<integer {lo}-{hi}>" for k, (lo, hi) in self.scores.items()}, "reason": "..."})

    def parse(self, text: str) -> JudgeScores:
        """Strictly parse a raw verdict (rules in the module docstring); raises ``OpOutputError`` with a code:
        ``malformed_json``, ``missing_field``, ``unexpected_field``, ``wrong_type``, ``out_of_range``."""
        raw = text.strip()
        fenced = _FENCE.match(raw)
        if fenced:
            raw = fenced.group(1).strip()
        if not raw.startswith("{"):
            raise OpOutputError("malformed_json", f"expected one JSON object, got {raw[:80]!r}")
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise OpOutputError("malformed_json", f"{e.msg} at char {e.pos}: {raw[:80]!r}") from None
        if not isinstance(obj, dict):
            raise OpOutputError("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
        want = [*self.scores, "reason"]
        for key in want:
            if key not in obj:
                raise OpOutputError("missing_field", f"missing key {key!r} (got {sorted(obj)})")
        extra = sorted(set(obj) - set(want))
        if extra:
            raise OpOutputError("unexpected_field", f"unexpected keys {extra} (expected exactly {want})")
        scores: dict[str, int] = {}
        for key, (lo, hi) in self.scores.items():
            value = obj[key]
            if type(value) is not int:  # bool, float, "7": not an integer score
                raise OpOutputError("wrong_type", f"{key!r} must be an integer, got {value!r}")
            if not lo <= value <= hi:
                raise OpOutputError("out_of_range", f"{key!r} = {value} is outside [{lo}, {hi}]")
            scores[key] = value
        reason = obj["reason"]
        if not isinstance(reason, str) or not reason.strip():
            raise OpOutputError("wrong_type", f"'reason' must be a non-empty string, got {reason!r}")
        return JudgeScores(scores=scores, reason=reason.strip()[:_REASON_MAX])


@dataclass(frozen=True)
class JudgeInput:
    """The rendered user content of one judge call (texts and pictures, in order)."""

    content: Content


class JudgeOperation(Operation):
    """A :class:`JudgePrompt` as an atomic operation (name ``judge/<name>``, version ``<version>+<digest>``)."""

    input_type = JudgeInput
    output_type = JudgeScores

    def __init__(self, prompt: JudgePrompt) -> None:
        super().__init__()
        self.prompt = prompt
        self.name = f"judge/{prompt.name}"  # type: ignore[misc]  (instance value of a ClassVar, per prompt)
        self.version = f"{prompt.version}+{prompt.digest}"  # type: ignore[misc]
        self.system = prompt.system  # type: ignore[misc]

    def schema(self) -> str:
        return self.prompt.schema()

    def user_content(self, inputs: JudgeInput) -> Content:
        return inputs.content

    def parse(self, text: str) -> JudgeScores:
        return self.prompt.parse(text)


@dataclass
class Verdict:
    """The judge's verdict on one item.

    Attributes:
        prompt: ``name@version`` of the prompt.
        scores: integer scores by name; None when no verdict could be obtained.
        reason: the judge's reason (None with no verdict).
        error: why there is no verdict: ``unparseable:<code>`` (every attempt rejected) or ``backend: ...``.
        attempts: the rejection of each rejected attempt, in order.
        raw: the last raw answer when every attempt was rejected (what the judge actually said).
    """

    prompt: str
    scores: dict[str, int] | None = None
    reason: str | None = None
    error: str | None = None
    attempts: list[str] = field(default_factory=list)
    raw: str | None = None

    @property
    def ok(self) -> bool:
        return self.scores is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "scores": self.scores,
            "reason": self.reason,
            "error": self.error,
            "attempts": list(self.attempts),
            "raw": self.raw,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        return cls(
            prompt=str(d["prompt"]),
            scores=None if d.get("scores") is None else {str(k): int(v) for k, v in d["scores"].items()},
            reason=d.get("reason"),
            error=d.get("error"),
            attempts=[str(a) for a in d.get("attempts") or []],
            raw=d.get("raw"),
        )


class Judge:
    """Verdicts from a backend through versioned prompts, cached and in parallel.

    Args:
        backend: any :class:`~chatumm_kit.synth.ops.Backend`, usually
            :class:`~chatumm_kit.synth.backends.OpenAIChatBackend` (its ``max_concurrency`` also bounds requests).
        cache: an :class:`~chatumm_kit.synth.cache.AnswerCache`, or the path of its sqlite file; None: no cache.
        max_concurrency: verdicts requested at once (threads).
        max_attempts: tries per verdict when an answer is rejected (each is recorded).

    Attributes:
        runner: the :class:`~chatumm_kit.synth.runner.OpRunner` (its ``stats`` count backend calls and cache hits).
    """

    def __init__(
        self,
        *,
        backend: Backend,
        cache: AnswerCache | str | Path | None = None,
        max_concurrency: int = 8,
        max_attempts: int = 2,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"Judge.max_concurrency must be >= 1, got {max_concurrency}")
        store = AnswerCache(path=cache) if isinstance(cache, str | Path) else cache
        self.runner = OpRunner(backend=backend, cache=store, max_attempts=max_attempts)
        self.max_concurrency = max_concurrency
        self._prompts: dict[str, JudgePrompt] = {}

    @property
    def model_id(self) -> str:
        return self.runner.model_id

    def prompt(self, name_or_path: str | Path) -> JudgePrompt:
        """Load (once) and register a prompt; returns it."""
        key = str(name_or_path)
        if key not in self._prompts:
            prompt = JudgePrompt.load(name_or_path)
            op = JudgeOperation(prompt)
            self.runner.registry[op.name] = op
            self._prompts[key] = prompt
        return self._prompts[key]

    def verdict(self, prompt: JudgePrompt, content: Content) -> Verdict:
        """One verdict (never raises for a bad answer or a failed transport: the :class:`Verdict` says why)."""
        try:
            out = self.runner.run(f"judge/{prompt.name}", JudgeInput(content=tuple(content)))
        except OpFailed as e:
            return Verdict(prompt=prompt.label, error=f"unparseable:{e.code}", attempts=e.errors, raw=e.last_answer)
        except BackendError as e:
            return Verdict(prompt=prompt.label, error=f"backend: {e}")
        return Verdict(prompt=prompt.label, scores=dict(out.scores), reason=out.reason)

    def verdicts(self, prompt: str | Path | JudgePrompt, contents: Sequence[Content]) -> list[Verdict]:
        """Verdicts for many items, ``max_concurrency`` at a time, in input order."""
        p = prompt if isinstance(prompt, JudgePrompt) else self.prompt(prompt)
        if isinstance(prompt, JudgePrompt) and f"judge/{p.name}" not in self.runner.registry:
            self.runner.registry[f"judge/{p.name}"] = JudgeOperation(p)
        if len(contents) <= 1 or self.max_concurrency == 1:
            return [self.verdict(p, c) for c in contents]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(contents))) as pool:
            return list(pool.map(lambda c: self.verdict(p, c), contents))

    def describe(self) -> dict[str, Any]:
        """What the report records about the judge."""
        return {"model": self.model_id, "backend": type(self.runner.backend).__name__, "prompts": {
            p.name: {"version": p.version, "digest": p.digest, "source": p.source} for p in self._prompts.values()}}  # fmt: skip


def as_messages(prompt: JudgePrompt, content: Content) -> list[ChatMessage]:
    """The chat messages a judge call sends (for reading and tests)."""
    return JudgeOperation(prompt).messages(JudgeInput(content=tuple(content)))
