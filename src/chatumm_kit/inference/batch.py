"""Several chat sessions replying together: one model forward per step for all of them.

:func:`respond_batch` drives the replies of several independent :class:`~.session.ChatSession` s in lockstep. Each
reply is the generator :meth:`ChatSession.reply_steps` (``inference/steps.py``); at every tick each unfinished
session has exactly one pending step — a decoded token to commit (:class:`~.steps.TokenStep`) or an Euler step of
an image (:class:`~.steps.VelocityStep`) — and :func:`run_together` answers all of them with **one** forward
(``ChatUMM.forward_chunks``, the backbone's one routing loop): one chunk per token step, and one noised-view chunk per CFG context
that each velocity step needs at its ``t``. Sessions may be at different stages (one decoding text while another
samples an image: both go into the same forward), may use different sampler settings (steps, CFG scales and
interval, seeds, image sizes), and drop out when their reply ends. What runs once per segment — choosing tokens,
prefilling a finished segment into the contexts, decoding an image — stays inside each session.

**Same replies.** Every session draws from its own seeded generator and runs the same reply code as
:meth:`ChatSession.respond`; only the arithmetic of the stacked forward differs: a matrix product over more rows may
sum in another order (on CPU, one row alone and the same row among others already differ), about 1e-7 relative in
float32. Text, intents and caches then agree to that rounding. A generated image re-enters the contexts from its
``uint8`` pixels, and rounding can push a pixel across a ``uint8`` step: the image then differs by one level there
and the caches after it by ~1e-3 (seen on CPU in float32 for 2 of 11 images in one trial). In float64 the rounding
is ~1e-16 and the replies, images and caches are identical (the tests check both).

**When it pays.** It saves per-op overhead and small matrix products, i.e. where one session's step is too small to
keep the machine busy (small models, CPU). ``benchmarks/bench_sessions.py`` (CPU, 1 thread, ``chatumm_tiny``):
8 sessions reply 2.4× faster than one by one with text and 1.65× with images (a lone session already stacks
one image's CFG contexts into one forward, see :meth:`ChatSession.respond`). A lone decoding step (one session
left, or one session) is answered by the plain cached step, which is cheaper for one token.

Example:
    >>> replies = respond_batch([s1, s2, s3], samplers=[SamplerConfig(num_steps=20, seed=i) for i in range(3)])
    ...                                                                                     # doctest: +SKIP
    >>> [r.intents for r in replies]                                                         # doctest: +SKIP
    [['text', 'end'], ['image', 'end'], ['text', 'end']]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.session import AssistantReply, ChatSession
from chatumm_kit.inference.steps import ModelStep, ReplySteps, TokenStep, run_alone, run_together
from chatumm_kit.model import ChatUMM

__all__ = ["respond_batch", "run_together"]


@torch.no_grad()
def respond_batch(
    sessions: Sequence[ChatSession],
    *,
    samplers: SamplerConfig | Sequence[SamplerConfig | None] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_segments: int = 4,
    modes: str | Sequence[str] = "auto",
) -> list[AssistantReply]:
    """Let every session reply to its pending user turn, with one model forward per step for all of them.

    Same result as ``[s.respond(sampler=c, ...) for s, c in zip(sessions, samplers)]`` (see the module docstring
    for rounding), with the same effect on each session. All-or-nothing: if any reply fails, every session is left
    as it was before the call.

    Args:
        sessions: distinct sessions over one model and tokenizer, each ending with a user turn.
        samplers: one :class:`SamplerConfig` per session (its ``seed`` seeds that session's draws), or one for
            all, or None (``SamplerConfig()``).
        max_new_tokens, temperature, top_p, max_segments: as in :meth:`ChatSession.respond`, for every session.
        modes: the task mode of every session (one string), or one per session (:data:`~.session.REPLY_MODES`).

    Returns:
        the replies, in the order of ``sessions``.

    Raises:
        ValueError: no sessions, a session given twice, sessions over different models or tokenizers, or a
            ``samplers`` or ``modes`` list of the wrong length.
        RuntimeError: a session whose last turn is not a user turn.
    """
    model, tokenizer = _check_sessions(sessions)
    configs = _per_session(samplers, len(sessions))
    per_mode = [modes] * len(sessions) if isinstance(modes, str) else list(modes)
    if len(per_mode) != len(sessions):
        raise ValueError(
            f"respond_batch: {len(per_mode)} modes for {len(sessions)} sessions (give one per session, or one)"
        )
    tasks: list[ReplySteps[AssistantReply]] = [
        s.reply_steps(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            sampler=c,
            max_segments=max_segments,
            mode=m,
        )
        for s, c, m in zip(sessions, configs, per_mode, strict=True)
    ]
    replies: list[AssistantReply | None] = [None] * len(tasks)
    pending: dict[int, ModelStep] = {}
    try:
        for i, task in enumerate(tasks):
            _advance(i, task, None, pending, replies)
        while pending:
            order = list(pending)
            if len(order) == 1 and isinstance(pending[order[0]], TokenStep):  # alone, the plain cached step is cheaper
                answers = [run_alone(sessions[order[0]].runner, pending[order[0]])]
            else:
                answers = run_together(model, tokenizer, [pending[i] for i in order])
            for i, answer in zip(order, answers):
                _advance(i, tasks[i], answer, pending, replies)
    except BaseException:
        for task in tasks:
            task.close()  # an unfinished reply restores its session (a finished or unstarted one: no-op)
        for session, reply in zip(sessions, replies):
            if reply is not None:
                session.undo(reply)  # its turn, and the system turn a think mode put before the user block
        raise
    return replies  # type: ignore[return-value]


def _advance(
    i: int,
    task: ReplySteps[AssistantReply],
    answer: torch.Tensor | None,
    pending: dict[int, ModelStep],
    replies: list[AssistantReply | None],
) -> None:
    """Send ``answer`` to task ``i`` (None starts it); record its next step, or its reply when it ends."""
    try:
        pending[i] = task.send(answer)
    except StopIteration as done:
        pending.pop(i, None)
        replies[i] = done.value


def _check_sessions(sessions: Sequence[ChatSession]) -> tuple[ChatUMM, ChatTokenizer]:
    if not sessions:
        raise ValueError("respond_batch: no sessions")
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("respond_batch: a session appears twice (each session can have one reply in progress)")
    first = sessions[0]
    for i, s in enumerate(sessions[1:], start=1):
        if s.model is not first.model:
            raise ValueError(
                f"respond_batch: session {i} runs another model than session 0; batched sessions must share one "
                "ChatUMM object (one forward serves them all)"
            )
        if not _same_tokenizer(s.tokenizer, first.tokenizer):
            raise ValueError(
                f"respond_batch: session {i} has another tokenizer than session 0 (vocab_size "
                f"{s.tokenizer.vocab_size} vs {first.tokenizer.vocab_size}); batched sessions must share one"
            )
    return first.model, first.tokenizer


def _same_tokenizer(a: ChatTokenizer, b: ChatTokenizer) -> bool:
    if a is b:
        return True
    return (
        a.vocab_size == b.vocab_size
        and a.special_ids == b.special_ids
        and a.special.as_dict() == b.special.as_dict()
        and a.backend.to_str() == b.backend.to_str()
    )


def _per_session(samplers: SamplerConfig | Sequence[SamplerConfig | None] | None, n: int) -> list[SamplerConfig]:
    if samplers is None or isinstance(samplers, SamplerConfig):
        return [samplers or SamplerConfig()] * n
    configs = list(samplers)
    if len(configs) != n:
        raise ValueError(f"respond_batch: {len(configs)} samplers for {n} sessions (give one per session, or one)")
    return [c or SamplerConfig() for c in configs]
