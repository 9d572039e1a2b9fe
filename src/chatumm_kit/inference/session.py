"""`ChatSession`: multi-turn interleaved chat over a `ChatUMM`, each turn prefilled once into three KV caches.

**The stream.** Turns are laid out exactly as the packer lays out a replayed dialogue (every assistant turn
``trainable=False``): text → ``im_s`` … ``im_e``; a user image, and an image the assistant generated, → clean VAE view
then ViT view — or a user image as its ViT view only when ``SessionConfig.user_image_views`` is ``"vit"`` (BAGEL's
understanding input, SPEC §4.1; the dialogue records it in ``ImageSegment.views``). Nothing is ever recomputed: a
turn's pieces are embedded once and appended to the caches that keep them (``inference/context.py``; the bookkeeping
of the three contexts is ``inference/cfg_contexts.py``) — except when an ``image`` / ``edit`` reply needs the VAE view
of a ViT-only user image: the turns from that image on are prefilled again (:class:`SessionConfig`). A generated
image re-enters from its ``uint8`` pixels (what the user sees and what :meth:`ChatSession.save` writes), so a saved
chat replays to the same caches.

**The three contexts** (SPEC §4 names them for one request; here is what each holds across turns). The *user block*
is the run of user turns since the last assistant turn (normally one turn).

* **full** — every segment of every turn.
* **text-unconditional** — ``full`` without the text segments of the current user block: all earlier turns in full
  (their text and images), the block's images, and every segment of the reply being generated. It is forked from
  ``full`` (rows copied, not recomputed) at the block's first text segment, and it *is* ``full`` (shared, not
  stored) while the block has no text. A new user block starts it afresh.
* **image-unconditional** — ``full`` without the image views (clean VAE and ViT) of the current user block: all
  earlier turns in full (their text and images, user or generated), the block's text, and every segment of the reply
  being generated. Like text-unconditional it is shared with ``full`` until the block's first image and restarts
  with each user block. This is the context CFG training dropout teaches (``data/droppable.py``: only the segments of
  the user turn a generated image answers are droppable; earlier images, and generated images always, stay), and in
  a single-turn request it is BAGEL's "every text input but no image" (SPEC §4.1).

Each equals what the packer produces for the dialogue when CFG dropout removes those segments (the tests pack it
that way): positions follow SPEC §3 for what the context holds, with the training-dropout rule for what it lacks —
dropped text advances nothing, a dropped image view still advances by 1. So image-unconditional positions equal
``full``'s, and text-unconditional ones trail ``full`` by the dropped text's length.

**Replies** (SPEC §2: intent is predicted). After the user block, the last token's logits choose between ``im_s``
(text) and ``v_s`` (image); after each segment's closing marker (``im_e``, or the ``v_e`` of a generated image's ViT
view) among ``im_s``, ``v_s`` and ``<|end|>``. Text is decoded token by token into ``full`` (other markers are
banned inside it; at ``max_new_tokens`` an ``im_e`` is appended), then appended to the unconditional contexts in one
chunk. An image is sampled with the flow sampler: each Euler step runs the noised view (``commit=False``) at each
context's position, CFG combines the velocities, and the decoded image then enters all contexts that keep images.

**System turns and think mode** (SPEC §4.1). A system turn (:meth:`ChatSession.add_system`, ``system=``) is text in
every context — BAGEL's text-unconditional context is the one before the trailing user text, so it keeps the system
prompt. A think reply (``mode="think_image"`` etc., ``inference/think.py``) first puts a system turn with the think
prompt right before the user block (the block is prefilled again after it), then decodes its reasoning into
``full``; before an image, the unconditional contexts that shared ``full`` are forked first, the image is sampled
with contexts that lack the reasoning, and only then is the reasoning appended to them (before the image's clean
views), so afterwards it is ordinary history and a replay of the dialogue builds the same caches.

**Rollback** restores the state before a turn from a snapshot (cache lengths and positions; caches are truncated).
Going back into an *older* user block rebuilds that block's text-unconditional context from ``full`` plus the
block's images (the only rows not recoverable by truncation).

**Batching.** :meth:`ChatSession.reply_steps` is the reply as a generator of model steps (``inference/steps.py``):
:meth:`ChatSession.respond` answers each step alone, :func:`~chatumm_kit.inference.batch.respond_batch` answers the
steps of several sessions with one forward pass.

Example:
    >>> session = ChatSession(model=model, tokenizer=tok, config=SessionConfig(vit_patch_size=8,
    ...                       vae_token_stride=8, max_image_side=32, image_size=(32, 32)))   # doctest: +SKIP
    >>> session.add_user("draw a red circle")                                                  # doctest: +SKIP
    >>> reply = session.respond(sampler=SamplerConfig(num_steps=20, seed=0))                   # doctest: +SKIP
    >>> reply.intents, reply.images[0].shape                                                   # doctest: +SKIP
    (['image', 'end'], torch.Size([3, 32, 32]))
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchvision.io import ImageReadMode, read_image, write_png

from chatumm_kit.components.splits import Modality
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.convert.provenance import WeightsOrigin
from chatumm_kit.data.dialogue import (
    IMAGE_VIEWS,
    Dialogue,
    DialogueSample,
    ImageSegment,
    Role,
    Segment,
    TextSegment,
    Turn,
)
from chatumm_kit.data.packing import CFGDropRates, Packer
from chatumm_kit.data.stream_layout import StreamPiece
from chatumm_kit.data.view_sizing import ViewSizing, coerce_view_sizing, resolve_view_sizing
from chatumm_kit.inference.cfg_contexts import (
    ContextMark,
    GuidanceContexts,
    SessionContexts,
    keep_image_uncond,
    keep_text_uncond,
)
from chatumm_kit.inference.context import EmbeddedChunk, StreamRunner, to_uint8
from chatumm_kit.inference.decoding import choose_token
from chatumm_kit.inference.sampler import EulerIntegrator, SamplerConfig
from chatumm_kit.inference.steps import (
    ModelStep,
    ReplySteps,
    TokenStep,
    VelocityStep,
    drive,
    run_alone,
    run_together,
)
from chatumm_kit.inference.think import (
    BAGEL_THINK_IMAGE_PROMPT,
    BAGEL_THINK_TEXT_PROMPT,
    THINK_END,
    THINK_OUTPUT,
    split_think,
)
from chatumm_kit.model import ChatUMM

__all__ = [
    "REPLY_MODES",
    "AssistantReply",
    "ChatSession",
    "SessionConfig",
    "SessionContexts",
    "check_reply_options",
    "user_image_views_for",
]

REPLY_MODES = ("auto", "text", "image", "edit", "think", "think_text", "think_image", "think_edit")
"""Task modes of :meth:`ChatSession.respond` (SPEC §4.1: a converted, not yet fine-tuned BAGEL must be told the task).

