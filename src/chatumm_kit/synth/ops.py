"""Atomic operations: named, individually testable LLM calls (SPEC §6).

An :class:`Operation` is a prompt template, a strict output parser and a validator:

* :meth:`Operation.messages` renders the prompt (images travel as :class:`~.records.ImageRef` parts);
* :meth:`Operation.parse` accepts exactly one JSON object (optionally inside one ```json fence) with exactly the
  declared string fields, else raises :class:`OpOutputError` with a code — ``malformed_json``, ``refusal``,
  ``missing_field``, ``wrong_type``, ``unexpected_field``;
* :meth:`Operation.validate` checks meaning (``invalid``, ``wrong_reference``, ``leaks_answer``, ...).

:class:`~.runner.OpRunner` runs an operation through a backend with the answer cache: on a bad answer it retries
(telling the model what was wrong) up to ``max_attempts`` times, then raises :class:`OpFailed` carrying the reason,
which the pipeline records before dropping the dialogue. LLM output is data: it is parsed, never executed.

Operations live in a registry (:data:`OPERATIONS`); add your own with :func:`register_op`.

Example:
    >>> op = get_op("caption2query")
    >>> op.parse('{"query": "Could you draw a red circle?"}')
    QueryOut(query='Could you draw a red circle?')
    >>> try:
    ...     op.parse("I'm sorry, I can't help with that.")
    ... except OpOutputError as e:
    ...     print(e.code)
    refusal
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from chatumm_kit.synth.records import ImageRef

__all__ = [
    "ChatMessage",
    "OpOutputError",
    "OpFailed",
    "BackendError",
    "Backend",
    "Operation",
    "QueryOut",
    "QAOut",
    "Caption2QueryIn",
    "Edit2QueryIn",
    "Vqa2QueryIn",
    "Query2DepQIn",
    "MakeDistractorIn",
    "Image2QAIn",
    "CaptionRequestIn",
    "Caption2Query",
    "Edit2Query",
    "Vqa2Query",
    "Query2DepQ",
    "MakeDistractor",
    "Image2QA",
    "CaptionRequest",
    "OPERATIONS",
    "register_op",
    "get_op",
    "content_words",
]


# ---------------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class ChatMessage:
    """One chat message; ``content`` mixes text and images (sent to vision models as data URLs)."""

    role: Literal["system", "user", "assistant"]
    content: tuple[str | ImageRef, ...]

    @property
    def text(self) -> str:
        return "\n".join(c for c in self.content if isinstance(c, str))


class OpOutputError(ValueError):
    """A backend answer an operation rejects; ``code`` is a short machine-readable reason."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class BackendError(RuntimeError):
    """The backend could not answer at all.

    ``stop_run``: the failure is not about this input (timeouts, 429/5xx after all retries, connection refused, a
    bad API key) — the pipeline then stops without committing the current shard, so a rerun resumes there once the
    backend is healthy. Otherwise (an HTTP 400 for this input) only the dialogue is dropped.
    """

    def __init__(self, message: str, *, stop_run: bool = True) -> None:
        super().__init__(message)
        self.stop_run = stop_run


class OpFailed(Exception):
    """An operation gave no valid answer in ``max_attempts`` tries; ``reason`` is ``"<op>:<code>"``."""

    def __init__(self, op: str, errors: Sequence[str], *, code: str, last_answer: str = "") -> None:
        super().__init__(f"{op} failed after {len(errors)} attempt(s): {'; '.join(errors)}")
        self.op = op
        self.code = code
        self.errors = list(errors)
        self.last_answer = last_answer

    @property
    def reason(self) -> str:
        return f"{self.op}:{self.code}"


@runtime_checkable
class Backend(Protocol):
    """Answers operation calls with raw text.

    A backend should also have a ``model_id`` string (attribute or property): it enters the cache key, so answers of
    different models never mix. (It is not a protocol member so that recipes can type-check backends by class.)
    """

    def answer(self, op: Operation, inputs: Any, *, attempt: int, feedback: Sequence[ChatMessage]) -> str:
        """The raw answer to ``op`` on ``inputs``; ``feedback`` holds earlier rejected answers and why (retries)."""
        ...


