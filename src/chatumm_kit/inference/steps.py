"""The model work a reply asks for, one step at a time: what lets several chat sessions share one forward pass.

:meth:`ChatSession.reply_steps <chatumm_kit.inference.session.ChatSession.reply_steps>` writes a reply as a
generator: everything a session does on its own (choosing tokens, embedding a finished segment, decoding an image,
appending it to its contexts) runs inside the generator, and each call of the model that repeats many times per
reply is *yielded* as a step for whoever drives it:

* :class:`TokenStep` — commit one decoded text token into a context; the answer is its ``[D]`` output;
* :class:`VelocityStep` — the guided velocity of one noised image view at time ``t`` over the session's CFG contexts
  (SPEC §4); the answer is ``[N, p²C]`` float32.

:func:`run_alone` answers one step with the session's own :class:`~.context.StreamRunner` (one forward per
context: what :meth:`ChatSession.respond` does); ``inference/batch.py`` answers the steps of several sessions with
one forward.

Example:
    >>> steps = session.reply_steps(sampler=SamplerConfig(num_steps=4, seed=0))     # doctest: +SKIP
    >>> reply = drive_alone(steps, session.runner)                                   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TypeVar

import torch

from chatumm_kit.inference.context import CacheContext, StreamRunner
from chatumm_kit.inference.sampler import SamplerConfig, active_unconditional, guided_velocity

__all__ = ["ModelStep", "ReplySteps", "TokenStep", "VelocityStep", "drive_alone", "run_alone"]


@dataclass(frozen=True)
class TokenStep:
    """Commit ``token_id`` at ``context.position`` (inside an open text split); answer: its ``[D]`` output."""

    context: CacheContext
    token_id: int


@dataclass(frozen=True)
class VelocityStep:
    """The CFG-guided velocity of a noised view ``x_t [N, p²C]`` at time ``t`` (``N = grid[0]·grid[1]``).

    Attributes:
        full: the full context.
        text_uncond, image_uncond: the unconditional contexts; ``None`` when one equals ``full`` (not run).
        x_t: ``[N, p²C]`` float latents at time ``t``.
        t: the time.
        grid: ``(rows, cols)`` of the latent token grid.
        config: the sampler settings (scales, interval, renorm).
    """

    full: CacheContext
    text_uncond: CacheContext | None
    image_uncond: CacheContext | None
    x_t: torch.Tensor
    t: float
    grid: tuple[int, int]
    config: SamplerConfig

    def contexts(self) -> list[CacheContext]:
        """The contexts whose velocity :func:`guided_velocity` needs at ``t``, full first (see
        :func:`~.sampler.active_unconditional`)."""
        use_text, use_image = active_unconditional(
            self.t,
            self.config,
            has_text_uncond=self.text_uncond is not None,
            has_image_uncond=self.image_uncond is not None,
        )
        return [self.full, *([self.text_uncond] if use_text else []), *([self.image_uncond] if use_image else [])]

    def combine(self, velocities: dict[int, torch.Tensor]) -> torch.Tensor:
        """The guided velocity from the per-context velocities ``{id(context): [N, p²C]}`` of :meth:`contexts`."""

        def lookup(ctx: CacheContext | None):
            return None if ctx is None else (lambda x, t: velocities[id(ctx)])

        velocity = guided_velocity(
            full=lookup(self.full),
            text_uncond=lookup(self.text_uncond),
            image_uncond=lookup(self.image_uncond),
            config=self.config,
        )
        return velocity(self.x_t, self.t)


ModelStep = TokenStep | VelocityStep
"""One step a reply asks for."""

T = TypeVar("T")
ReplySteps = Generator[ModelStep, torch.Tensor, T]
"""A reply in progress: yields :data:`ModelStep` s, is sent their answers, returns its result."""


def run_alone(runner: StreamRunner, step: ModelStep) -> torch.Tensor:
    """Answer ``step`` on its own: one forward per context (exactly what a session without batching runs)."""
    if isinstance(step, TokenStep):
        return runner.step(step.context, step.token_id)
    if isinstance(step, VelocityStep):

        def context_velocity(ctx: CacheContext | None):
            return None if ctx is None else (lambda x, t: runner.noised_velocity(ctx, x, t, step.grid))

        velocity = guided_velocity(
            full=context_velocity(step.full),
            text_uncond=context_velocity(step.text_uncond),
            image_uncond=context_velocity(step.image_uncond),
            config=step.config,
        )
        return velocity(step.x_t, step.t)
    raise TypeError(f"run_alone: not a model step: {step!r}")


@torch.no_grad()
def drive_alone(steps: ReplySteps[T], runner: StreamRunner) -> T:
    """Run a reply to its end, answering every step with :func:`run_alone`; returns the generator's result."""
    try:
        step = next(steps)
        while True:
            step = steps.send(run_alone(runner, step))
    except StopIteration as done:
        return done.value
    except BaseException:
        steps.close()  # a step failed outside the generator: let it undo what it started
        raise
