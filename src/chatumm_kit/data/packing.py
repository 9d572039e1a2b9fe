"""Dialogue → serialized stream → :class:`PackedBatch` (SPEC §2–3).

:class:`Packer` turns each :class:`DialogueSample` into a list of *pieces* (one split each), applies CFG condition
dropout, assigns 1-D RoPE positions and cross-entropy labels, and lays documents end to end in one sequence.

The stream of one document (SPEC §2):

* text segment → ``im_s`` + text tokens + ``im_e`` (causal split, ``TEXT``);
* user image → clean VAE view (``v_s`` + latent tokens + ``v_e``, full, ``VAE_CLEAN``), then ViT view (``v_s`` +
  patch tokens + ``v_e``, full, ``VIT``);
* image of a *trainable* assistant turn (a generation target) → noised VAE view (noise, ``VAE_NOISED``), then its
  clean VAE view, then its ViT view;
* image of a non-trainable assistant turn → clean VAE + ViT, like a user image.

Markers belong to their split. Positions (SPEC §3): text +1 per token; every token of one image view (markers
included) shares one position; a clean view advances by 1 after it; a noised view does not advance, so its clean
copy reuses its position; each document starts at 0.

Cross-entropy labels (SPEC §2), only in trainable assistant turns plus one hand-over token:

* ``im_s`` and each text token → the next token (text, then ``im_e``);
* the *intent holder* of each assistant segment — ``im_e`` of a text segment, ``v_e`` of a generated image's ViT
  view (its last clean view) — → the opening marker of the turn's next segment (``im_s`` / ``v_s``), or ``end_id``
  after the last one. ``<|end|>`` is only ever a label;
* the last token of the user turn just before a trainable assistant turn → that turn's first opening marker.
No label ever sits in a VAE view (noised or clean, markers included) or on ViT patches.

CFG condition dropout (SPEC §3–4), only for segments marked ``droppable``, each draw from the ``generator``:
a dropped text segment vanishes and advances nothing; the clean VAE and ViT views of an image are dropped
independently, and a dropped view still advances the position by 1 (so later positions do not move). A noised
target view is never dropped. Labels are computed on what is kept: if a droppable assistant text is dropped, the
previous intent holder predicts the next kept segment; if a generated image's ViT view is dropped, that image's
intent label is not placed (no label may sit in a VAE view); likewise the user hand-over label is only placed when
the user turn's last kept token closes a text or ViT split.

Example:
    >>> packer = Packer(tokenizer=tok, vit_patch_size=16, vae_token_stride=16)   # doctest: +SKIP
    >>> batch = packer.pack([sample_a, sample_b], token_budget=4096)             # doctest: +SKIP
    >>> batch.splits.rows()[0]                                                   # doctest: +SKIP
    (0, 12, <AttnMode.CAUSAL: 0>, 0, <Modality.TEXT: 0>)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from chatumm_kit.components.batch import PackedBatch
from chatumm_kit.components.splits import Modality
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.dialogue import DialogueError, DialogueSample, ImageSegment, Role, TextSegment
from chatumm_kit.data.stream_layout import DocumentPlan, StreamBuilder, StreamPiece, TurnPlan, document_labels
from chatumm_kit.data.view_sizing import ViewSizes, ViewSizing, resolve_view_sizing

if TYPE_CHECKING:
    from chatumm_kit.model import ChatUMM

__all__ = [
    "budget_problems",
    "packer_setting_problems",
    "CFGDropRates",
    "DocumentPlan",
    "Packer",
    "PackingError",
    "PackingStats",
    "StreamPiece",
    "TokenBudgetBatcher",
    "TurnPlan",
    "check_stream_settings",
    "document_labels",
    "model_stream_settings",
]


class PackingError(ValueError):
    """A sample the packer cannot serialise, or a budget it cannot meet; names the sample key, dialogue and turn."""


@dataclass(frozen=True)
class CFGDropRates:
    """Probabilities of dropping a droppable segment for classifier-free-guidance training (SPEC §4).

    Example:
        >>> CFGDropRates().vit, CFGDropRates.disabled().text
        (0.3, 0.0)
    """

    text: float = 0.1
    vit: float = 0.3
    vae: float = 0.3

    def __post_init__(self) -> None:
        for name in ("text", "vit", "vae"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"CFGDropRates.{name} must be in [0, 1], got {v}")

    @classmethod
    def disabled(cls) -> CFGDropRates:
        """No dropout (validation, inference prefill)."""
        return cls(text=0.0, vit=0.0, vae=0.0)

    def rate_for(self, modality: Modality) -> float:
        """Drop rate of a piece of ``modality``; 0 for a noised view (a target is never dropped)."""
        return {Modality.TEXT: self.text, Modality.VIT: self.vit, Modality.VAE_CLEAN: self.vae}.get(modality, 0.0)


def _where(sample: DialogueSample) -> str:
    did = sample.dialogue.id
    return f"sample {sample.key!r} (dialogue {did!r})" if sample.key else f"dialogue {did!r}"


def packer_setting_problems(
    *, vit_patch_size: int, vae_token_stride: int, max_image_side: int, pad_to_multiple: int = 1
) -> list[tuple[str, str]]:
    """``(setting, message)`` for the :class:`Packer` settings it would refuse, by the rules it applies
    (:func:`~chatumm_kit.data.view_sizing.resolve_view_sizing`); ``chatumm validate`` reports them before any data
    exists (``DialogueDataModule.check_recipe_arguments``).

    Example:
        >>> packer_setting_problems(vit_patch_size=0, vae_token_stride=8, max_image_side=32)
        [('vit_patch_size', 'Packer(vit_patch_size=0): must be >= 1')]
    """
    problems = []
    try:
        resolve_view_sizing(
            None,
            vit_patch_size=vit_patch_size,
            vae_token_stride=vae_token_stride,
            max_image_side=max_image_side,
            where="Packer",
        )
    except ValueError as e:
        msg = str(e)
        key = next((k for k in ("vit_patch_size", "vae_token_stride") if f"({k}=" in msg), "max_image_side")
        problems.append((key, msg))
    if int(pad_to_multiple) < 1:
        problems.append(("pad_to_multiple", f"Packer(pad_to_multiple={pad_to_multiple}): must be >= 1"))
    return problems


def budget_problems(*, token_budget: int, max_sample_tokens: int, pad_to_multiple: int = 1) -> list[tuple[str, str]]:
    """``(setting, message)`` for a token budget :class:`TokenBudgetBatcher` refuses (same use as
    :func:`packer_setting_problems`).

    Example:
        >>> budget_problems(token_budget=-5, max_sample_tokens=-5)[0][1]
        'TokenBudgetBatcher(token_budget=-5) must be a positive multiple of packer.pad_to_multiple=1'
    """
    problems = []
    if token_budget < 1 or token_budget % max(1, pad_to_multiple):
        problems.append(
            (
                "token_budget",
                f"TokenBudgetBatcher(token_budget={token_budget}) must be a positive multiple of "
                f"packer.pad_to_multiple={pad_to_multiple}",
            )
        )
    if max_sample_tokens < 1:
        problems.append(
            ("max_sample_tokens", f"TokenBudgetBatcher(max_sample_tokens={max_sample_tokens}) must be >= 1")
        )
    return problems


def model_stream_settings(model: ChatUMM) -> dict[str, int]:
    """The stream settings a model fixes: ``vit_patch_size`` (its ViT's patch) and ``vae_token_stride`` (pixels per
    VAE token side, ``downsample · latent_patch``)."""
    return {"vit_patch_size": int(model.vit_patch_size), "vae_token_stride": int(model.vae_token_stride)}


def check_stream_settings(model: ChatUMM, *, where: str, **settings: int) -> None:
    """Raise a one-line ``ValueError`` when ``settings`` (``vit_patch_size``, ``vae_token_stride``) differ from what
    ``model`` fixes; ``where`` names the settings' owner (e.g. ``"data"``, ``"SessionConfig"``)."""
    wanted = model_stream_settings(model)
    for name, value in settings.items():
        if value != wanted[name]:
            raise ValueError(f"{where}.{name}={value} but the model's is {wanted[name]} (the model fixes it)")