# ---------------------------------------------------------------------------------------------------- text checks

_STOP = frozenset(
    "a an the and or of to in on at for with by from is are was were be been it its this that these those there "
    "here please could would can you your me my i we our us can will shall should do does did make made now then "
    "some any one picture image photo pic just also into onto as so what which who how where when why show draw "
    "create generate give let lets s t".split()
)
_WORD = re.compile(r"[a-z0-9]+")
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry[, ]|i can'?t|i cannot|i can not|i'?m unable|i am unable|as an ai|i won'?t"
    r"|i will not|i'?m not able|i am not able|unfortunately)",
    re.IGNORECASE,
)
_FENCE = re.compile(r"^```(?:json|JSON)?\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def _stem(w: str) -> str:
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def content_words(text: str) -> set[str]:
    """Lower-cased, crudely singularised words of ``text`` minus stop words (for overlap checks)."""
    return {_stem(w) for w in _WORD.findall(text.lower().replace("colour", "color")) if w not in _STOP}


def _overlap(src: str, out: str) -> float:
    want = content_words(src)
    return 1.0 if not want else len(want & content_words(out)) / len(want)


def _check_text(name: str, text: str, *, max_chars: int) -> None:
    if not text.strip():
        raise OpOutputError("invalid", f"{name} is empty")
    if len(text) > max_chars:
        raise OpOutputError("invalid", f"{name} is {len(text)} characters (max {max_chars})")
    if _REFUSAL.search(text):
        raise OpOutputError("refusal", f"{name} is a refusal: {text[:80]!r}")
    if re.search(r"\{[a-z_]+\}", text):
        raise OpOutputError("invalid", f"{name} holds an unfilled template slot: {text[:80]!r}")


# ---------------------------------------------------------------------------------------------------- base class


@dataclass(frozen=True)
class QueryOut:
    query: str


@dataclass(frozen=True)
class QAOut:
    question: str
    answer: str


def _jsonable(value: Any) -> Any:
    if isinstance(value, ImageRef):
        return {"image": value.key}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


_INTERNAL_KEY = re.compile(r"\b(?:img|image|pic)[_-]?\d+\b", re.IGNORECASE)  # "img1", "image_3": pipeline ids


class Operation:
    """Base of every atomic operation.

    Subclasses set ``name``, ``input_type``, ``output_type`` (a dataclass of ``str`` fields), ``instruction`` (a
    ``str.format`` template over the input's fields) and override :meth:`validate`; :meth:`user_content` when the
    prompt needs images. Bump ``version`` when the prompt changes so old cached answers stop matching.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    input_type: ClassVar[type] = object
    output_type: ClassVar[type] = QueryOut
    system: ClassVar[str] = (
        "You turn dataset annotations into natural messages for training a multimodal chat assistant. "
        "Reply with a single JSON object and nothing else."
    )
    instruction: ClassVar[str] = ""

    def __init__(self, *, max_chars: int = 400) -> None:
        self.max_chars = max_chars

    # -- prompt
    def schema(self) -> str:
        return json.dumps({f.name: "..." for f in dataclasses.fields(self.output_type)})

    def user_content(self, inputs: Any) -> tuple[str | ImageRef, ...]:
        values = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}
        text = self.instruction.format(**values)
        return (f"{text}\nAnswer with JSON only, exactly these keys: {self.schema()}",)

    def messages(self, inputs: Any) -> list[ChatMessage]:
        return [ChatMessage("system", (self.system,)), ChatMessage("user", self.user_content(inputs))]

    def cache_inputs(self, inputs: Any) -> Any:
        """The JSON-able identity of ``inputs`` (images by key) for the cache key."""
        return _jsonable(inputs)

    # -- parse and validate
    def parse(self, text: str) -> Any:
        """Strictly parse a raw answer into ``output_type``; raise :class:`OpOutputError` on any deviation."""
        raw = text.strip()
        fenced = _FENCE.match(raw)
        if fenced:
            raw = fenced.group(1).strip()
        if not raw.startswith("{"):
            if _REFUSAL.search(raw):
                raise OpOutputError("refusal", f"the model refused: {raw[:80]!r}")
            raise OpOutputError("malformed_json", f"expected one JSON object, got {raw[:80]!r}")
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise OpOutputError("malformed_json", f"{e.msg} at char {e.pos}") from None
        if not isinstance(obj, dict):
            raise OpOutputError("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
        names = [f.name for f in dataclasses.fields(self.output_type)]
        for n in names:
            if n not in obj:
                raise OpOutputError("missing_field", f"missing key {n!r} (got {sorted(obj)})")
            if not isinstance(obj[n], str):
                raise OpOutputError("wrong_type", f"key {n!r} must be a string, got {type(obj[n]).__name__}")
        extra = sorted(set(obj) - set(names))
        if extra:
            raise OpOutputError("unexpected_field", f"unexpected keys {extra} (expected exactly {names})")
        out = self.output_type(**{n: obj[n].strip() for n in names})
        for n in names:
            _check_text(n, getattr(out, n), max_chars=self.max_chars)
        return out

    def validate(self, inputs: Any, output: Any) -> None:
        """Raise :class:`OpOutputError` when ``output`` is well-formed but wrong for ``inputs``."""

    def __call__(self, text: str, inputs: Any) -> Any:
        """Parse and validate in one go."""
        out = self.parse(text)
        self.validate(inputs, out)
        return out


# ---------------------------------------------------------------------------------------------------- operations

Context = Literal["uploaded", "previous"]


@dataclass(frozen=True)
class Caption2QueryIn:
    caption: str
    truth: dict | None = None


@dataclass(frozen=True)
class Edit2QueryIn:
    instruction: str
    context: Context = "previous"
    truth: dict | None = None


@dataclass(frozen=True)
class Vqa2QueryIn:
    question: str
    answer: str
    context: Context = "uploaded"
    truth: dict | None = None


@dataclass(frozen=True)
class CaptionRequestIn:
    context: Context = "uploaded"
    truth: dict | None = None


@dataclass(frozen=True)
class Query2DepQIn:
    """``target``: a description of the picture the query acts on (``""`` when none is known); ``others``:
    descriptions of the other pictures in the history (the reference must not fit them); ``distance``: unrelated
    turns in between; ``target_image``: the picture itself, shown to the model when there is no description (a
    vision model then refers to it by what it shows)."""

    query: str
    target: str
    others: tuple[str, ...] = ()
    distance: int = 1
    truth: dict | None = None
    target_image: ImageRef | None = None


@dataclass(frozen=True)
class MakeDistractorIn:
    """``topic``: what the distractor should be about; ``avoid``: descriptions of the dialogue's subjects; ``seed``:
    a variant number so distractors of different dialogues differ (and cache apart)."""

    topic: str
    avoid: tuple[str, ...] = ()
    seed: int = 0
    truth: dict | None = None


@dataclass(frozen=True)
class Image2QAIn:
    image: ImageRef
    description: str | None = None
    truth: dict | None = None


class Caption2Query(Operation):
    """A caption becomes a generation request ("a red circle" → "Could you draw a red circle?")."""

    name = "caption2query"
    input_type = Caption2QueryIn
    instruction = (
        "Rewrite this image caption as a natural request a user would send to an assistant that can draw. "
        "Keep every detail of the caption. Caption: {caption!r}"
    )

    def __init__(self, *, max_chars: int = 400, min_overlap: float = 0.5) -> None:
        super().__init__(max_chars=max_chars)
        self.min_overlap = min_overlap

    def validate(self, inputs: Caption2QueryIn, output: QueryOut) -> None:
        ov = _overlap(inputs.caption, output.query)
        if ov < self.min_overlap:
            raise OpOutputError("invalid", f"query keeps {ov:.0%} of the caption's words (min {self.min_overlap:.0%})")


class Edit2Query(Operation):
    """An edit instruction becomes a user request, phrased for an uploaded picture or for the previous result."""

    name = "edit2query"
    input_type = Edit2QueryIn
    instruction = (
        "Rewrite this image-editing instruction as a natural user request. The picture to edit is {context} "
        "('uploaded': the user attaches it now; 'previous': it is the assistant's last picture, refer to it "
        "implicitly). Instruction: {instruction!r}"
    )

    def __init__(self, *, max_chars: int = 400, min_overlap: float = 0.5) -> None:
        super().__init__(max_chars=max_chars)
        self.min_overlap = min_overlap

    def validate(self, inputs: Edit2QueryIn, output: QueryOut) -> None:
        ov = _overlap(inputs.instruction, output.query)
        if ov < self.min_overlap:
            raise OpOutputError("invalid", f"query keeps {ov:.0%} of the instruction's words")


class Vqa2Query(Operation):
    """A dataset question becomes a natural user question; it must not give the answer away."""

    name = "vqa2query"
    input_type = Vqa2QueryIn
    instruction = (
        "Rewrite this visual question as a natural user message about a picture that is {context}. Do not reveal "
        "the answer ({answer!r}). Question: {question!r}"
    )

    def __init__(self, *, max_chars: int = 400, min_overlap: float = 0.4) -> None:
        super().__init__(max_chars=max_chars)
        self.min_overlap = min_overlap

    def validate(self, inputs: Vqa2QueryIn, output: QueryOut) -> None:
        ov = _overlap(inputs.question, output.query)
        if ov < self.min_overlap:
            raise OpOutputError("invalid", f"query keeps {ov:.0%} of the question's words")
        leaked = (content_words(inputs.answer) - content_words(inputs.question) - {"yes", "no"}) & content_words(
            output.query
        )
        if leaked:
            raise OpOutputError("leaks_answer", f"query gives away the answer ({sorted(leaked)})")


class CaptionRequest(Operation):
    """A request to describe a picture (uploaded now, or the previous one)."""

    name = "caption_request"
    input_type = CaptionRequestIn
    instruction = (
        "Write a short natural user message asking the assistant to describe a picture that is {context} "
        "('uploaded': attached now; 'previous': the assistant's last picture)."
    )


class Query2DepQ(Operation):
    """Rewrite a query so it names the earlier picture it acts on and can only be resolved from history.

    Validation: the rewrite must differ from the query, keep its request, and identify the target: when some word
    describes the target and no other picture, the rewrite must use one; words it adds that fit only another picture
    (and none that fit only the target) are a ``wrong_reference``.
    """

    name = "query2dep_q"
    input_type = Query2DepQIn
    instruction = (
        "In a long chat, the user now returns to an earlier picture, {distance} unrelated turn(s) ago. Rewrite the "
        "request so it explicitly identifies that picture and could only be resolved from the chat history, e.g. "
        "'Go back to the cat picture from the start and make it night-time.' Request: {query!r}. The earlier "
        "picture: {target}. Other pictures in the chat (do not describe them): {others!r}"
    )
    _SHOWN = "the attached image (refer to it by what it shows, never by a file name or an id)"

    def __init__(self, *, max_chars: int = 400, min_overlap: float = 0.5) -> None:
        super().__init__(max_chars=max_chars)
        self.min_overlap = min_overlap

    def user_content(self, inputs: Query2DepQIn) -> tuple[str | ImageRef, ...]:
        target = repr(inputs.target) if inputs.target else self._SHOWN
        text = self.instruction.format(
            distance=inputs.distance, query=inputs.query, target=target, others=list(inputs.others)
        )
        text = f"{text}\nAnswer with JSON only, exactly these keys: {self.schema()}"
        return (inputs.target_image, text) if inputs.target_image is not None and not inputs.target else (text,)

    def cache_inputs(self, inputs: Query2DepQIn) -> Any:
        out = _jsonable(inputs)
        if inputs.target_image is None:
            del out["target_image"]  # keys of calls without an image stay what they were
        return out

    def validate(self, inputs: Query2DepQIn, output: QueryOut) -> None:
        if content_words(output.query) == content_words(inputs.query):
            raise OpOutputError("invalid", "the rewrite adds no reference to the earlier picture")
        if _INTERNAL_KEY.search(output.query):
            raise OpOutputError(
                "invalid", f"refers to the picture by an internal id ({_INTERNAL_KEY.search(output.query).group(0)!r})"
            )
        ov = _overlap(inputs.query, output.query)
        if (
            len(content_words(inputs.query)) >= 3 and ov < self.min_overlap
        ):  # short generic asks ("describe it") excepted
            raise OpOutputError("invalid", f"the rewrite keeps {ov:.0%} of the request's words")
        got = content_words(output.query)
        added = got - content_words(inputs.query)
        target = content_words(inputs.target)
        others = set().union(*(content_words(o) for o in inputs.others)) if inputs.others else set()
        own, foreign = target - others, others - target
        if added & foreign and not added & own:
            raise OpOutputError("wrong_reference", f"names another picture ({sorted(added & foreign)})")
        if own and not got & own:
            raise OpOutputError("invalid", f"does not identify the target picture (use one of {sorted(own)})")


class MakeDistractor(Operation):
    """An unrelated text exchange (query + answer) about ``topic`` that must not touch the dialogue's subjects."""

    name = "make_distractor"
    input_type = MakeDistractorIn
    output_type = QAOut
    instruction = (
        "Write one short, self-contained user question about {topic} and the assistant's answer. It must have "
        "nothing to do with these subjects: {avoid!r}. Variant #{seed}."
    )

    def schema(self) -> str:
        return json.dumps({"question": "...", "answer": "..."})

    def validate(self, inputs: MakeDistractorIn, output: QAOut) -> None:
        avoid = set().union(*(content_words(a) for a in inputs.avoid)) if inputs.avoid else set()
        hit = content_words(output.question) & avoid
        if hit:
            raise OpOutputError("invalid", f"the distractor mentions the dialogue's subject ({sorted(hit)})")


class Image2QA(Operation):
    """A question–answer pair about one picture (used for interleaved replies and follow-up questions)."""

    name = "image2qa"
    input_type = Image2QAIn
    output_type = QAOut
    instruction = (
        "Look at the picture and write one question a user could ask about it and its correct, short answer "
        "(at most {max_answer_words} words). What is known about the picture: {description!r}"
    )

    def __init__(self, *, max_chars: int = 400, max_answer_words: int = 30) -> None:
        super().__init__(max_chars=max_chars)
        self.max_answer_words = max_answer_words

    def user_content(self, inputs: Image2QAIn) -> tuple[str | ImageRef, ...]:
        text = self.instruction.format(max_answer_words=self.max_answer_words, description=inputs.description or "")
        return (inputs.image, f"{text}\nAnswer with JSON only, exactly these keys: {self.schema()}")

    def validate(self, inputs: Image2QAIn, output: QAOut) -> None:
        if not output.question.rstrip().endswith("?"):
            raise OpOutputError("invalid", f"the question does not end with '?': {output.question[:80]!r}")
        n = len(output.answer.split())
        if n > self.max_answer_words:
            raise OpOutputError("invalid", f"the answer has {n} words (max {self.max_answer_words})")


# ---------------------------------------------------------------------------------------------------- registry

OPERATIONS: dict[str, Operation] = {}


def register_op(op: Operation, *, replace: bool = False) -> Operation:
    """Add an operation instance to the global registry (``replace=True`` to swap a built-in's settings)."""
    if not op.name:
        raise ValueError(f"register_op: {type(op).__name__} has no name")
    if op.name in OPERATIONS and not replace:
        raise ValueError(f"register_op: an operation named {op.name!r} exists; pass replace=True to swap it")
    OPERATIONS[op.name] = op
    return op


def get_op(name: str, registry: Mapping[str, Operation] | None = None) -> Operation:
    reg = OPERATIONS if registry is None else registry
    if name not in reg:
        raise KeyError(f"unknown operation {name!r}; registered: {sorted(reg)}")
    return reg[name]


for _op in (Caption2Query(), Edit2Query(), Vqa2Query(), CaptionRequest(), Query2DepQ(), MakeDistractor(), Image2QA()):
    register_op(_op)
