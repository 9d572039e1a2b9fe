"""`DialogueDataModule`: dialogue shards → packed batches for Lightning, resumable to the exact sample.

It streams webdataset shards (:mod:`chatumm_kit.data.shards`) of one or more weighted sources through a seeded
shuffle buffer, splits them by rank and DataLoader worker, decodes, skips and counts bad samples, and packs them to a
token budget (:class:`~chatumm_kit.data.packing.TokenBudgetBatcher`). See :mod:`chatumm_kit.data.streaming` for the
order and position rules; in short:

* **non-resampled** (default): every sample exactly once per epoch across ranks × workers. Shards are dealt to the
  ``world_size × num_workers`` slots, so you want at least that many shards (fewer leaves workers idle; fewer shards
  than ranks is refused, since a rank without data would hang the others). Ranks may still get different batch
  counts — fine for one rank, for validation, or with care; for multi-rank training prefer resampled mode.
* **resampled**: shards drawn with replacement, sources mixed by weight; an epoch is ``batches_per_epoch`` batches
  per rank (``None``: endless, stop with ``max_steps``); every rank yields the same number of batches.

**Batches.** The DataLoader yields :class:`~chatumm_kit.data.streaming.StreamBatch` (batch + the worker's position
and skip counts); this module's ``on_before_batch_transfer`` records them and hands training the plain
:class:`PackedBatch`. In a loop of your own call :meth:`DialogueDataModule.consume` on each item.

**Checkpoints.** ``state_dict()`` holds, per rank and worker, the consumed samples of the current epoch (gathered
from all ranks when ``torch.distributed`` is initialised); ``load_state_dict()`` makes the next epoch iterator of
the same epoch continue with exactly the samples that were left — in the same batches, packed and CFG-dropped the
same way, in the same order as an uninterrupted run (the state also keeps the worker of the last consumed batch: a
fresh DataLoader's round-robin starts at worker 0, so its batches are reordered to continue after that worker).
A saved position applies only to the same seed, shard list, world size and worker count; otherwise a warning says
so and the epoch restarts. Validation has its own stream and never moves the training position.

**Health.** Skips are counted per reason (:class:`~chatumm_kit.data.skips.DataHealth`); at the end of each epoch the
summary is logged and kept in :attr:`DialogueDataModule.last_epoch_health`; :meth:`DialogueDataModule.health`
returns the running counts (``health().metrics()`` gives scalars for TensorBoard).

Example (recipe):
    data:
      _component_: chatumm_kit.data.datamodule.DialogueDataModule
      train_sources: [{name: shapes, shards: data/shapes/train/index.json, weight: 1.0}]
      val_sources: [{name: shapes, shards: data/shapes/val/index.json}]
      tokenizer: data/tokenizer.json
      token_budget: 2048
      num_workers: 2
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from webdataset.utils import pytorch_worker_info

from chatumm_kit.components.batch import PackedBatch
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.image_decode import DEFAULT_MAX_PIXELS
from chatumm_kit.data.packing import (
    CFGDropRates,
    Packer,
    budget_problems,
    check_stream_settings,
    model_stream_settings,
    packer_setting_problems,
)
from chatumm_kit.data.skips import DataHealth
from chatumm_kit.data.streaming import (
    DataPosition,
    DataStallError,
    DialogueStream,
    ResolvedSource,
    SourceSpec,
    StreamBatch,
    StreamStall,
    sources_fingerprint,
)
from chatumm_kit.data.view_sizing import ViewSizing, resolve_view_sizing
from chatumm_kit.data.word_noise import WordNoise

if TYPE_CHECKING:
    from chatumm_kit.model import ChatUMM

__all__ = ["DialogueDataModule", "DataStallError", "SourceSpec", "StreamBatch"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


def _identity(x: Any) -> Any:
    return x


class _EpochLoader(DataLoader):
    """A DataLoader that tells its datamodule when an epoch's iterator starts (before workers fork) and ends.

    ``on_start`` returns the worker whose batch a resumed run consumed last (``None``: a fresh epoch); the batches
    are then reordered so that the workers' round-robin continues after it (see :func:`_round_robin_after`).
    """

    def __init__(
        self,
        *args: Any,
        on_start: Callable[[], int | None],
        on_end: Callable[[], None],
        on_note: Callable[[StreamStall], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._on_start = on_start
        self._on_end = on_end
        self._on_note = on_note

    def __iter__(self) -> Iterator[StreamBatch]:  # type: ignore[override]
        last_worker = self._on_start()
        # Batches a resumed epoch made before its checkpoint count toward "this epoch made a batch".
        made_before = sum(p.batches for p in getattr(self.dataset, "resume_positions", lambda: [])())
        items = _stop_on_stall(super().__iter__(), on_note=self._on_note, made_before=made_before)
        if last_worker is not None and last_worker < max(1, self.num_workers) - 1:
            items = _round_robin_after(items, after=last_worker)
        return _EndNotifier(items, self._on_end)


def _stop_on_stall(
    items: Iterator[Any], *, on_note: Callable[[StreamStall], None], made_before: int = 0
) -> Iterator[StreamBatch]:
    """The batches of ``items``; a worker's :class:`StreamStall` stops the run with its one line.

    A stalled worker (``stall_after_samples`` skips in a row) stops it at once; a worker whose stream ended without a
    batch stops it only when no worker made a batch in the whole epoch (other workers may hold all the good shards;
    ``made_before``: batches of a resumed epoch made before its checkpoint) and it read something (an idle worker
    with no shard of its own says nothing).
    """
    made = made_before
    idle: list[StreamStall] = []
    for item in items:
        if isinstance(item, StreamStall):
            on_note(item)
            if item.stalled:
                raise DataStallError(item.message)
            if item.read:
                idle.append(item)
            continue
        made += 1
        yield item
    if not made and idle:
        more = f" (and {len(idle) - 1} other worker(s) likewise)" if len(idle) > 1 else ""
        raise DataStallError(idle[0].message + more)


def _round_robin_after(items: Iterator[StreamBatch], *, after: int) -> Iterator[StreamBatch]:
    """A fresh loader's batches, reordered so the round-robin over workers resumes after worker ``after``.

    A DataLoader hands out its workers' batches round-robin from worker 0 (worker ids rise within a round; a worker
    whose stream ended drops out). A run checkpointed just after a batch of worker ``after`` would next have taken
    worker ``after + 1``: so in each round the batches of workers ``<= after`` wait until those of the workers
    ``> after`` of the same round have gone (at most ``after + 1`` batches wait).
    """
    held: list[StreamBatch] = []
    last = -1
    for item in items:
        worker = item.position.worker
        if worker <= last:  # worker ids stopped rising: the loader started a new round
            yield from held
            held = []
        last = worker
        if worker <= after:
            held.append(item)
        else:
            yield item
    yield from held


class _EndNotifier:
    def __init__(self, it: Iterator[Any], on_end: Callable[[], None]) -> None:
        self._it = it
        self._on_end: Callable[[], None] | None = on_end

    def __iter__(self) -> _EndNotifier:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            if self._on_end is not None:
                on_end, self._on_end = self._on_end, None
                on_end()
            raise


def _load_tokenizer(tokenizer: ChatTokenizer | str | Path) -> ChatTokenizer:
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer
    path = Path(tokenizer)
    if not path.exists():
        raise FileNotFoundError(f"DialogueDataModule(tokenizer={str(tokenizer)!r}): no such tokenizer file or folder")
    return ChatTokenizer.from_file(path)  # a folder written by ChatTokenizer.save, or its tokenizer.json


class DialogueDataModule(L.LightningDataModule):
    """Streams dialogue shards as packed batches (see the module docstring).

    Args:
        train_sources: :class:`SourceSpec` s or mappings ``{name, shards, weight}`` (YAML-friendly).
        val_sources: same, for validation (non-resampled, file order, no CFG dropout); ``None`` for none.
        tokenizer: a :class:`ChatTokenizer`, or the path of a ``tokenizer.json`` / tokenizer directory.
        vit_patch_size / vae_token_stride / max_image_side / view_sizing / pad_to_multiple: :class:`Packer`
            settings. ``view_sizing`` (a :class:`~chatumm_kit.data.view_sizing.ViewSizing`, a mapping
            ``{vit: {min_side, max_side, stride, max_pixels}, vae: {...}}`` or a preset name such as ``bagel``) sizes
            each view on its own (SPEC §4.1); without it both views shrink to ``max_image_side``.
        token_budget: tokens per packed batch.
        max_sample_tokens: longest sample kept (default ``token_budget``); longer ones are skipped and counted.
        overflow_size: samples that may wait in the batcher's overflow buffer.
        drop_rates: CFG dropout rates for training (:class:`CFGDropRates` or a mapping ``{text, vit, vae}``).
        word_noise: corrupts user text in training (:class:`~chatumm_kit.data.word_noise.WordNoise`); never in
            validation. ``None`` for none.
        num_workers: DataLoader workers per rank (0: read in the main process).
        shuffle_buffer: raw samples in the shuffle buffer (training; ``<= 1`` keeps order).
        resampled: draw shards with replacement (multi-rank training); see the module docstring.
        batches_per_epoch: resampled mode: batches per rank per epoch (``None``: endless).
        seed: base seed of every draw (shard order, mixing, shuffle, CFG dropout).
        rank / world_size: override the rank and world size (default: the trainer's, else torch.distributed, else
            the ``RANK`` / ``WORLD_SIZE`` environment, else 0 / 1).
        max_health_examples: skip examples kept per worker.
        max_image_pixels: skip samples with an image of more pixels, read from its header before decoding
            (images are also reduced while decoding to what ``max_image_side`` needs).
        stall_after_samples: stop the run with one line saying why (top skip reasons, the token budget vs the
            shortest sample) when this many samples in a row could not join a batch; an epoch in which no worker
            made a batch stops it too. Never a silent spin.

    Example:
        >>> dm = DialogueDataModule(train_sources=[{"name": "s", "shards": "data/index.json"}],
        ...                         tokenizer="tok.json", token_budget=1024, num_workers=0)   # doctest: +SKIP
        >>> dm.setup("fit")                                                                   # doctest: +SKIP
        >>> batch = dm.consume(next(iter(dm.train_dataloader())))                             # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        train_sources: Sequence[SourceSpec | Mapping[str, Any]],
        val_sources: Sequence[SourceSpec | Mapping[str, Any]] | None = None,
        tokenizer: ChatTokenizer | str | Path,
        vit_patch_size: int | None = None,
        vae_token_stride: int | None = None,
        max_image_side: int = 980,
        view_sizing: ViewSizing | Mapping[str, Any] | str | None = None,
        pad_to_multiple: int = 1,
        token_budget: int = 4096,
        max_sample_tokens: int | None = None,
        overflow_size: int = 32,
        drop_rates: CFGDropRates | Mapping[str, float] | None = None,
        word_noise: WordNoise | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_health_examples: int = 16,
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
        stall_after_samples: int = 1000,
    ) -> None:
        super().__init__()
        self.train_sources = [SourceSpec.coerce(s, where=f"train_sources[{i}]") for i, s in enumerate(train_sources)]
        self.val_sources = [SourceSpec.coerce(s, where=f"val_sources[{i}]") for i, s in enumerate(val_sources or [])]
        if not self.train_sources:
            raise ValueError("DialogueDataModule: train_sources is empty")
        for name, specs in (("train_sources", self.train_sources), ("val_sources", self.val_sources)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"DialogueDataModule: {name} has duplicate names {names}")
        if batches_per_epoch is not None and not resampled:
            raise ValueError(
                "DialogueDataModule: batches_per_epoch needs resampled=True (non-resampled epochs end "
                "when the shards do)"
            )
        if (rank is None) != (world_size is None):
            raise ValueError("DialogueDataModule: give both rank and world_size, or neither")
        self.tokenizer = _load_tokenizer(tokenizer)
        if isinstance(drop_rates, Mapping):
            drop_rates = CFGDropRates(**drop_rates)
        self.drop_rates = drop_rates if drop_rates is not None else CFGDropRates()
        if word_noise is not None and not isinstance(word_noise, WordNoise):
            raise ValueError(f"DialogueDataModule.word_noise must be a WordNoise, got {type(word_noise).__name__}")
        self.word_noise = word_noise
        self._max_image_side = max_image_side
        self.stream_settings: dict[str, int | None] = {
            "vit_patch_size": vit_patch_size,
            "vae_token_stride": vae_token_stride,
        }
        self.view_sizing: ViewSizing | None = None  # None until the model's stream settings arrive
        if view_sizing is not None or None not in self.stream_settings.values():
            self.view_sizing = resolve_view_sizing(
                view_sizing, **self.stream_settings, max_image_side=max_image_side, where="DialogueDataModule"
            )
        self.packer_kwargs = dict(pad_to_multiple=pad_to_multiple)
        self.token_budget = int(token_budget)
        self.max_sample_tokens = int(max_sample_tokens) if max_sample_tokens is not None else self.token_budget
        self.overflow_size = overflow_size
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.resampled = bool(resampled)
        self.batches_per_epoch = batches_per_epoch
        self.seed = int(seed)
        self._rank_override = (rank, world_size)
        self.max_health_examples = max_health_examples
        self.max_image_pixels = max_image_pixels
        self.stall_after_samples = int(stall_after_samples)
        self.rank, self.world_size = 0, 1
        self.train_stream: DialogueStream | None = None
        self.val_stream: DialogueStream | None = None
        self._fingerprint = ""
        # Main-process bookkeeping (see consume / state_dict).
        self._epoch: int | None = None
        self._next_epoch = 0
        self._positions: dict[int, DataPosition] = {}
        self._last_worker: int | None = None  # worker of the last consumed training batch (the round-robin's place)
        self._healths: dict[str, dict[int, DataHealth]] = {"train": {}, "val": {}}
        self._restored: dict[str, Any] | None = None
        self.last_epoch_health: dict[str, DataHealth] = {}

    @classmethod
    def check_recipe_arguments(cls, kwargs: dict[str, Any]) -> list[str]:
        """``chatumm validate`` hook: the packer and budget settings, checked by the rules the constructors apply
        (:func:`~chatumm_kit.data.packing.packer_setting_problems`, :func:`~chatumm_kit.data.packing.budget_problems`)
        before any shard or tokenizer exists."""
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        names = ("vit_patch_size", "vae_token_stride", "max_image_side", "pad_to_multiple", "token_budget")
        v = {k: kwargs.get(k, defaults.get(k)) for k in (*names, "max_sample_tokens")}
        if not all(isinstance(v[k], int) and not isinstance(v[k], bool) for k in names):
            return []  # a wrong type is reported by the signature check
        if not isinstance(v["max_sample_tokens"], int):
            v["max_sample_tokens"] = 1  # not given (the budget) or mistyped (reported by the signature check)
        found = packer_setting_problems(**{k: v[k] for k in names[:4]}) + budget_problems(
            token_budget=v["token_budget"],
            max_sample_tokens=v["max_sample_tokens"],
            pad_to_multiple=v["pad_to_multiple"],
        )
        return [f"{key}: {message}" for key, message in found]

    # ----------------------------------------------------------------- setup
    def use_model_settings(self, model: ChatUMM) -> None:
        """Take the stream settings ``model`` fixes where none were given; raise (one line, both values) where a
        given one differs. Call before the first dataloader (``ChatUMMSystem.configure_model`` does)."""
        if self.view_sizing is not None:
            check_stream_settings(
                model,
                where="data",
                vit_patch_size=self.view_sizing.vit.stride,
                vae_token_stride=self.view_sizing.vae.stride,
            )
            return
        given = {k: v for k, v in self.stream_settings.items() if v is not None}
        check_stream_settings(model, where="data", **given)
        self.stream_settings = dict(model_stream_settings(model))
        self.view_sizing = resolve_view_sizing(
            None, **self.stream_settings, max_image_side=self._max_image_side, where="DialogueDataModule"
        )

    def _packer(self, drop_rates: CFGDropRates) -> Packer:
        if self.view_sizing is None:
            missing = [k for k, v in self.stream_settings.items() if v is None]
            raise ValueError(
                f"DialogueDataModule: {' and '.join(missing)} not set; give them (data.{missing[0]}=...) or train "
                "with a ChatUMMSystem, which takes them from its model"
            )
        return Packer(
            tokenizer=self.tokenizer, drop_rates=drop_rates, view_sizing=self.view_sizing, **self.packer_kwargs
        )

    @property
    def _workers(self) -> int:
        return max(1, self.num_workers)

    def _resolve_rank(self) -> tuple[int, int]:
        rank, world = self._rank_override
        if rank is not None and world is not None:
            return int(rank), int(world)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        rank, world, _, _ = pytorch_worker_info()
        return rank, world

    def _make_stream(self, specs: list[SourceSpec], *, stage: str) -> DialogueStream:
        sources = [ResolvedSource.resolve(s, where=f"{stage}_sources") for s in specs]
        n_shards = sum(len(s.shards) for s in sources)
        resampled = self.resampled and stage == "train"
        if not resampled:
            if n_shards < self.world_size:
                raise ValueError(
                    f"DialogueDataModule({stage}): {n_shards} shards for {self.world_size} ranks; non-resampled mode "
                    f"needs at least one shard per rank (a rank without data would hang the others). Write more, "
                    f"smaller shards, or use resampled=True"
                )
            if n_shards < self.world_size * self._workers:
                logger.warning(
                    "%s: %d shards for %d ranks x %d workers: some workers will idle; write >= %d shards",
                    stage, n_shards, self.world_size, self._workers, self.world_size * self._workers,
                )  # fmt: skip
        drop = self.drop_rates if stage == "train" else CFGDropRates.disabled()
        packer = self._packer(drop)
        stream = DialogueStream(
            sources=sources,
            packer=packer,
            token_budget=self.token_budget,
            max_sample_tokens=self.max_sample_tokens,
            overflow_size=self.overflow_size,
            shuffle_buffer=self.shuffle_buffer if stage == "train" else 0,
            shuffle_shards=stage == "train",
            resampled=resampled,
            batches_per_epoch=self.batches_per_epoch if resampled else None,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            stage=stage,
            max_health_examples=self.max_health_examples,
            word_noise=self.word_noise if stage == "train" else None,
            max_image_pixels=self.max_image_pixels,
            stall_after_samples=self.stall_after_samples,
        )
        if stage == "train":
            self._fingerprint = sources_fingerprint(sources)
        return stream

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard lists and build the streams (idempotent; with stream settings still to come from the
        model, the streams are built by the first dataloader)."""
        self.rank, self.world_size = self._resolve_rank()
        if self.view_sizing is None and getattr(self, "trainer", None) is not None:
            return  # Lightning calls setup before configure_model: the system hands over its model in between
        self._build_streams(stage)

    def _build_streams(self, stage: str | None) -> None:
        def stale(stream: DialogueStream | None) -> bool:  # built before the trainer told us our rank
            return stream is None or (stream.rank, stream.world_size) != (self.rank, self.world_size)

        if stage in (None, "fit") and stale(self.train_stream):
            self.train_stream = self._make_stream(self.train_sources, stage="train")
        if stage in (None, "fit", "validate") and self.val_sources and stale(self.val_stream):
            self.val_stream = self._make_stream(self.val_sources, stage="val")

    # ----------------------------------------------------------------- loaders
    def _loader(
        self, stream: DialogueStream, *, on_start: Callable[[], int | None], on_end: Callable[[], None]
    ) -> DataLoader:
        return _EpochLoader(
            stream,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            persistent_workers=False,  # each epoch's workers must see that epoch's plan
            on_start=on_start,
            on_end=on_end,
            on_note=lambda note: self._healths.setdefault(note.stage, {}).__setitem__(note.worker, note.health),
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_stream is None:
            self.rank, self.world_size = self._resolve_rank()
            self._build_streams("fit")
        assert self.train_stream is not None
        return self._loader(
            self.train_stream, on_start=self._begin_train_epoch, on_end=lambda: self._end_epoch("train")
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        if self.val_stream is None:
            self.rank, self.world_size = self._resolve_rank()
            self._build_streams("validate")
        assert self.val_stream is not None
        return self._loader(self.val_stream, on_start=self._begin_val_epoch, on_end=lambda: self._end_epoch("val"))

    def _current_train_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.current_epoch)
        return self._next_epoch

    def _begin_train_epoch(self) -> int | None:
        """Plan the training epoch; returns the worker whose batch was consumed last before a restored position."""
        assert self.train_stream is not None
        epoch = self._current_train_epoch()
        resume: dict[int, tuple[DataPosition, DataHealth]] = {}
        last_worker = None
        if self._restored is not None:
            resume, last_worker = self._take_restored(epoch)
        self._epoch, self._next_epoch = epoch, epoch + 1
        self._positions = {w: pos for w, (pos, _) in resume.items()}
        self._healths["train"] = {w: h for w, (_, h) in resume.items()}
        self._last_worker = last_worker
        self.train_stream.set_plan(epoch=epoch, resume=resume)
        return last_worker

    def _begin_val_epoch(self) -> None:
        # Validation has its own stream, packer and bookkeeping: it never moves the training position.
        assert self.val_stream is not None
        self._healths["val"] = {}
        self.val_stream.set_plan(epoch=0, resume={})  # validation: the same order every time

    def _end_epoch(self, stage: str) -> None:
        health = self.health(stage)
        self.last_epoch_health[stage] = health
        title = f"{stage} data, epoch {self._epoch}" if stage == "train" else f"{stage} data"
        logger.log(logging.WARNING if health.total_skipped else logging.INFO, "%s", health.summary(title=title))

    # ----------------------------------------------------------------- batches
    def consume(self, item: StreamBatch) -> PackedBatch:
        """Record a batch's position and health as consumed by training; return its :class:`PackedBatch`."""
        w = item.position.worker
        self._healths.setdefault(item.stage, {})[w] = item.health
        if item.stage == "train":
            self._positions[w] = item.position
            self._last_worker = w
        return item.batch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this on the batch it is about to train on (not on the one it prefetched): the right
        # moment to count the batch as consumed.
        return self.consume(batch) if isinstance(batch, StreamBatch) else batch

    def health(self, stage: str = "train") -> DataHealth:
        """The running skip counts of ``stage`` ("train" or "val") in the current epoch, merged over workers."""
        return DataHealth.merged(list(self._healths.get(stage, {}).values()))

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The data position of every rank and worker in the current training epoch (empty before training)."""
        if self._epoch is None:
            return {}
        own = {
            "positions": {str(w): p.to_dict() for w, p in self._positions.items()},
            "health": {str(w): h.to_dict() for w, h in self._healths["train"].items()},
            "last_worker": self._last_worker,
        }
        ranks = {str(self.rank): own}
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (self.rank, own))
            ranks = {str(r): o for r, o in gathered}
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": self._workers,
            "resampled": self.resampled,
            "sources": self._fingerprint,
            "ranks": ranks,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a saved position; it is applied when the next training iterator of the same epoch starts."""
        if not state_dict:
            return
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"DialogueDataModule.load_state_dict: unknown state version {state_dict.get('version')}")
        self._restored = dict(state_dict)
        self._next_epoch = int(state_dict["epoch"])

    def _take_restored(self, epoch: int) -> tuple[dict[int, tuple[DataPosition, DataHealth]], int | None]:
        state, self._restored = self._restored, None
        assert state is not None
        if self.train_stream is not None and not self._fingerprint:
            self._fingerprint = sources_fingerprint(self.train_stream.sources)
        now = {
            "epoch": epoch,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": self._workers,
            "resampled": self.resampled,
            "sources": self._fingerprint,
        }
        diff = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if diff:
            level = logging.INFO if set(diff) == {"epoch"} else logging.WARNING
            logger.log(level, "data position not restored (saved vs now: %s); epoch %d starts from its beginning",
                       diff, epoch)  # fmt: skip
            return {}, None
        own = state["ranks"].get(str(self.rank), {"positions": {}, "health": {}})
        out = {}
        for w, p in own["positions"].items():
            health = DataHealth.from_dict(own["health"].get(w, {}))
            out[int(w)] = (DataPosition.from_dict(p), health)
        last = own.get("last_worker")
        return out, (int(last) if last is not None else None)
