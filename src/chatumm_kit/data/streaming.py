"""The shard stream behind the datamodule: deterministic per worker, resumable to the exact sample.

**Order.** Each DataLoader worker of each rank reads its own *sample stream*, a pure function of
``(seed, epoch, rank, worker)`` and the shard list:

* non-resampled: the shards of all sources (shuffled per epoch with the seed, unless ``shuffle`` is off) are dealt
  round-robin to the ``world_size × num_workers`` slots ``rank * num_workers + worker``; a worker reads its shards,
  interleaving sources by weight (a seeded draw among sources not yet exhausted). Every sample is seen exactly once
  per epoch across ranks × workers. Slots without a shard stay idle, so shards ≥ ranks × workers keeps every worker
  busy; the datamodule refuses fewer shards than ranks (a rank without data would hang the others).
* resampled: each worker draws shards of each source with replacement (seeded) and mixes sources by weight; the
  stream is infinite and an epoch is ``batches_per_epoch`` batches per rank, split over the workers, so every rank
  yields the same number of batches (what DDP needs).

Raw (undecoded) samples then pass a seeded shuffle buffer (webdataset's), and each gets its *ordinal*: its place in
the worker's stream. Decoding, checks and packing (:class:`~chatumm_kit.data.packing.TokenBudgetBatcher`) follow.

**Position.** A sample counts as consumed when it is emitted inside a batch, or when it is skipped as bad. A worker's
:class:`DataPosition` is the set of consumed ordinals, stored as ``low`` (every ordinal below is consumed) plus the
few consumed ordinals above it (samples emitted while older ones still waited in the packer's overflow buffer).
Each batch travels as a :class:`StreamBatch`: the :class:`PackedBatch`, its worker's position *after* this batch,
and the worker's :class:`DataHealth` so far. The main process keeps the latest of each per worker (the datamodule
does it in ``on_before_batch_transfer``, i.e. when the batch is actually handed to training). On resume a worker
replays its stream from the start of the epoch, skipping consumed ordinals before decoding them: samples that were
waiting in the packer's buffer at save time come back, none is repeated. The replay re-reads the epoch's bytes up
to the position (no image decoding).

**Exact resume.** A resumed epoch yields the very batches the uninterrupted one would have: the position also
records the packer's buffer (``waiting``, in read order) and whether the stream had ended (``ended``: the packer
packs its tail first-fit decreasing), and the resumed packer starts from that buffer
(:class:`~chatumm_kit.data.packing.TokenBudgetBatcher`'s ``buffered`` / ``ended``). CFG dropout draws come from a
generator per sample seeded with ``(seed, epoch, rank, worker, sample key)`` (:meth:`DialogueStream.cfg_generator`),
never from a running generator, so they do not depend on where a run resumed; so do the draws of the optional
:class:`~chatumm_kit.data.word_noise.WordNoise` (:meth:`DialogueStream.noise_rng`), applied to each sample right
after decoding. (The datamodule restores the workers' round-robin order, see :mod:`chatumm_kit.data.datamodule`.)

Each worker holds back its latest batch until the next one is ready, so its last batch carries the final position
and health (including skips after the last emitted sample).

**No silent hang.** Every fault of one sample (schema, types, image decoding, the pixel cap, size) is a skip with its
reason, shard and key. When ``stall_after_samples`` samples in a row are skipped — none could join a batch: a token
budget below every sample, a shard of empty dialogues — the worker yields a :class:`StreamStall` instead of a
batch, and the datamodule's loader stops the run with a :class:`DataStallError` whose one line gives the top skip
reasons and the token budget vs the shortest sample. A worker whose stream ends without a batch yields one too; it
stops the run only if no worker made a batch in the epoch (resampled or not).

Example:
    >>> stream = DialogueStream(sources=[ResolvedSource.resolve(SourceSpec(name="s", shards="d/index.json"))],
    ...                         packer=packer, token_budget=1024, max_sample_tokens=1024)   # doctest: +SKIP
    >>> stream.set_plan(epoch=0, resume={})                                                 # doctest: +SKIP
    >>> next(iter(stream)).batch.seq_len                                                     # doctest: +SKIP
    1024
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from chatumm_kit.components.batch import PackedBatch
from chatumm_kit.data.dialogue import DialogueSample
from chatumm_kit.data.image_decode import DEFAULT_MAX_PIXELS
from chatumm_kit.data.packing import Packer, PackingError, TokenBudgetBatcher
from chatumm_kit.data.shards import RawSample, ShardRef, decode_sample, iter_shard, resolve_shards
from chatumm_kit.data.skips import DataHealth, SkipReason
from chatumm_kit.data.word_noise import WordNoise

__all__ = [
    "SourceSpec",
    "ResolvedSource",
    "DataPosition",
    "StreamBatch",
    "StreamStall",
    "DataStallError",
    "DialogueStream",
    "assign_shards",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- sources
@dataclass
class SourceSpec:
    """One data source of a mix.

    Attributes:
        name: a short name (appears in sample keys and logs).
        shards: an ``index.json`` path, a shard directory, a glob/brace pattern, or a list of them (see
            :func:`~chatumm_kit.data.shards.resolve_shards`).
        weight: relative sampling weight. Resampled mode: the share of samples drawn from this source.
            Non-resampled mode: every sample is still seen exactly once per epoch; weights only shape the order.

    Example (a recipe):
        train_sources:
          - {name: shapes, shards: data/shapes/index.json, weight: 3}
          - {name: chat, shards: "data/chat/shard-{000000..000009}.tar", weight: 1}
    """

    name: str
    shards: str | list[str]
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"SourceSpec.name must be a non-empty string without '/', got {self.name!r}")
        if not float(self.weight) > 0:
            raise ValueError(f"SourceSpec {self.name!r}: weight must be > 0, got {self.weight}")

    @classmethod
    def coerce(cls, value: SourceSpec | Mapping[str, Any], *, where: str = "source") -> SourceSpec:
        """Accept a :class:`SourceSpec` or a plain mapping (a YAML node) with the same keys."""
        if isinstance(value, SourceSpec):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"name", "shards", "weight"}
            if unknown or "name" not in value or "shards" not in value:
                raise ValueError(
                    f"{where}: a source needs keys name, shards (and optionally weight); got {sorted(value)}"
                )
            shards = value["shards"]
            shards = [str(s) for s in shards] if isinstance(shards, (list, tuple)) else str(shards)
            return cls(name=str(value["name"]), shards=shards, weight=float(value.get("weight", 1.0)))
        raise TypeError(f"{where}: expected a SourceSpec or a mapping, got {type(value).__name__}")


@dataclass
class ResolvedSource:
    """A :class:`SourceSpec` with its shard list resolved (done once, in the main process)."""

    name: str
    shards: list[ShardRef]
    weight: float

    @classmethod
    def resolve(cls, spec: SourceSpec, *, where: str = "source") -> ResolvedSource:
        return cls(
            name=spec.name, shards=resolve_shards(spec.shards, where=f"{where} {spec.name!r}"), weight=spec.weight
        )


def sources_fingerprint(sources: list[ResolvedSource]) -> str:
    """A short hash of names, weights and shard lists: a saved position only applies to the same stream."""
    text = repr([(s.name, s.weight, [(r.path, r.num_samples) for r in s.shards]) for s in sources])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rng(seed: int, *parts: object) -> random.Random:
    # String seeds hash with SHA-512 inside random.seed: the same in every process, unlike hash().
    return random.Random(":".join(map(str, ("chatumm", seed, *parts))))


def _torch_seed(seed: int, *parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, ("chatumm", seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def assign_shards(
    sources: list[ResolvedSource], *, num_slots: int, seed: int, epoch: int, shuffle: bool
) -> list[list[tuple[int, ShardRef]]]:
    """Deal every ``(source index, shard)`` to one of ``num_slots`` slots (non-resampled mode).

    The deal is the same in every process (it depends only on its arguments); slot ``rank * num_workers + worker``
    belongs to that worker of that rank.
    """
    shards = [(i, ref) for i, src in enumerate(sources) for ref in src.shards]
    if shuffle:
        _rng(seed, epoch, "shards").shuffle(shards)
    return [shards[slot::num_slots] for slot in range(num_slots)]


# --------------------------------------------------------------------------------------------- positions
@dataclass
class DataPosition:
    """What one worker of one rank has consumed of its stream in ``epoch``.

    Attributes:
        epoch / rank / worker / num_workers: whose stream this is.
        low: every ordinal ``< low`` is consumed.
        done_above: consumed ordinals ``> low``, sorted (bounded by the packer's overflow buffer).
        batches: batches this worker has emitted in the epoch.
        waiting: ordinals read but not yet emitted — the packer's buffer right after this batch — in read order.
            A resumed worker hands them back to the packer as that buffer, so the batches that follow are the
            ones an uninterrupted run would have packed.
        ended: the worker had read its whole stream (the packer was packing its tail).
    """

    epoch: int
    rank: int
    worker: int
    num_workers: int
    low: int = 0
    done_above: list[int] = field(default_factory=list)
    batches: int = 0
    waiting: list[int] = field(default_factory=list)
    ended: bool = False

    def is_done(self, ordinal: int) -> bool:
        return ordinal < self.low or ordinal in self.done_above

    @property
    def consumed(self) -> int:
        return self.low + len(self.done_above)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "rank": self.rank,
            "worker": self.worker,
            "num_workers": self.num_workers,
            "low": self.low,
            "done_above": list(self.done_above),
            "batches": self.batches,
            "waiting": list(self.waiting),
            "ended": self.ended,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataPosition:
        return cls(
            epoch=int(data["epoch"]),
            rank=int(data["rank"]),
            worker=int(data["worker"]),
            num_workers=int(data["num_workers"]),
            low=int(data["low"]),
            done_above=[int(x) for x in data.get("done_above", [])],
            batches=int(data.get("batches", 0)),
            waiting=[int(x) for x in data.get("waiting", [])],
            ended=bool(data.get("ended", False)),
        )


class _Progress:
    """The mutable consumed-ordinal set of a running worker."""

    def __init__(self, start: DataPosition) -> None:
        self.start = start
        self.low = start.low
        self.above = set(start.done_above)
        self.batches = start.batches

    def is_done(self, ordinal: int) -> bool:
        return ordinal < self.low or ordinal in self.above

    def mark(self, ordinal: int) -> None:
        if ordinal < self.low or ordinal in self.above:
            raise RuntimeError(f"data stream: ordinal {ordinal} consumed twice (worker {self.start.worker})")
        self.above.add(ordinal)
        while self.low in self.above:
            self.above.discard(self.low)
            self.low += 1

    def snapshot(self, *, waiting: list[int], ended: bool) -> DataPosition:
        return replace(
            self.start,
            low=self.low,
            done_above=sorted(self.above),
            batches=self.batches,
            waiting=list(waiting),
            ended=ended,
        )


@dataclass
class StreamBatch:
    """What the DataLoader yields: a batch, plus its worker's position and health for the main process.

    ``PackedBatch`` stays the model's contract; this wrapper is unwrapped by
    :meth:`DialogueDataModule.consume` (called from ``on_before_batch_transfer``), so ``training_step`` sees the
    plain :class:`PackedBatch`.

    Attributes:
        batch: the packed sequence.
        position: the worker's position after this batch.
        health: the worker's skip counts in this epoch so far (this batch's samples included in ``samples_ok``).
        stage: ``"train"`` or ``"val"``.
    """

    batch: PackedBatch
    position: DataPosition
    health: DataHealth
    stage: str = "train"


class DataStallError(RuntimeError):
    """The data cannot make a batch: the run stops with one line saying why (skip reasons, budget vs samples)."""


@dataclass
class StreamStall:
    """What a worker yields instead of a batch when its stream cannot make one (never reaches training).

    Attributes:
        message: one line: what was read, the top skip reasons, the token budget vs the shortest sample.
        health: the worker's skip counts so far.
        worker: the DataLoader worker id.
        stalled: ``True`` — ``stall_after_samples`` samples in a row were skipped (stop the run now);
            ``False`` — the worker's stream ended without a batch (stop only if no worker made one this epoch).
        read: samples and bad shards the worker met (0: a worker with no shard of its own).
        stage: ``"train"`` or ``"val"``.
    """

    message: str
    health: DataHealth
    worker: int
    stalled: bool
    read: int = 0
    stage: str = "train"


class _Stalled(Exception):
    """Raised inside a worker's sample loop when ``stall_after_samples`` samples in a row were skipped."""