``auto``: the model predicts every intent (SPEC §2). ``text``: the reply's opening marker is forced to ``im_s`` and
the turn ends after that one text segment (VQA / understanding). ``image``: the opening marker is forced to ``v_s``
(text-to-image), one image, then the turn ends. ``edit``: as ``image``, but the output takes the size of the
VAE view of the conversation's most recent image (the user's, or one generated earlier) (BAGEL: an edit's output takes the VAE-resized input's size); the
block must hold an image. A forced reply lays out exactly the stream ``auto`` lays out when the model predicts the
same intent, so the three contexts hold the same things.

``think``, ``think_text``, ``think_image``, ``think_edit``: BAGEL's think mode (``inference/think.py``). A system turn
with the think prompt is put right before the pending user block (unless that very prompt is already there), the
reasoning is decoded, then the output of ``text`` / ``image`` / ``edit`` follows (``think``: the predicted intent
picks text or image). The reasoning before an image is a think segment, in the full context only while that image
is sampled; afterwards it is ordinary assistant text in every context that keeps assistant text."""


def user_image_views_for(weights_origin: WeightsOrigin | str) -> str:
    """The views a user image should enter as for weights of ``weights_origin``: ``"vit"`` for BAGEL's released
    weights not yet trained by the kit (its understanding mode reads an image as its ViT view only, SPEC §4.1),
    ``"vae+vit"`` for weights the kit trained (SPEC §2: what its training teaches).

    Example:
        >>> user_image_views_for("bagel_release"), user_image_views_for("kit_trained")
        ('vit', 'vae+vit')
    """
    return "vit" if WeightsOrigin(weights_origin) is WeightsOrigin.BAGEL_RELEASE else "vae+vit"


SESSION_FILE = "session.json"
_FORMAT = "chatumm_session/v1"


def check_reply_options(
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    max_segments: int,
    mode: str = "auto",
    image_size: tuple[int, int] | None = None,
) -> None:
    """Raise ``ValueError`` naming the first bad :meth:`ChatSession.respond` setting (types and ranges)."""
    if mode not in REPLY_MODES:
        raise ValueError(f"respond: mode must be one of {REPLY_MODES}, got {mode!r}")
    if image_size is not None:
        size = tuple(image_size)
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
            raise ValueError(f"respond: image_size must be two integers >= 1 (H, W), got {image_size!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (is_int(max_new_tokens) and max_new_tokens >= 1):
        raise ValueError(f"respond: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (is_int(max_segments) and max_segments >= 1):
        raise ValueError(f"respond: max_segments must be an integer >= 1, got {max_segments!r}")
    if not (is_num(temperature) and temperature >= 0):
        raise ValueError(f"respond: temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (is_num(top_p) and 0 < top_p <= 1):
        raise ValueError(f"respond: top_p must be in (0, 1], got {top_p!r}")


@dataclass(frozen=True)
class SessionConfig:
    """Stream settings of a chat; they must match the packer the model was trained with.

    Attributes:
        vit_patch_size: ViT patch side (the model's ViT patch size).
        vae_token_stride: pixels per VAE token side (VAE downsample × latent patch).
        max_image_side: cap on both sides of an image view when ``view_sizing`` is not given.
        image_size: ``(H, W)`` of generated images (sized by the VAE view's rule like any image), unless
            ``edits_at_input_size`` picks the input's size.
        vit_mean, vit_std: ViT pixel normalisation.
        dialogue_id: id of the session's dialogue.
        view_sizing: the per-view sizing policy the model was trained with
            (:class:`~chatumm_kit.data.view_sizing.ViewSizing`, a mapping or a preset name such as ``"bagel"``);
            ``None``: both views shrink to ``max_image_side`` (the original rule). Its strides must equal
            ``vit_patch_size`` and ``vae_token_stride``.
        edits_at_input_size: an image reply to a user turn (block) that holds an image comes out at the size of
            that image's VAE view — the last one given — as BAGEL answers edits (SPEC §4.1); otherwise, and when
            off, at ``image_size``.
        think_image_prompt: the system prompt of think mode before an image (``think_image``, ``think_edit``);
            default BAGEL's (:data:`~chatumm_kit.inference.think.BAGEL_THINK_IMAGE_PROMPT`).
        think_text_prompt: the system prompt of think mode before a text answer (``think_text``); default BAGEL's
            (:data:`~chatumm_kit.inference.think.BAGEL_THINK_TEXT_PROMPT`).
        user_image_views: the views a user image enters as (:data:`~chatumm_kit.data.dialogue.IMAGE_VIEWS`):
            ``"vae+vit"`` (SPEC §2; what the kit's training teaches) or ``"vit"`` (the ViT view only, as BAGEL's
            understanding mode feeds it, SPEC §4.1 — the default for converted BAGEL weights not yet trained by the
            kit, :func:`user_image_views_for`). An ``image`` or ``edit`` reply always sees VAE + ViT: before it, the
            pending user block's images — and for ``edit`` the edited image — that entered as ``"vit"`` are laid out
            again as ``"vae+vit"`` (the turns from the first changed one are prefilled again; the dialogue records
            it). A ``text`` or ``auto`` reply sees them as they entered.

    Example:
        >>> SessionConfig(vit_patch_size=8, vae_token_stride=8, max_image_side=32, image_size=(32, 32)).image_size
        (32, 32)
    """

    vit_patch_size: int = 14
    vae_token_stride: int = 16
    max_image_side: int = 980
    image_size: tuple[int, int] = (512, 512)
    vit_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    vit_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    dialogue_id: str = "chat"
    view_sizing: ViewSizing | None = None
    edits_at_input_size: bool = True
    think_image_prompt: str = BAGEL_THINK_IMAGE_PROMPT
    think_text_prompt: str = BAGEL_THINK_TEXT_PROMPT
    user_image_views: str = "vae+vit"

    @property
    def sizing(self) -> ViewSizing:
        """The effective :class:`ViewSizing` (``view_sizing``, or the capped rule from ``max_image_side``)."""
        return resolve_view_sizing(
            self.view_sizing,
            vit_patch_size=self.vit_patch_size,
            vae_token_stride=self.vae_token_stride,
            max_image_side=self.max_image_side,
            where="SessionConfig",
        )

    def __post_init__(self) -> None:
        size = tuple(self.image_size)
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
            raise ValueError(f"SessionConfig.image_size must be two integers >= 1 (H, W), got {self.image_size!r}")
        for name in ("vit_patch_size", "vae_token_stride", "max_image_side"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SessionConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("think_image_prompt", "think_text_prompt"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"SessionConfig.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.user_image_views not in IMAGE_VIEWS:
            raise ValueError(
                f"SessionConfig.user_image_views must be one of {IMAGE_VIEWS}, got {self.user_image_views!r}"
            )
        if self.view_sizing is not None:
            object.__setattr__(self, "view_sizing", coerce_view_sizing(self.view_sizing, where="SessionConfig"))
        self.sizing  # noqa: B018 - checks the strides against view_sizing now, not at the first image

    @classmethod
    def for_model(
        cls,
        model: ChatUMM,
        *,
        image_size: int | tuple[int, int] | None = None,
        view_sizing: ViewSizing | Mapping[str, Any] | str | None = None,
        user_image_views: str = "vae+vit",
    ) -> SessionConfig:
        """The stream settings ``model`` was trained with — its ViT patch and its VAE stride (downsample × latent
        patch) — and the view sizing of its training data.

        Args:
            model: the model.
            image_size: generated images' ``side`` or ``(H, W)``; default: square at the VAE view's cap (1024² under
                the BAGEL policy).
            view_sizing: the data's :class:`ViewSizing` (``view_sizing_of_data`` reads it off a recipe). ``None``:
                images of ``image_size`` with no resizing (``max_image_side`` = its larger side, as in
                ``recipes/shapes/chat_tiny.yaml``).
            user_image_views: see :class:`SessionConfig` (:func:`user_image_views_for` gives a model's default).

        Example:
            >>> SessionConfig.for_model(model, image_size=32).vae_token_stride      # chatumm_tiny   # doctest: +SKIP
            8
            >>> SessionConfig.for_model(bagel, view_sizing="bagel").image_size      # doctest: +SKIP
            (1024, 1024)
        """
        vit_patch, vae_stride = model.vit_patch_size, model.vae_token_stride
        if view_sizing is None:
            if image_size is None:
                raise ValueError("SessionConfig.for_model: give image_size or view_sizing")
            size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            return cls(
                vit_patch_size=vit_patch,
                vae_token_stride=vae_stride,
                max_image_side=max(size),
                image_size=size,
                user_image_views=user_image_views,
            )
        sizing = coerce_view_sizing(view_sizing, where="SessionConfig.for_model")
        if image_size is None:
            size = sizing.square_output_size
        else:
            size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        return cls(
            vit_patch_size=vit_patch,
            vae_token_stride=vae_stride,
            image_size=size,
            view_sizing=sizing,
            user_image_views=user_image_views,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionConfig:
        """From :func:`dataclasses.asdict` output (JSON lists become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})  # view_sizing: coerced


@dataclass
class AssistantReply:
    """What :meth:`ChatSession.respond` produced.

    Attributes:
        turn_index: index of the assistant turn in the dialogue.
        segments: the reply's segments (images by key, see ``ChatSession.images``).
        images: generated images, ``uint8 [3, H, W]``, in order.
        image_keys: their keys.
        intents: predicted opening markers in order: ``"text"``, ``"image"``, and ``"end"`` if the model ended
            the turn.
        finished: True if the model predicted ``<|end|>``; False if ``max_segments`` stopped it.
        system_turn: index of the system turn a think mode put before the user block (None: it put none).
    """

    turn_index: int
    segments: list[Segment]
    images: list[torch.Tensor] = field(default_factory=list)
    image_keys: list[str] = field(default_factory=list)
    intents: list[str] = field(default_factory=list)
    finished: bool = True
    system_turn: int | None = None

    @property
    def text(self) -> str:
        """The reply's text segments (think segments left out) joined with a space."""
        return " ".join(s.text for s in self.segments if isinstance(s, TextSegment) and not s.think)

    @property
    def think(self) -> str:
        """The reasoning of a think reply: its think segments, or the ``<think> … </think>`` opening of its text
        (``think_text`` decodes reasoning and answer as one text, as BAGEL does); ``""`` when there is none."""
        spans = [s.text for s in self.segments if isinstance(s, TextSegment) and s.think]
        return " ".join(spans) if spans else split_think(self.text)[0]


@dataclass(frozen=True, kw_only=True)
class _Decoding:
    """How one reply draws its tokens and images: :meth:`ChatSession.respond`'s settings, checked, with the reply's
    random generator (seeded from ``sampler.seed``)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    sampler: SamplerConfig
    max_segments: int
    generator: torch.Generator

    def choose(
        self, logits: torch.Tensor, *, allowed: Sequence[int] | None = None, banned: Sequence[int] | None = None
    ) -> int:
        """The next id from ``[V]`` logits: :func:`choose_token` with these settings."""
        return choose_token(
            logits,
            temperature=self.temperature,
            top_p=self.top_p,
            allowed=allowed,
            banned=banned,
            generator=self.generator,
        )


@dataclass(frozen=True)
class _Task:
    """What a reply was told to do: its mode (:data:`REPLY_MODES`) and the VAE view ``(H, W)`` of a generated image
    (None: :meth:`ChatSession.reply_image_size`)."""

    mode: str
    vae_size: tuple[int, int] | None

    def plan(self, tok: ChatTokenizer) -> list[tuple[int, bool]] | None:
        """The forced segments ``(opening marker, is think text)`` before ``<|end|>``; None: the model predicts them
        (``auto``; ``think`` is resolved to ``think_text`` / ``think_image`` before the reply starts)."""
        return {
            "auto": None,
            "text": [(tok.im_start_id, False)],
            "image": [(tok.vision_start_id, False)],
            "edit": [(tok.vision_start_id, False)],
            "think_text": [(tok.im_start_id, False)],
            "think_image": [(tok.im_start_id, True), (tok.vision_start_id, False)],
            "think_edit": [(tok.im_start_id, True), (tok.vision_start_id, False)],
        }[self.mode]


@dataclass(frozen=True)
class _Mark:
    """State before a turn: the contexts and the full context's last output."""

    contexts: ContextMark
    last_hidden: torch.Tensor | None


class ChatSession:
    """A multi-turn chat with a :class:`ChatUMM` (see the module docstring for the stream and the contexts).

    Args:
        model: the model; it is put in eval mode.
        tokenizer: the chat tokenizer the model was trained with.
        config: stream settings (:class:`SessionConfig`).
        system: a system prompt the conversation starts with (:meth:`add_system`); None: none.

    Attributes:
        dialogue: the conversation so far (every turn ``trainable=False``; assistant turns carry
            ``meta={"intents", "finished", "mode"}``).
        images: key → ``uint8 [3, H, W]`` of every image in the dialogue (user and generated).
        packer: the :class:`Packer` whose layout the caches follow (``pack([session.dialogue_sample()])`` gives the
            same full-context stream).
        runner: the :class:`StreamRunner` (embeds pieces, runs chunks and noised views).

    Raises:
        ValueError: settings that do not fit the model (ViT patch or VAE stride).

    Example:
        >>> session = ChatSession(model=model, tokenizer=tok, config=config)       # doctest: +SKIP
        >>> session.add_user("what colour is it", images=[img])                    # doctest: +SKIP
        >>> session.respond(max_new_tokens=16).text                                # doctest: +SKIP
        'it is red'
        >>> session.rollback(1); session.save("chat1")                             # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        model: ChatUMM,
        tokenizer: ChatTokenizer,
        config: SessionConfig = SessionConfig(),
        system: str | None = None,
    ) -> None:
        if config.vit_patch_size != model.vit_patch_size:
            raise ValueError(
                f"SessionConfig.vit_patch_size={config.vit_patch_size} but the model's ViT patch is "
                f"{model.vit_patch_size}"
            )
        if config.vae_token_stride != model.vae_token_stride:
            raise ValueError(
                f"SessionConfig.vae_token_stride={config.vae_token_stride} but the model's VAE token covers "
                f"{model.vae_token_stride} pixels (downsample × latent patch)"
            )
        if tokenizer.vocab_size > model.vocab_size:
            raise ValueError(f"tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's {model.vocab_size}")
        config.sizing.check_tables(
            vit_max_patches_per_side=model.vit_max_patches_per_side, max_latent_side=model.max_latent_side
        )
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.packer = Packer(
            tokenizer=tokenizer,
            view_sizing=config.sizing,
            vit_mean=config.vit_mean,
            vit_std=config.vit_std,
            drop_rates=CFGDropRates.disabled(),
        )
        self.runner = StreamRunner(model=model, packer=self.packer)
        self.reset()
        if system is not None:
            self.add_system(system)

    def reset(self) -> None:
        """Forget the whole conversation."""
        self.dialogue = Dialogue(id=self.config.dialogue_id, turns=[])
        self.images: dict[str, torch.Tensor] = {}
        self._text_ids: list[list[list[int] | None]] = []
        self._marks: list[_Mark] = []
        self._contexts = GuidanceContexts(runner=self.runner)
        self._last_hidden: torch.Tensor | None = None

    # ------------------------------------------------------------------ inspection
    @property
    def num_turns(self) -> int:
        return len(self.dialogue.turns)

    @property
    def position(self) -> int:
        """RoPE position of the next token of the full context."""
        return self._contexts.full.position

    @property
    def contexts(self) -> SessionContexts:
        """The three contexts (a shared unconditional one is the ``full`` object itself)."""
        return self._contexts.view

    @torch.no_grad()
    def next_token_logits(self) -> torch.Tensor:
        """``[V]`` float logits of the full context's last token (what the model predicts next)."""
        if self._last_hidden is None:
            raise RuntimeError("ChatSession.next_token_logits: the conversation is empty")
        return self.model.logits(self._last_hidden).float()

    def dialogue_sample(self) -> DialogueSample:
        """The conversation as a :class:`DialogueSample` (what the packer would lay out)."""
        d = (
            Dialogue.from_dict(self.dialogue.to_dict())
            if self.dialogue.turns
            else Dialogue(id=self.dialogue.id, turns=[])
        )
        return DialogueSample(dialogue=d, images=dict(self.images), key=self.dialogue.id)

    # ------------------------------------------------------------------ adding turns
    def add_user(self, text: str | None = None, images: Sequence[torch.Tensor] = ()) -> int:
        """Append a user turn: its images (``uint8 [3, H, W]``) first, then its text (the training layout).

        Returns the turn's index.
        """
        return self.add_turn(Role.USER, [*images, *([text] if text is not None else [])])

    def add_system(self, text: str) -> int:
        """Append a system turn (text only, e.g. instructions; SPEC §4.1: BAGEL enters its system prompt as plain text
        before the request). It goes at the start or after an assistant (or system) turn, before the user turn it
        instructs — not inside a user block. Returns its index.

        Example:
            >>> session.add_system("Answer in one word."); session.add_user("what colour is it")   # doctest: +SKIP
        """
        if not isinstance(text, str):
            raise TypeError(f"add_system: the system prompt must be a str, got {type(text).__name__}")
        return self.add_turn(Role.SYSTEM, [text])

    def think_prompt(self, mode: str) -> str | None:
        """The system prompt a reply in ``mode`` puts before the user block: ``config.think_text_prompt`` for
        ``think_text``, ``config.think_image_prompt`` for ``think_image`` / ``think_edit``; None for the other modes and
        for ``think`` (its prompt follows the intent predicted after the user turn). :meth:`add_system` of it before
        :meth:`add_user` saves prefilling the user turn a second time (the reply then finds it in place).

        Example:
            >>> session.add_system(session.think_prompt("think_image")); session.add_user("draw a cat")  # doctest: +SKIP
        """
        if mode == "think_text":
            return self.config.think_text_prompt
        if mode in ("think_image", "think_edit"):
            return self.config.think_image_prompt
        return None

    def add_assistant(self, text: str | None = None, images: Sequence[torch.Tensor] = ()) -> int:
        """Append a known assistant turn (history replay): its images first, then its text. Returns its index."""
        return self.add_turn(Role.ASSISTANT, [*images, *([text] if text is not None else [])])

    @torch.no_grad()
    def add_turn(self, role: Role | str, parts: Sequence[str | torch.Tensor]) -> int:
        """Append a turn whose segments are ``parts`` in order (``str`` → text, tensor → ``uint8`` image)."""
        role = Role(role)
        if not parts:
            raise ValueError(f"add_turn: a {role.value} turn needs at least one text or image")
        segments: list[Segment] = []
        new_images: dict[str, torch.Tensor] = {}
        for j, part in enumerate(parts):
            if isinstance(part, str):
                if not part:
                    raise ValueError(f"add_turn: {role.value} part {j} is an empty string")
                segments.append(TextSegment(text=part))
            elif isinstance(part, torch.Tensor):
                if role is Role.SYSTEM:
                    raise ValueError(f"add_turn: a system turn holds text only (part {j} is an image)")
                key = self._new_image_key(taken=new_images)
                new_images[key] = part.detach().cpu()
                views = self.config.user_image_views if role is Role.USER else "vae+vit"
                segments.append(ImageSegment(image=key, views=views))
            else:
                raise TypeError(f"add_turn: {role.value} part {j} must be str or a uint8 tensor, got {type(part)}")
        return self._append_turn(Turn(role=role, segments=segments, trainable=False), new_images, None)

    def _append_turn(
        self, turn: Turn, new_images: dict[str, torch.Tensor], text_ids: Sequence[Sequence[int] | None] | None
    ) -> int:
        k = self.num_turns
        before = self.dialogue.turns[-1].role if k else None
        speaker = next((t.role for t in reversed(self.dialogue.turns) if t.role is not Role.SYSTEM), None)
        if turn.role is Role.ASSISTANT and speaker is None:
            raise ValueError("ChatSession: a conversation must start with a user turn (after any system turns)")
        if turn.role is Role.ASSISTANT and before is Role.SYSTEM:
            raise ValueError("ChatSession: an assistant turn cannot follow a system turn (add a user turn first)")
        if turn.role is Role.SYSTEM and before is Role.USER:
            raise ValueError(
                "ChatSession: a system turn goes before the user turn it instructs, not inside a user block "
                "(respond first)"
            )
        self._marks.append(self._snapshot())
        try:
            self.images.update(new_images)
            pieces = self.runner.turn_pieces(turn, self.images, text_ids)
            chunk = self.runner.embed(pieces, self.images)
            if turn.role is Role.USER and speaker is not Role.USER:
                self._contexts.start_user_block(k)  # a new user block (see module docstring)
            keeps = keep_text_uncond(pieces, turn.role), keep_image_uncond(pieces, turn.role)
            self._last_hidden = self._contexts.extend(chunk, *keeps)
            self.dialogue.turns.append(turn)
            self._text_ids.append(_segment_ids(turn, pieces))
        except BaseException:
            self._restore(k)
            raise
        return k

    # ------------------------------------------------------------------ responding
    @torch.no_grad()
    def respond(
        self,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        sampler: SamplerConfig | None = None,
        max_segments: int = 4,
        mode: str = "auto",
        image_size: tuple[int, int] | None = None,
    ) -> AssistantReply:
        """Generate the assistant turn after the current user block; the model picks each segment's modality
        (``mode="auto"``), or the task is forced (:data:`REPLY_MODES`).

        Args:
            max_new_tokens: cap per text segment (then ``im_e`` is appended).
            temperature, top_p: text and intent decoding (0 = greedy).
            sampler: image sampling settings (default ``SamplerConfig()``); ``sampler.seed`` seeds all draws of
                this reply.
            max_segments: stop after this many segments even if the model does not predict ``<|end|>``.
            mode: ``"auto"``, ``"text"``, ``"image"``, ``"edit"`` or a think mode (``"think"``, ``"think_text"``,
                ``"think_image"``, ``"think_edit"``; see :data:`REPLY_MODES`). A think mode may put a system turn
                before the user block (:attr:`AssistantReply.system_turn`); the reasoning is capped by
                ``max_new_tokens`` like any text segment (BAGEL allows 1000).
            image_size: ``(H, W)`` of a generated image (sized by the VAE view's rule); default: the edited image's
                VAE view for ``edit`` / ``think_edit``, else :meth:`reply_image_size`.

        An image's CFG contexts share one stacked forward per Euler step (:func:`~.steps.run_together`); several
        sessions reply together (one forward per step for all of them) with
        :func:`~chatumm_kit.inference.batch.respond_batch`: the same replies up to float rounding (see there).
        """
        steps = self.reply_steps(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            sampler=sampler,
            max_segments=max_segments,
            mode=mode,
            image_size=image_size,
        )
        return drive(steps, self._answer)

    def _answer(self, step: ModelStep) -> torch.Tensor:
        # The up-to-three CFG contexts of an Euler step go through one stacked forward (about 1.6x faster than one
        # forward each for chatumm_tiny on CPU, benchmarks/bench_sessions.py); a decoded token takes the plain
        # cached step, which is cheaper for one row.
        if isinstance(step, VelocityStep):
            return run_together(self.model, self.tokenizer, [step])[0]
        return run_alone(self.runner, step)

    def reply_steps(
        self,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        sampler: SamplerConfig | None = None,
        max_segments: int = 4,
        mode: str = "auto",
        image_size: tuple[int, int] | None = None,
    ) -> ReplySteps[AssistantReply]:
        """:meth:`respond` as a generator of model steps (``inference/steps.py``), for a scheduler to drive.

        It yields a :class:`~.steps.TokenStep` per decoded token and a :class:`~.steps.VelocityStep` per Euler
        step, expects each one's answer sent back, and returns the :class:`AssistantReply`. Everything else
        (token choice, prefilling a finished segment, decoding an image) runs inside it. The settings are checked
        now; the reply starts at the first ``next()``. Closing it before the end (or an error inside it) restores
        the session to where it was before the reply.

        Example:
            >>> reply = drive_alone(session.reply_steps(max_new_tokens=8), session.runner)   # doctest: +SKIP
        """
        k = self.num_turns
        if k == 0 or self.dialogue.turns[-1].role is not Role.USER:
            raise RuntimeError("ChatSession.respond: the last turn must be a user turn (add_user first)")
        check_reply_options(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            max_segments=max_segments,
            mode=mode,
            image_size=image_size,
        )
        # The VAE view size of a generated image: given, the edited image's (edit), or the session's rule (None).
        size = self.packer.view_sizes(*image_size)[1] if image_size is not None else None
        if mode in ("edit", "think_edit") and size is None:
            size = self._edited_image_size()
        sampler = sampler if sampler is not None else SamplerConfig()
        generator = torch.Generator()
        if sampler.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampler.seed)
        decoding = _Decoding(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            sampler=sampler,
            max_segments=max_segments,
            generator=generator,
        )
        return self._reply(k, decoding, _Task(mode=mode, vae_size=size))

    def _give_vae_views(self, *, edit: bool) -> None:
        """Lay out again as ``"vae+vit"`` the ViT-only user images an image reply needs (SPEC §4.1: generation and
        editing contexts get VAE then ViT): those of the pending user block, and for an edit the edited (most recent)
        image. The turns from the first changed one on are prefilled again (:meth:`_replace_tail`)."""
        wanted: set[str] = set()
        for i in range(self._contexts.block_start, self.num_turns):
            wanted.update(self.dialogue.turns[i].image_keys)
        if edit:
            wanted.update(next((t.image_keys[-1:] for t in reversed(self.dialogue.turns) if t.image_keys), []))
        changed = [
            i
            for i, turn in enumerate(self.dialogue.turns)
            if any(isinstance(s, ImageSegment) and s.views != "vae+vit" and s.image in wanted for s in turn.segments)
        ]
        if not changed:
            return
        tail = self._tail(changed[0])
        relaid = [
            (
                dataclasses.replace(
                    turn,
                    segments=[
                        dataclasses.replace(s, views="vae+vit")
                        if isinstance(s, ImageSegment) and s.image in wanted
                        else s
                        for s in turn.segments
                    ],
                ),
                ids,
            )
            for turn, ids in tail[0]
        ]
        try:
            self._replace_tail(changed[0], relaid, tail[1])
        except BaseException:
            self._replace_tail(changed[0], *tail)  # back to the turns as they were
            raise

    def _edited_image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the VAE view of the edited image — the conversation's most recent image, a user's or a
        generated one (what an edit's output takes, SPEC §4.1)."""
        for turn in reversed(self.dialogue.turns):
            keys = turn.image_keys
            if keys:
                image = self.images[keys[-1]]
                return self.packer.view_sizes(int(image.shape[-2]), int(image.shape[-1]))[1]
        raise ValueError("respond(mode='edit'): the conversation has no image to edit (add_user(images=[...]))")

    @torch.no_grad()
    def _reply(self, k: int, decoding: _Decoding, task: _Task):
        if self.num_turns != k:
            raise RuntimeError("ChatSession.reply_steps: the session changed before the reply started")
        system_turn = None
        if task.mode == "think":  # the predicted intent (SPEC §2) picks the output, then its prompt
            logits = self.model.logits(self._last_hidden)
            allowed = [self.tokenizer.im_start_id, self.tokenizer.vision_start_id]
            choice = decoding.choose(logits, allowed=allowed)
            task = _Task(mode="think_text" if choice == allowed[0] else "think_image", vae_size=task.vae_size)
        if task.mode in ("image", "edit", "think_image", "think_edit"):  # an image reply sees VAE + ViT (SPEC §4.1)
            self._give_vae_views(edit=task.mode in ("edit", "think_edit"))
        if task.mode in THINK_OUTPUT:
            system_turn = self._put_system_before_block(self.think_prompt(task.mode))
        k = self.num_turns
        self._marks.append(self._snapshot())
        try:
            reply = yield from self._reply_segments(k, decoding, task)
        except BaseException:
            self._restore(k)
            if system_turn is not None:
                self._remove_system_turn(system_turn)
            raise
        reply.system_turn = system_turn
        return reply

    def _reply_segments(self, k: int, decoding: _Decoding, task: _Task):
        tok = self.tokenizer
        reply = AssistantReply(turn_index=k, segments=[], finished=False)
        ids_per_segment: list[list[int] | None] = []
        hidden = self._last_hidden
        allowed = [tok.im_start_id, tok.vision_start_id]  # the first segment must open something (SPEC §2)
        plan = task.plan(tok)
        pending = None  # think text in full only, until the image it plans is sampled
        while len(reply.segments) < decoding.max_segments:
            think = False
            if plan is not None:
                # SPEC §4.1: the task is told, not predicted — the opening markers are forced, then end.
                n = len(reply.segments)
                choice, think = plan[n] if n < len(plan) else (tok.end_id, False)
            else:
                logits = self.model.logits(hidden)
                choice = decoding.choose(logits, allowed=allowed)
            if choice == tok.end_id:
                reply.intents.append("end")
                reply.finished = True
                break
            if choice == tok.im_start_id:
                reply.intents.append("text")
                first = not any(isinstance(s, TextSegment) for s in reply.segments)
                ids, hidden, chunk = yield from self._generate_text(decoding, think=think)
                pending = chunk if think else None
                reply.segments.append(TextSegment(text=self._visible_text(ids, first=first), think=think))
                ids_per_segment.append(ids)
            else:
                reply.intents.append("image")
                key, image, hidden = yield from self._generate_image(
                    decoding.sampler,
                    decoding.generator,
                    segment=len(reply.segments),
                    size=task.vae_size,
                    pending=pending,
                )
                pending = None
                reply.segments.append(ImageSegment(image=key))
                reply.images.append(image)
                reply.image_keys.append(key)
                ids_per_segment.append(None)
            allowed = [tok.im_start_id, tok.vision_start_id, tok.end_id]
        if pending is not None:  # max_segments stopped the reply before the image
            self._contexts.extend_unconditional(pending)
        meta = {"intents": list(reply.intents), "finished": reply.finished, "mode": task.mode}
        self.dialogue.turns.append(Turn(role=Role.ASSISTANT, segments=list(reply.segments), trainable=False, meta=meta))
        self._text_ids.append(ids_per_segment)
        self._last_hidden = hidden
        return reply

    def _generate_text(self, decoding: _Decoding, *, think: bool = False):
        """Decode one text segment into ``full`` (a :class:`TokenStep` per token); append it to the unconditional
        contexts — unless it is ``think`` text: that one closes once it holds ``</think>`` and waits (returned as its
        embedded chunk) until the image it plans is sampled. Returns ids, last output, the embedded chunk."""
        tok, run, full = self.tokenizer, self.runner, self._contexts.full
        if think:
            self._contexts.fork_shared()  # the CFG contexts must not see the reasoning (SPEC §4.1)
        markers = [tok.im_start_id, tok.vision_start_id, tok.vision_end_id, tok.end_id, tok.pad_id]
        hidden = yield TokenStep(full, tok.im_start_id)
        ids: list[int] = []
        closed = False
        while len(ids) < decoding.max_new_tokens:
            banned = markers + ([tok.im_end_id] if not ids else [])  # the packer never lays out an empty text
            logits = self.model.logits(hidden)
            token = decoding.choose(logits, banned=banned)
            hidden = yield TokenStep(full, token)
            if token == tok.im_end_id:
                closed = True
                break
            ids.append(token)
            # `</think>` is 8 characters, so it lies within the last 8 tokens' text when it has just been completed
            if think and THINK_END in tok.decode(ids[-len(THINK_END) :]):
                break
        if not closed:
            hidden = yield TokenStep(full, tok.im_end_id)
        chunk = run.embed([StreamPiece(Modality.TEXT, 0, 0, content=tuple(ids))], self.images)
        if not think:
            self._contexts.extend_unconditional(chunk)
        return ids, hidden, chunk

    def _visible_text(self, ids: list[int], *, first: bool) -> str:
        """Decoded text without the assistant role prefix (the template adds it back when packing)."""
        text = self.tokenizer.decode(ids)
        prefix = self.tokenizer.assistant_prefix
        if first and prefix and text.startswith(prefix) and len(text) > len(prefix):
            text = text[len(prefix) :]
        return text or "\ufffd"  # a Dialogue text may not be empty; the exact ids are kept beside it anyway

    def _generate_image(
        self,
        sampler: SamplerConfig,
        generator: torch.Generator,
        *,
        segment: int,
        size: tuple[int, int] | None,
        pending: EmbeddedChunk | None = None,
    ):
        """Sample one image with VAE view ``size`` ``(H, W)`` (None: :meth:`reply_image_size`) with three-context CFG (a
        :class:`VelocityStep` per Euler step), decode it, and append it as clean context. ``pending``: think text that
        ``full`` already holds; the unconditional contexts get it after the sampling, before the image (so the stream
        order is the same in every context). Returns key, image, the full context's last output."""
        run, model = self.runner, self.model
        vae_h, vae_w = size if size is not None else self.reply_image_size()
        stride = self.config.vae_token_stride
        grid = (vae_h // stride, vae_w // stride)
        full, text_uncond, image_uncond = self._contexts.stored()
        noise = torch.randn(grid[0] * grid[1], model.latent_token_dim, generator=generator).to(model.device)
        euler = EulerIntegrator(noise, sampler)
        while not euler.done:
            euler.step((yield VelocityStep(full, text_uncond, image_uncond, euler.x, euler.t, grid, sampler)))
        image = to_uint8(model.decode_latents(euler.x, grid))
        if pending is not None:
            self._contexts.extend_unconditional(pending)
        key = self._new_image_key()
        self.images[key] = image
        pieces = run.image_pieces(key, image, segment=segment)
        chunk = run.embed(pieces, self.images)
        hidden = self._contexts.extend(chunk, [True] * len(pieces), [True] * len(pieces))  # kept by all three
        return key, image, hidden

    def reply_image_size(self) -> tuple[int, int]:
        """``(h, w)`` of the next generated image: the VAE view of the last image in the pending user block when
        ``config.edits_at_input_size`` (an edit keeps its input's size, SPEC §4.1), else ``config.image_size`` sized
        by the VAE view's rule (so 1024×1024, 768×1024 or 576×1024 under the BAGEL policy)."""
        if self.config.edits_at_input_size:
            for turn in reversed(self.dialogue.turns):
                if turn.role is not Role.USER:
                    break
                if turn.image_keys:
                    image = self.images[turn.image_keys[-1]]
                    _, vae_hw = self.packer.view_sizes(int(image.shape[1]), int(image.shape[2]))
                    return vae_hw
        _, vae_hw = self.packer.view_sizes(*self.config.image_size)
        return vae_hw

    # ------------------------------------------------------------------ rollback
    @torch.no_grad()
    def rollback(self, turn_index: int) -> None:
        """Return to the state before turn ``turn_index`` (that turn and every later one are forgotten)."""
        if not 0 <= turn_index < self.num_turns:
            raise IndexError(f"rollback: turn_index {turn_index} is not in [0, {self.num_turns})")
        self._restore(turn_index)

    def undo(self, reply: AssistantReply) -> None:
        """Forget ``reply`` — roll back to before it, and remove the system turn its think mode put before the user
        block (:attr:`AssistantReply.system_turn`): the session is as it was before :meth:`respond`."""
        self.rollback(reply.turn_index)
        if reply.system_turn is not None:
            self._remove_system_turn(reply.system_turn)

    @torch.no_grad()
    def _put_system_before_block(self, prompt: str) -> int | None:
        """Put a system turn holding ``prompt`` right before the pending user block — BAGEL puts its think prompt
        before the request (SPEC §4.1) — unless that very prompt is already there. The block's turns are prefilled
        again after it (their exact text ids and images are kept). Returns the system turn's index, or None."""
        block = self.num_turns
        while block > 0 and self.dialogue.turns[block - 1].role is Role.USER:
            block -= 1
        before = self.dialogue.turns[block - 1] if block > 0 else None
        if before is not None and before.role is Role.SYSTEM and before.text == prompt:
            return None
        tail = self._tail(block)
        system = Turn(role=Role.SYSTEM, segments=[TextSegment(text=prompt)], trainable=False)
        try:
            self._replace_tail(block, [(system, None), *tail[0]], tail[1])
        except BaseException:
            self._replace_tail(block, *tail)  # back to the block as it was
            raise
        return block

    @torch.no_grad()
    def _remove_system_turn(self, index: int) -> None:
        """Remove the system turn at ``index`` (the turns after it are prefilled again)."""
        turns, images = self._tail(index + 1)
        self._replace_tail(index, turns, images)

    def _tail(self, start: int) -> tuple[list[tuple[Turn, list[list[int] | None]]], dict[str, torch.Tensor]]:
        """Turns from ``start`` on with their exact text ids, and the images they need."""
        turns = [(self.dialogue.turns[i], self._text_ids[i]) for i in range(start, self.num_turns)]
        return turns, {key: self.images[key] for turn, _ in turns for key in turn.image_keys}

    def _replace_tail(
        self, start: int, turns: Sequence[tuple[Turn, Sequence[Sequence[int] | None] | None]], images
    ) -> None:
        """Roll back to before turn ``start`` and append ``turns`` (prefilled; exact text ids where given)."""
        self._restore(start)
        for turn, ids in turns:
            new = {key: images[key] for key in turn.image_keys if key not in self.images}
            self._append_turn(turn, new, ids)

    def _snapshot(self) -> _Mark:
        return _Mark(contexts=self._contexts.snapshot(), last_hidden=self._last_hidden)

    def _restore(self, k: int) -> None:
        """Restore ``self._marks[k]`` and drop turns, marks and images from turn ``k`` on."""
        mark = self._marks[k]
        block = mark.contexts.block_start

        def block_chunks():  # the pending user block's turns, for an unconditional context's rebuild
            for i in range(block, k):
                turn = self.dialogue.turns[i]
                pieces = self.runner.turn_pieces(turn, self.images, self._text_ids[i])
                chunk = self.runner.embed(pieces, self.images)
                yield chunk, keep_text_uncond(pieces, turn.role), keep_image_uncond(pieces, turn.role)

        self._contexts.restore(
            mark.contexts,
            block_pending=k > 0 and self.dialogue.turns[k - 1].role is Role.USER,
            block_full=self._marks[block].contexts if block < k else mark.contexts,
            block_chunks=block_chunks,
        )
        self._last_hidden = mark.last_hidden
        del self.dialogue.turns[k:], self._text_ids[k:], self._marks[k:]
        used = {key for turn in self.dialogue.turns for key in turn.image_keys}
        self.images = {key: img for key, img in self.images.items() if key in used}

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | Path) -> Path:
        """Write folder ``path``: ``session.json`` (settings, dialogue, exact text ids) and ``images/<key>.png``."""
        folder = Path(path)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        data = {
            "format": _FORMAT,
            "config": asdict(self.config),
            "vocab_size": self.tokenizer.vocab_size,
            "dialogue": self.dialogue.to_dict(),
            "text_ids": self._text_ids,
        }
        (folder / SESSION_FILE).write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        for key, image in self.images.items():
            write_png(image.contiguous(), str(folder / "images" / f"{key}.png"))
        return folder

    @classmethod
    def load(cls, path: str | Path, *, model: ChatUMM, tokenizer: ChatTokenizer) -> ChatSession:
        """Rebuild a saved session by prefilling its turns again (same caches, same next-token logits)."""
        folder = Path(path)
        file = folder / SESSION_FILE
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"ChatSession.load: cannot read {str(file)!r}: {e}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"ChatSession.load: {str(file)!r} is not a {_FORMAT} file")
        if data.get("vocab_size") != tokenizer.vocab_size:
            raise ValueError(
                f"ChatSession.load: {str(file)!r} was saved with vocab_size={data.get('vocab_size')}, the tokenizer "
                f"has {tokenizer.vocab_size}"
            )
        session = cls(model=model, tokenizer=tokenizer, config=SessionConfig.from_dict(data["config"]))
        raw = data["dialogue"]
        turns = Dialogue.from_dict(raw).turns if raw.get("turns") else []
        text_ids = data.get("text_ids") or [None] * len(turns)
        for turn, ids in zip(turns, text_ids, strict=True):
            new = {}
            for key in turn.image_keys:
                if key not in session.images and key not in new:
                    new[key] = read_image(str(folder / "images" / f"{key}.png"), mode=ImageReadMode.RGB)
            with torch.no_grad():
                session._append_turn(turn, new, ids)
        return session

    # ------------------------------------------------------------------ helpers
    def _new_image_key(self, taken: dict[str, torch.Tensor] | None = None) -> str:
        n = len(self.images) + len(taken or {})
        while f"img{n}" in self.images or (taken and f"img{n}" in taken):
            n += 1
        return f"img{n}"


def _segment_ids(turn: Turn, pieces: Sequence[StreamPiece]) -> list[list[int] | None]:
    """Content ids of each text segment of ``turn`` (None for images), as prefilled."""
    by_segment = {p.segment: list(p.content) for p in pieces if p.modality is Modality.TEXT}
    return [by_segment.get(j) for j in range(len(turn.segments))]