class Packer:
    """Serialise dialogues into one packed sequence (SPEC §2–3); see the module docstring for the stream rules.

    Args:
        tokenizer: the chat tokenizer (role ids and the role-prefix template).
        vit_patch_size: ViT patch side in pixels; ViT views are resized to multiples of it.
        vae_token_stride: pixels per VAE token side (VAE downsample × latent patch: 8 × 2 = 16 for FLUX).
        max_image_side: cap on both sides of either view, in pixels (the shorthand for
            ``ViewSizing.capped(...)``, used when ``view_sizing`` is not given).
        view_sizing: the per-view sizing policy (:class:`~chatumm_kit.data.view_sizing.ViewSizing`, a mapping
            ``{vit: {...}, vae: {...}}`` or a preset name such as ``"bagel"``). Its strides are the ViT patch size
            and the VAE token stride; ``vit_patch_size`` / ``vae_token_stride``, if given too, must agree.
        vit_mean / vit_std: per-channel normalisation of ViT pixels (after scaling to ``[0, 1]``).
        drop_rates: CFG dropout rates for droppable segments (``CFGDropRates.disabled()`` for none).
        pad_to_multiple: pad the sequence length to a multiple of this (e.g. the flex-attention block size).

    Example:
        >>> packer = Packer(tokenizer=tok, vit_patch_size=16, drop_rates=CFGDropRates.disabled())  # doctest: +SKIP
        >>> packer.measure(sample)                                                                 # doctest: +SKIP
        42
    """

    def __init__(
        self,
        *,
        tokenizer: ChatTokenizer,
        vit_patch_size: int | None = None,
        vae_token_stride: int | None = None,
        max_image_side: int = 980,
        view_sizing: ViewSizing | Mapping[str, Any] | str | None = None,
        vit_mean: Sequence[float] = (0.5, 0.5, 0.5),
        vit_std: Sequence[float] = (0.5, 0.5, 0.5),
        drop_rates: CFGDropRates | Mapping[str, float] = CFGDropRates(),
        pad_to_multiple: int = 1,
    ) -> None:
        if not isinstance(tokenizer, ChatTokenizer):
            raise TypeError(f"Packer(tokenizer=...) expects a ChatTokenizer, got {type(tokenizer).__name__}")
        self.view_sizing = resolve_view_sizing(
            view_sizing,
            vit_patch_size=vit_patch_size,
            vae_token_stride=vae_token_stride,
            max_image_side=max_image_side,
            where="Packer",
        )
        if len(vit_mean) != 3 or len(vit_std) != 3 or any(float(s) <= 0 for s in vit_std):
            raise ValueError(f"Packer: vit_mean/vit_std need 3 values, std > 0; got {vit_mean}, {vit_std}")
        if int(pad_to_multiple) < 1:
            raise ValueError(f"Packer(pad_to_multiple={pad_to_multiple}): must be >= 1")
        if isinstance(drop_rates, Mapping):  # from YAML: {text, vit, vae}
            drop_rates = CFGDropRates(**drop_rates)
        if not isinstance(drop_rates, CFGDropRates):
            raise TypeError(
                f"Packer(drop_rates=...) expects CFGDropRates or a mapping, got {type(drop_rates).__name__}"
            )
        self.tokenizer = tokenizer
        self.vit_patch_size = self.view_sizing.vit.stride
        self.vae_token_stride = self.view_sizing.vae.stride
        # The longest side any view can have: decoding may reduce an image down to it, never below (shards.py).
        self.max_image_side = max(self.view_sizing.vit.max_side, self.view_sizing.vae.max_side)
        self.vit_mean = tuple(float(m) for m in vit_mean)
        self.vit_std = tuple(float(s) for s in vit_std)
        self.drop_rates = drop_rates
        self.pad_to_multiple = int(pad_to_multiple)

    @classmethod
    def for_model(cls, model: ChatUMM, *, tokenizer: ChatTokenizer, **settings: Any) -> Packer:
        """A packer whose ``vit_patch_size`` and ``vae_token_stride`` are the model's (:func:`model_stream_settings`);
        ``settings`` are the other constructor arguments.

        Example:
            >>> Packer.for_model(chatumm_tiny(vocab_size=300), tokenizer=tok).vae_token_stride   # doctest: +SKIP
            8
        """
        return cls(tokenizer=tokenizer, **model_stream_settings(model), **settings)

    # ------------------------------------------------------------------ planning
    def view_sizes(self, height: int, width: int) -> ViewSizes:
        """Resized ``(vit_hw, vae_hw)`` of an ``height × width`` image (the packer's :class:`ViewSizing`)."""
        return self.view_sizing.sizes(height, width)

    def plan(self, sample: DialogueSample) -> DocumentPlan:
        """Serialise ``sample`` to pieces (tokenise text, fix view sizes); no dropout, no pixels touched."""
        where = _where(sample)
        try:
            sample.validate()
        except DialogueError as e:
            raise PackingError(f"{where}: {e}") from None
        vit_size: dict[str, tuple[int, int]] = {}
        vae_size: dict[str, tuple[int, int]] = {}
        pieces: list[StreamPiece] = []
        turns: list[TurnPlan] = []
        for i, turn in enumerate(sample.dialogue.turns):
            supervised = turn.role is Role.ASSISTANT and turn.trainable
            turns.append(TurnPlan(role=turn.role, supervised=supervised))
            first_text = True
            for j, seg in enumerate(turn.segments):
                at = f"{where} turn {i} ({turn.role.value}) segment {j}"
                if isinstance(seg, TextSegment):
                    ids = self.tokenizer.encode_segment(seg.text, role=turn.role.value, first_in_turn=first_text)
                    first_text = False
                    if not ids:
                        raise PackingError(f"{at}: text {seg.text[:40]!r} encodes to no tokens")
                    pieces.append(StreamPiece(Modality.TEXT, i, j, content=tuple(ids), droppable=seg.droppable))
                    continue
                assert isinstance(seg, ImageSegment)
                key = seg.image
                if key not in vit_size:
                    img = sample.images[key]
                    if img.dtype != torch.uint8:
                        raise PackingError(f"{at}: image {key!r} must be uint8 [3, H, W], got {img.dtype}")
                    vit_size[key], vae_size[key] = self.view_sizes(int(img.shape[1]), int(img.shape[2]))
                vae_grid = (vae_size[key][0] // self.vae_token_stride, vae_size[key][1] // self.vae_token_stride)
                vit_grid = (vit_size[key][0] // self.vit_patch_size, vit_size[key][1] // self.vit_patch_size)
                if supervised:  # generation target: noised view for MSE, never dropped (SPEC §2)
                    pieces.append(StreamPiece(Modality.VAE_NOISED, i, j, image=key, grid=vae_grid))
                if seg.views == "vae+vit":  # a "vit" user image (BAGEL's understanding input, SPEC §4.1): no VAE view
                    pieces.append(
                        StreamPiece(Modality.VAE_CLEAN, i, j, image=key, grid=vae_grid, droppable=seg.droppable)
                    )
                pieces.append(StreamPiece(Modality.VIT, i, j, image=key, grid=vit_grid, droppable=seg.droppable))
        return DocumentPlan(
            key=sample.key or sample.dialogue.id,
            dialogue_id=sample.dialogue.id,
            turns=turns,
            pieces=pieces,
            images={k: sample.images[k] for k in vit_size},
            vit_size=vit_size,
            vae_size=vae_size,
        )

    def measure(self, sample: DialogueSample) -> int:
        """Token count of ``sample`` with nothing dropped (an upper bound on what :meth:`pack` lays out)."""
        return self.plan(sample).num_tokens

    # ------------------------------------------------------------------ packing
    def pack(
        self,
        samples: Sequence[DialogueSample],
        *,
        token_budget: int | None = None,
        generator: torch.Generator | None = None,
    ) -> PackedBatch:
        """Pack ``samples`` end to end (document ids ``0..n-1``) into one :class:`PackedBatch`.

        Args:
            samples: the dialogues with their pixels.
            token_budget: pad the sequence to exactly this length (a multiple of ``pad_to_multiple``); raises
                :class:`PackingError` if the samples do not fit. Without it the sequence is padded to the next
                multiple of ``pad_to_multiple`` and ``token_budget`` of the batch is that length.
            generator: source of the CFG dropout draws (``None``: torch's global generator).
        """
        return self.pack_plans([self.plan(s) for s in samples], token_budget=token_budget, generator=generator)

    def pack_plans(
        self,
        plans: Sequence[DocumentPlan],
        *,
        token_budget: int | None = None,
        generator: torch.Generator | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> PackedBatch:
        """:meth:`pack` for samples already planned (the batcher plans once to measure, then packs).

        ``generators``: one generator per plan for its CFG draws, in place of the shared ``generator`` — a
        document's draws then do not depend on the documents packed before it (exact resume, SPEC §4).
        """
        if not plans:
            raise PackingError("pack: no samples to pack")
        if generators is not None and len(generators) != len(plans):
            raise PackingError(f"pack: {len(generators)} generators for {len(plans)} samples")
        if token_budget is not None and (token_budget < 1 or token_budget % self.pad_to_multiple):
            raise PackingError(
                f"pack: token_budget={token_budget} must be a positive multiple of pad_to_multiple="
                f"{self.pad_to_multiple}"
            )
        out = StreamBuilder(
            tokenizer=self.tokenizer, vit_patch_size=self.vit_patch_size, vit_mean=self.vit_mean, vit_std=self.vit_std
        )
        for doc, plan in enumerate(plans):
            out.add_document(doc, plan, self._keep_mask(plan, generators[doc] if generators else generator))
        real = out.length
        if token_budget is not None:
            if real > token_budget:
                sizes = ", ".join(f"{p.key!r}: {p.num_tokens}" for p in plans)
                raise PackingError(f"pack: {real} tokens exceed token_budget={token_budget} ({sizes})")
            target = token_budget
        else:
            target = -(-real // self.pad_to_multiple) * self.pad_to_multiple
        out.add_padding(len(plans), target - real)
        return out.build(sample_keys=[p.key for p in plans], num_real_tokens=real, token_budget=target)

    def _keep_mask(self, plan: DocumentPlan, generator: torch.Generator | None) -> list[bool]:
        """One CFG dropout draw per droppable piece, in stream order (SPEC §4)."""
        keep = []
        for piece in plan.pieces:
            rate = self.drop_rates.rate_for(piece.modality) if piece.droppable else 0.0
            if rate <= 0.0:
                keep.append(True)
            elif rate >= 1.0:
                keep.append(False)
            else:
                keep.append(bool(torch.rand((), generator=generator) >= rate))
        return keep


# ---------------------------------------------------------------------- token-budget batching
@dataclass
class PackingStats:
    """Counters of a :class:`TokenBudgetBatcher` (cumulative over calls).

    Attributes:
        token_budget: tokens per batch.
        samples: samples packed into a batch.
        batches: batches yielded.
        skipped_over_cap: samples skipped for being longer than the cap (never truncated).
        skipped_keys: keys of skipped samples, the first ``max_skipped_keys`` of them.
        real_tokens: tokens of packed documents (after CFG dropout), padding excluded.
    """

    token_budget: int
    samples: int = 0
    batches: int = 0
    skipped_over_cap: int = 0
    skipped_keys: list[str] = field(default_factory=list)
    real_tokens: int = 0
    max_skipped_keys: int = 256

    @property
    def efficiency(self) -> float:
        """Real tokens / (batches × budget): the fraction of computed tokens that were not padding."""
        return self.real_tokens / (self.batches * self.token_budget) if self.batches else 0.0

    def record_skip(self, key: str) -> None:
        self.skipped_over_cap += 1
        if len(self.skipped_keys) < self.max_skipped_keys:
            self.skipped_keys.append(key)


class TokenBudgetBatcher:
    """Group a stream of samples into :class:`PackedBatch` es of exactly ``token_budget`` tokens.

    Samples are placed greedily into the open batch; one that does not fit waits in an overflow buffer. When the
    buffer holds more than ``overflow_size`` samples (or the batch is exactly full) the batch is emitted and the next
    one is filled first-fit from the buffer, oldest first (so nothing waits forever). At the end of the stream the
    rest is packed first-fit-decreasing. A sample longer than ``min(max_sample_tokens, token_budget)`` is skipped
    and counted in :attr:`stats` — never truncated.

    Checkpointing: :meth:`state_dict` / :meth:`load_state_dict` carry the counters and the keys of the samples
    waiting in the buffer or the open batch at that moment (``pending_keys``); the samples themselves are not
    saved — a resumable data source can replay them by key. To continue *exactly* as an uninterrupted pass would
    after it yielded a batch, call it with ``buffered`` = the samples then waiting (:attr:`pending_keys` at that
    yield, in arrival order) and ``ended`` = whether its input had run out (the tail is packed differently), and
    with ``generator_for`` so that each document's CFG draws depend on its key only, not on what was packed before.

    Args:
        packer: the :class:`Packer`.
        token_budget: tokens per batch (a multiple of ``packer.pad_to_multiple``).
        max_sample_tokens: longest sample accepted.
        overflow_size: how many non-fitting samples may wait before the open batch is emitted.

    Example:
        >>> batcher = TokenBudgetBatcher(packer=packer, token_budget=4096, max_sample_tokens=2048)  # doctest: +SKIP
        >>> for batch in batcher(samples, generator=torch.Generator().manual_seed(0)):            # doctest: +SKIP
        ...     loss = model(batch)
        >>> batcher.stats.efficiency > 0.95                                                        # doctest: +SKIP
        True
    """

    def __init__(self, *, packer: Packer, token_budget: int, max_sample_tokens: int, overflow_size: int = 32) -> None:
        problems = budget_problems(
            token_budget=token_budget, max_sample_tokens=max_sample_tokens, pad_to_multiple=packer.pad_to_multiple
        )
        if problems:
            raise ValueError(problems[0][1])
        if overflow_size < 0:
            raise ValueError(f"TokenBudgetBatcher(overflow_size={overflow_size}) must be >= 0")
        self.packer = packer
        self.token_budget = int(token_budget)
        self.max_sample_tokens = int(max_sample_tokens)
        self.overflow_size = int(overflow_size)
        self.stats = PackingStats(token_budget=self.token_budget)
        self._pending: list[DocumentPlan] = []

    @property
    def cap(self) -> int:
        """Longest sample that is packed."""
        return min(self.max_sample_tokens, self.token_budget)

    def __call__(
        self,
        samples: Iterable[DialogueSample],
        *,
        generator: torch.Generator | None = None,
        generator_for: Callable[[str], torch.Generator] | None = None,
        buffered: Sequence[DialogueSample] = (),
        ended: bool = False,
    ) -> Iterator[PackedBatch]:
        """Yield packed batches of ``samples``.

        Args:
            samples: the sample stream.
            generator: one generator for every CFG draw (``None``: torch's global one).
            generator_for: sample key → a fresh generator for that document's CFG draws (overrides ``generator``);
                makes the draws independent of batch grouping and of where a run resumed.
            buffered / ended: resume right after a batch was yielded: the samples then waiting in the buffer (in
                arrival order; before any of ``samples``) and whether the input had ended at that point.
        """
        budget = self.token_budget
        batch: list[DocumentPlan] = []
        buffer: list[DocumentPlan] = [self.packer.plan(s) for s in buffered]
        used = 0

        def emit() -> PackedBatch:
            gens = [generator_for(p.key) for p in batch] if generator_for is not None else None
            out = self.packer.pack_plans(batch, token_budget=budget, generator=generator, generators=gens)
            self.stats.batches += 1
            self.stats.samples += len(batch)
            self.stats.real_tokens += out.num_real_tokens
            return out

        def refill(pool: list[DocumentPlan]) -> tuple[list[DocumentPlan], int]:
            taken, room = [], budget
            for p in pool:
                if p.num_tokens <= room:
                    taken.append(p)
                    room -= p.num_tokens
            gone = {id(p) for p in taken}  # by identity: plans hold tensors, value equality is meaningless
            buffer[:] = [p for p in buffer if id(p) not in gone]
            return taken, budget - room

        # A resumed pass starts where the uninterrupted one stood after its yield: about to refill from the buffer.
        if buffer and not ended:
            batch, used = refill(list(buffer))
        self._pending = batch + buffer
        for sample in () if ended else samples:
            plan = self.packer.plan(sample)
            n = plan.num_tokens
            if n > self.cap:
                self.stats.record_skip(plan.key)
                continue
            if used + n <= budget:
                batch.append(plan)
                used += n
            else:
                buffer.append(plan)
            self._pending = batch + buffer
            if used == budget or len(buffer) > self.overflow_size:
                out = emit()
                self._pending = list(buffer)
                yield out
                batch, used = refill(list(buffer))  # oldest first: the oldest always fits an empty batch
                self._pending = batch + buffer
        if buffer and ended:
            batch, used = refill(sorted(buffer, key=lambda p: -p.num_tokens))
        while batch or buffer:
            if batch:
                out = emit()
                self._pending = list(buffer)
                yield out
            batch, used = refill(sorted(buffer, key=lambda p: -p.num_tokens))  # first-fit decreasing for the tail
            self._pending = batch + buffer
        self._pending = []

    # ------------------------------------------------------------------ checkpointing
    @property
    def pending_keys(self) -> list[str]:
        """Keys of samples read from the stream but not yet yielded in a batch."""
        return [p.key for p in self._pending]

    def state_dict(self) -> dict:
        return {"stats": asdict(self.stats), "pending_keys": self.pending_keys}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters (pending samples must be replayed by the data source, see the class docstring)."""
        stats = dict(state["stats"])
        if int(stats.get("token_budget", self.token_budget)) != self.token_budget:
            raise ValueError(
                f"TokenBudgetBatcher.load_state_dict: saved token_budget={stats['token_budget']} != {self.token_budget}"
            )
        self.stats = PackingStats(**stats)
