"""Who answers the benchmark: the :class:`Responder` protocol, the :class:`ChatSession` adapter and an oracle.

A responder holds one conversation at a time. The benchmark drives it turn by turn:

* ``start(dialogue_id)`` — forget everything, begin a new conversation;
* ``add_turn(role, parts)`` — append a known turn (a user turn; under teacher forcing also the *true* assistant
  turn); ``parts`` are text strings and ``uint8 [3, H, W]`` images, in order;
* ``respond(seed=...)`` — produce the next assistant turn; it is now part of the history;
* ``retract()`` — forget the reply just produced (teacher forcing then adds the true one in its place).

:class:`ChatSessionResponder` can also answer for several conversations at once: :meth:`~ChatSessionResponder.spawn`
gives a partner with its own session, and :meth:`~ChatSessionResponder.respond_together` lets several reply with one
model forward per decoding / Euler step (the benchmark's ``batch_size``).

:class:`ChatSessionResponder` wraps :class:`~chatumm_kit.inference.session.ChatSession` (``retract`` is a
``rollback`` of the reply's turn); :class:`OracleResponder` answers every turn with the ground truth and must score
1.0 on everything, which proves the scorer and the ground truth agree. Test fakes implement the same four methods.

Example:
    >>> responder = ChatSessionResponder.from_model(model, tokenizer, world=WorldConfig())   # doctest: +SKIP
    >>> responder.start("d0"); responder.add_turn(Role.USER, ["Draw a red circle in the center."])  # doctest: +SKIP
    >>> responder.respond(seed=0).modality                                                     # doctest: +SKIP
    'image'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import DialogueSample, ImageSegment, Role
from chatumm_kit.data.shapes import WorldConfig
from chatumm_kit.eval.turns import Part, Reply, expected_turns
from chatumm_kit.inference.batch import respond_batch
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.session import AssistantReply, ChatSession, SessionConfig
from chatumm_kit.model import ChatUMM

__all__ = ["Responder", "ReplySettings", "ChatSessionResponder", "OracleResponder"]


@runtime_checkable
class Responder(Protocol):
    """Anything that can hold a conversation for the benchmark (see the module docstring)."""

    def start(self, dialogue_id: str) -> None: ...

    def add_turn(self, role: Role, parts: Sequence[Part]) -> None: ...

    def respond(self, *, seed: int) -> Reply: ...

    def retract(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class ReplySettings:
    """How a model replies during the benchmark (keyword arguments of :meth:`ChatSession.respond`).

    Attributes:
        max_new_tokens: cap per text segment (a two-object caption needs about 30 tokens of a 512-token BPE).
        max_segments: cap on segments per reply (an interleaved reply has 2).
        temperature, top_p: text and intent decoding (0 = greedy, the deterministic default).
        sampler: image sampling (steps, shift, CFG); its ``seed`` is replaced per turn by the benchmark's.

    Example:
        >>> ReplySettings(sampler=SamplerConfig(num_steps=4)).sampler.num_steps
        4
    """

    max_new_tokens: int = 48
    max_segments: int = 3
    temperature: float = 0.0
    top_p: float = 1.0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def to_dict(self) -> dict:
        return {
            "max_new_tokens": self.max_new_tokens,
            "max_segments": self.max_segments,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "sampler": dataclasses.asdict(self.sampler),
        }


class ChatSessionResponder:
    """A :class:`Responder` over a :class:`ChatSession` (one KV-cached conversation, reset per dialogue).

    Args:
        session: the chat session (its model is put in eval mode by the session).
        settings: reply settings.
    """

    def __init__(self, *, session: ChatSession, settings: ReplySettings = ReplySettings()) -> None:
        self.session = session
        self.settings = settings
        self._last_reply: int | None = None

    @classmethod
    def from_model(
        cls,
        model: ChatUMM,
        tokenizer: ChatTokenizer,
        *,
        world: WorldConfig,
        settings: ReplySettings = ReplySettings(),
        session_config: SessionConfig | None = None,
    ) -> ChatSessionResponder:
        """Build the session with :meth:`SessionConfig.for_model` at the world's image size unless
        ``session_config`` is given."""
        config = (
            session_config
            if session_config is not None
            else SessionConfig.for_model(model, image_size=world.image_size)
        )
        return cls(session=ChatSession(model=model, tokenizer=tokenizer, config=config), settings=settings)

    def start(self, dialogue_id: str) -> None:
        self.session.reset()
        self._last_reply = None

    def add_turn(self, role: Role, parts: Sequence[Part]) -> None:
        self.session.add_turn(role, list(parts))

    def respond(self, *, seed: int) -> Reply:
        s = self.settings
        out = self.session.respond(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            sampler=dataclasses.replace(s.sampler, seed=seed),
            max_segments=s.max_segments,
        )
        return self._keep(out)

    def spawn(self) -> ChatSessionResponder:
        """A new responder with its own (empty) session over the same model, tokenizer, stream and reply settings
        (a partner for :meth:`respond_together`)."""
        s = self.session
        return ChatSessionResponder(
            session=ChatSession(model=s.model, tokenizer=s.tokenizer, config=s.config), settings=self.settings
        )

    @staticmethod
    def respond_together(responders: Sequence[ChatSessionResponder], *, seeds: Sequence[int]) -> list[Reply]:
        """``[r.respond(seed=s) for r, s in zip(responders, seeds)]`` with one model forward per step for all of
        them (:func:`~chatumm_kit.inference.batch.respond_batch`); the responders must share one model, tokenizer
        and reply settings.

        Raises:
            ValueError: a different number of seeds, or responders with different reply settings.
        """
        if len(seeds) != len(responders):
            raise ValueError(f"respond_together: {len(seeds)} seeds for {len(responders)} responders")
        if not responders:
            return []
        s = responders[0].settings
        if any(r.settings != s for r in responders):
            raise ValueError("respond_together: the responders have different reply settings")
        outs = respond_batch(
            [r.session for r in responders],
            samplers=[dataclasses.replace(s.sampler, seed=seed) for seed in seeds],
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            max_segments=s.max_segments,
        )
        return [r._keep(out) for r, out in zip(responders, outs)]

    def _keep(self, out: AssistantReply) -> Reply:
        """Remember the reply's turn (for :meth:`retract`) and convert it to a :class:`Reply`."""
        self._last_reply = out.turn_index
        by_key = dict(zip(out.image_keys, out.images))
        parts: list[Part] = [by_key[seg.image] if isinstance(seg, ImageSegment) else seg.text for seg in out.segments]
        return Reply(parts=parts, finished=out.finished)

    def retract(self) -> None:
        if self._last_reply is None:
            raise RuntimeError("ChatSessionResponder.retract: no reply to retract")
        self.session.rollback(self._last_reply)
        self._last_reply = None


class OracleResponder:
    """Answers every turn with the true reply of the dialogue (looked up by id and by the number of user turns).

    A sanity check of the benchmark itself: it must score 1.0 on every metric and SR@k = 1 for every k.

    Args:
        samples: the dialogues it may be asked about.
        world: the world (to read the ground truth as the benchmark does).
    """

    def __init__(self, *, samples: Sequence[DialogueSample], world: WorldConfig) -> None:
        self._truth: Mapping[str, list[list[Part]]] = {
            s.dialogue.id: [e.reply for e in expected_turns(s, world)] for s in samples
        }
        self._dialogue: str | None = None
        self._users = 0

    def start(self, dialogue_id: str) -> None:
        if dialogue_id not in self._truth:
            raise KeyError(f"OracleResponder: unknown dialogue {dialogue_id!r}")
        self._dialogue, self._users = dialogue_id, 0

    def add_turn(self, role: Role, parts: Sequence[Part]) -> None:
        if Role(role) is Role.USER:
            self._users += 1

    def respond(self, *, seed: int) -> Reply:
        assert self._dialogue is not None, "start() first"
        return Reply(parts=list(self._truth[self._dialogue][self._users - 1]))

    def retract(self) -> None:
        pass