def _top_reasons(counts: Mapping[str, int], limit: int = 3) -> str:
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return ", ".join(f"{k} {v}" for k, v in top) or "none"


# --------------------------------------------------------------------------------------------- the dataset
class DialogueStream(IterableDataset):
    """An ``IterableDataset`` of :class:`StreamBatch` es (use with ``DataLoader(batch_size=None)``).

    Args:
        sources: resolved sources.
        packer: the packer (pickled into each worker).
        token_budget / max_sample_tokens / overflow_size: :class:`TokenBudgetBatcher` settings.
        shuffle_buffer: raw samples held by the shuffle buffer; ``<= 1`` keeps file order.
        shuffle_shards: shuffle the shard deal per epoch (non-resampled mode).
        resampled: draw shards with replacement (infinite stream, see the module docstring).
        batches_per_epoch: resampled mode: batches per rank per epoch (``None``: endless epoch).
        seed: base seed of every draw.
        rank / world_size: this process's place among the ranks.
        stage: ``"train"`` or ``"val"`` (labels the batches; val batches carry no position to save).
        max_health_examples: examples kept per worker in its :class:`DataHealth`.
        word_noise: corrupts the user text of each decoded sample (training augmentation); ``None`` for none.
        max_image_pixels: skip a sample with an image of more pixels (read from the header, before decoding).
        stall_after_samples: this many samples skipped in a row (none could join a batch) stop the stream with a
            :class:`StreamStall` saying why, instead of spinning forever.

    Call :meth:`set_plan` in the main process before each epoch's ``iter()`` (the datamodule's loader does).
    """

    def __init__(
        self,
        *,
        sources: list[ResolvedSource],
        packer: Packer,
        token_budget: int,
        max_sample_tokens: int,
        overflow_size: int = 32,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        resampled: bool = False,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        stage: str = "train",
        max_health_examples: int = 16,
        word_noise: WordNoise | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
        stall_after_samples: int = 1000,
    ) -> None:
        super().__init__()
        if stall_after_samples < 1:
            raise ValueError(f"DialogueStream: stall_after_samples must be >= 1, got {stall_after_samples}")
        if not sources:
            raise ValueError(f"DialogueStream({stage}): no source")
        if not 0 <= rank < world_size:
            raise ValueError(f"DialogueStream: rank {rank} outside world_size {world_size}")
        if batches_per_epoch is not None and (not resampled or batches_per_epoch < 1):
            raise ValueError("DialogueStream: batches_per_epoch (>= 1) only applies in resampled mode")
        self.sources = sources
        self.packer = packer
        self.token_budget = token_budget
        self.max_sample_tokens = max_sample_tokens
        self.overflow_size = overflow_size
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.resampled = resampled
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.stage = stage
        self.max_health_examples = max_health_examples
        self.word_noise = word_noise
        self.max_image_pixels = max_image_pixels
        self.stall_after_samples = int(stall_after_samples)
        self.epoch = 0
        self.resume: dict[int, tuple[DataPosition, DataHealth]] = {}
        # Fail at construction, not in a worker: the batcher validates budget vs. the packer's padding multiple.
        TokenBudgetBatcher(packer=packer, token_budget=token_budget, max_sample_tokens=max_sample_tokens)

    def set_plan(self, *, epoch: int, resume: Mapping[int, tuple[DataPosition, DataHealth]]) -> None:
        """Fix the epoch and, per worker id, the position and health to resume from (main process)."""
        self.epoch = int(epoch)
        self.resume = dict(resume)

    def resume_positions(self) -> list[DataPosition]:
        """The positions this epoch resumes from (empty for a fresh epoch)."""
        return [pos for pos, _ in self.resume.values() if pos.epoch == self.epoch]

    def __len__(self) -> int:
        """Batches per rank per epoch; known only in resampled mode with ``batches_per_epoch``."""
        if self.batches_per_epoch is None:
            raise TypeError("DialogueStream has no length (non-resampled streams end when the shards do)")
        return self.batches_per_epoch

    # ----------------------------------------------------------------- raw streams
    def _quota(self, worker: int, num_workers: int) -> int | None:
        if self.batches_per_epoch is None:
            return None
        base, extra = divmod(self.batches_per_epoch, num_workers)
        return base + (1 if worker < extra else 0)

    def _mix(self, streams: list[Iterator[RawSample]], names: list[str], weights: list[float], rng: random.Random):
        """Interleave sources by weight until all are exhausted; yields ``(source name, raw sample)``."""
        live = list(range(len(streams)))
        while live:
            i = live[0] if len(live) == 1 else rng.choices(live, weights=[weights[j] for j in live])[0]
            try:
                raw = next(streams[i])
            except StopIteration:
                live.remove(i)
                continue
            yield names[i], raw

    def _resampled_source(self, src: ResolvedSource, rng: random.Random, health: DataHealth) -> Iterator[RawSample]:
        barren = 0  # consecutive shard draws that gave no sample: stop a source whose every shard is bad
        while src.shards:
            got = False
            for raw in iter_shard(rng.choice(src.shards), health=health):
                got = True
                yield raw
            barren = 0 if got else barren + 1
            if barren > 4 * len(src.shards) + 8:
                logger.error("source %r: %d shard draws in a row gave no sample; dropping the source", src.name, barren)
                return

    def _raw_stream(self, worker: int, num_workers: int, health: DataHealth) -> Iterator[tuple[int, str, RawSample]]:
        """``(ordinal, source name, raw sample)`` in this worker's deterministic order."""
        key = (self.epoch, self.rank, worker)
        names = [s.name for s in self.sources]
        weights = [float(s.weight) for s in self.sources]
        if self.resampled:
            streams = [
                self._resampled_source(s, _rng(self.seed, *key, "src", i), health) for i, s in enumerate(self.sources)
            ]
        else:
            slots = assign_shards(
                self.sources,
                num_slots=self.world_size * num_workers,
                seed=self.seed,
                epoch=self.epoch,
                shuffle=self.shuffle_shards,
            )
            mine = slots[self.rank * num_workers + worker]
            per_source: list[list[ShardRef]] = [[] for _ in self.sources]
            for i, ref in mine:
                per_source[i].append(ref)
            streams = [(raw for ref in refs for raw in iter_shard(ref, health=health)) for refs in per_source]
        mixed: Iterator[tuple[str, RawSample]] = self._mix(streams, names, weights, _rng(self.seed, *key, "mix"))
        if self.shuffle_buffer > 1:
            shuffle = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=_rng(self.seed, *key, "buf"))
            mixed = shuffle(mixed)
        for ordinal, (name, raw) in enumerate(mixed):
            yield ordinal, name, raw

    # ----------------------------------------------------------------- the worker loop
    def cfg_generator(self, key: str, *, worker: int) -> torch.Generator:
        """A fresh generator for the CFG dropout draws of the sample ``key`` read by ``worker`` (SPEC §4).

        A pure function of ``(seed, epoch, rank, worker, key)``; the key names source, shard, sample and ordinal.
        So a sample's draws do not depend on the batch it lands in, nor on where a resumed run started.
        """
        return torch.Generator().manual_seed(_torch_seed(self.seed, self.epoch, self.rank, worker, key, "cfg"))

    def noise_rng(self, key: str, *, worker: int) -> random.Random:
        """The random stream of the sample ``key``'s :class:`WordNoise` draws: like :meth:`cfg_generator`, a pure
        function of ``(seed, epoch, rank, worker, key)``."""
        return _rng(self.seed, self.epoch, self.rank, worker, key, "words")

    def _stall_line(self, what: str, *, worker: int, skipped: Mapping[str, int], shortest: int | None) -> str:
        where = f"{self.stage} data (worker {worker} of rank {self.rank}, epoch {self.epoch})"
        line = f"{where}: {what}; skips: {_top_reasons(skipped)}"
        if shortest is not None:
            line += (
                f"; token_budget {self.token_budget} (max_sample_tokens {self.max_sample_tokens}) but the shortest "
                f"sample needs {shortest} tokens"
            )
        return line

    def __iter__(self) -> Iterator[StreamBatch | StreamStall]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start, health = self.resume.get(worker, (None, None))
        if start is None or start.epoch != self.epoch:
            start = DataPosition(epoch=self.epoch, rank=self.rank, worker=worker, num_workers=num_workers)
            health = DataHealth(max_examples=self.max_health_examples)
        else:
            health = health.copy()
        progress = _Progress(start)
        quota = self._quota(worker, num_workers)
        if quota is not None and progress.batches >= quota:
            return
        batcher = TokenBudgetBatcher(
            packer=self.packer,
            token_budget=self.token_budget,
            max_sample_tokens=self.max_sample_tokens,
            overflow_size=self.overflow_size,
        )
        pending: dict[str, int] = {}  # sample key → ordinal, for samples handed to the batcher and not yet emitted
        ended = False  # the raw stream has run out (set by samples(); a resumed tail drains it below)

        # The stall watch: samples skipped in a row (reset by a sample that joins the batcher), their reasons, and
        # the fewest tokens an over-length one needed (in the run, and over the whole stream).
        barren_run, barren_skips = 0, Counter()
        barren_shortest: int | None = None
        shortest_ever: int | None = None

        def skipped(ordinal: int, reason: SkipReason, n_tokens: int | None = None) -> None:
            nonlocal barren_run, barren_shortest, shortest_ever
            progress.mark(ordinal)
            barren_run += 1
            barren_skips[reason.value] += 1
            if n_tokens is not None:
                barren_shortest = min(n_tokens, barren_shortest or n_tokens)
                shortest_ever = min(n_tokens, shortest_ever or n_tokens)
            if barren_run >= self.stall_after_samples:
                raise _Stalled()

        def samples() -> Iterator[DialogueSample]:
            nonlocal ended, barren_run, barren_shortest
            for ordinal, name, raw in self._raw_stream(worker, num_workers, health):
                if progress.is_done(ordinal):
                    continue  # consumed before the checkpoint this run resumed from
                key = f"{name}/{Path(raw.shard).name}/{raw.key}#{ordinal}"
                before = dict(health.sample_skips)
                sample = decode_sample(
                    raw,
                    health=health,
                    key=key,
                    max_pixels=self.max_image_pixels,
                    min_side=self.packer.max_image_side,
                )
                if sample is None:
                    reason = next(
                        (k for k, v in health.sample_skips.items() if v != before.get(k, 0)), "malformed_json"
                    )
                    skipped(ordinal, SkipReason(reason))
                    continue
                # Word noise and measuring run user-supplied text through the tokenizer: any failure is this
                # sample's, never the worker's.
                try:
                    if self.word_noise is not None:
                        sample = self.word_noise(sample, self.noise_rng(key, worker=worker))
                    n = self.packer.measure(sample)
                except Exception as e:
                    msg = str(e) if isinstance(e, PackingError) else f"{type(e).__name__}: {e}"
                    health.record(SkipReason.UNPACKABLE, shard=raw.shard, key=raw.key, message=msg)
                    skipped(ordinal, SkipReason.UNPACKABLE)
                    continue
                # The batcher would skip an over-cap sample itself; checking here names the reason and the size.
                if n > batcher.cap:
                    health.record(
                        SkipReason.OVER_LENGTH,
                        shard=raw.shard,
                        key=raw.key,
                        message=f"{n} tokens > cap {batcher.cap} (max_sample_tokens / token_budget)",
                    )
                    skipped(ordinal, SkipReason.OVER_LENGTH, n)
                    continue
                barren_run, barren_shortest = 0, None
                barren_skips.clear()
                pending[key] = ordinal
                yield sample
            ended = True

        def position() -> DataPosition:
            # Samples reach the batcher in ordinal order and its buffer keeps that order: ``pending`` is the buffer.
            return progress.snapshot(waiting=list(pending.values()), ended=ended)

        stream = samples()
        # Resume: the replay skips consumed ordinals, so the first samples it delivers are exactly the ones that
        # waited in the packer's buffer; they go back into the buffer, as they were, before any new sample.
        buffered = [s for s in (next(stream, None) for _ in start.waiting) if s is not None]
        replayed = list(pending.values())
        extra = next(stream, None) if start.ended else None  # a stream that had ended must have nothing left
        buffered += [extra] if extra is not None else []
        resume_ended = start.ended and extra is None
        if replayed != start.waiting or extra is not None:
            # Only if the shards' bytes changed (the fingerprint checks names and counts): still every sample once,
            # but the batches differ from the uninterrupted run's.
            logger.warning(
                "%s worker %d of rank %d, epoch %d: the replay does not match the saved position (waiting %s, "
                "ended=%s; replay gives %s): did the shards change since the checkpoint? Batches will differ from "
                "an uninterrupted run", self.stage, worker, self.rank, self.epoch, start.waiting, start.ended,
                list(pending.values()),
            )  # fmt: skip

        held: StreamBatch | None = None
        batches = batcher(
            stream,
            generator_for=lambda key: self.cfg_generator(key, worker=worker),
            buffered=buffered,
            ended=resume_ended,
        )
        try:
            for batch in batches:
                for key in batch.sample_keys:
                    if key not in pending:
                        raise RuntimeError(f"data stream: batcher emitted unknown sample key {key!r}")
                    progress.mark(pending.pop(key))
                health.samples_ok += len(batch.sample_keys)
                progress.batches += 1
                item = StreamBatch(batch=batch, position=position(), health=health.copy(), stage=self.stage)
                if held is not None:
                    yield held
                held = item
                if quota is not None and progress.batches >= quota:
                    break
            else:
                for key, ordinal in pending.items():  # the batcher flushes at the end; anything left is counted
                    health.record(
                        SkipReason.NOT_PACKED, shard=key.rsplit("#", 1)[0], message="never emitted in a batch"
                    )
                    progress.mark(ordinal)
                pending.clear()
        except _Stalled:
            if held is not None:
                yield replace(held, position=position(), health=health.copy())
            what = f"no sample could join a batch in the last {barren_run} read in a row"
            line = self._stall_line(what, worker=worker, skipped=barren_skips, shortest=barren_shortest)
            yield StreamStall(message=line, health=health.copy(), worker=worker, stalled=True, stage=self.stage)
            return
        if held is not None:
            yield replace(held, position=position(), health=health.copy())
        elif progress.batches == 0:
            read = health.samples_ok + sum(health.sample_skips.values())
            shards = f", bad shards: {_top_reasons(health.counts)}" if health.bad_shards else ""
            what = f"no batch from the {read} sample(s) it read{shards}"
            line = self._stall_line(
                what,
                worker=worker,
                skipped=health.sample_skips,
                shortest=shortest_ever,
            )
            yield StreamStall(
                message=line,
                health=health.copy(),
                worker=worker,
                stalled=False,
                read=read + len(health.bad_shards),
                stage=self.stage,
            )
