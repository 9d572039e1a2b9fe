"""Counting what the data pipeline skipped, and why: :class:`DataHealth`.

Bad input never crashes a run and is never dropped silently: each skipped sample (or unusable shard) is recorded
under a :class:`SkipReason` with a bounded list of examples naming the shard, the sample key and the problem. The
stream carries each worker's health to the main process beside its batches; the datamodule merges them, logs a
summary at the end of each epoch and returns it (:meth:`DataHealth.metrics`) so training can log it to TensorBoard.

Sample-level reasons count samples. Shard-level reasons (:attr:`SkipReason.EMPTY_SHARD`,
:attr:`SkipReason.TRUNCATED_SHARD`, :attr:`SkipReason.UNREADABLE_SHARD`) count *distinct shards*: a bad shard drawn
twice in resampled mode, or read again while a resumed run replays its position, is one problem, not two.

Example:
    >>> h = DataHealth()
    >>> h.record(SkipReason.CORRUPT_IMAGE, shard="shard-000000.tar", key="000003", message="img0: bad PNG")
    >>> h.counts
    {'corrupt_image': 1}
    >>> h.merge(h).counts
    {'corrupt_image': 2}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["SkipReason", "SkipExample", "DataHealth", "SHARD_REASONS"]


class SkipReason(str, Enum):
    """Why a sample or a shard was skipped."""

    MISSING_JSON = "missing_json"  # a sample with no ``json`` member (its dialogue)
    MALFORMED_JSON = "malformed_json"  # JSON that does not parse, or breaks the Dialogue schema
    BAD_MEMBER = "bad_member"  # an ``img.*`` member whose name encodes no valid image key, or a duplicate member
    CORRUPT_IMAGE = "corrupt_image"  # image bytes that do not decode to an RGB image
    IMAGE_TOO_LARGE = "image_too_large"  # an image whose header declares more pixels than ``max_image_pixels``
    UNRESOLVED_IMAGE = "unresolved_image"  # the dialogue references an image key the sample does not carry
    OVER_LENGTH = "over_length"  # more tokens than the packer's per-sample cap (``max_sample_tokens``)
    UNPACKABLE = "unpackable"  # the packer cannot serialise it (e.g. a text segment that encodes to no token)
    NOT_PACKED = "not_packed"  # accepted by the stream but never emitted by the batcher (should stay 0)
    EMPTY_SHARD = "empty_shard"  # a shard with no sample (zero-byte file or an archive with no member)
    TRUNCATED_SHARD = "truncated_shard"  # a tar that ends early or is corrupt, or holds fewer samples than indexed
    UNREADABLE_SHARD = "unreadable_shard"  # a shard that cannot be opened (missing file, permissions)


SHARD_REASONS = frozenset({SkipReason.EMPTY_SHARD, SkipReason.TRUNCATED_SHARD, SkipReason.UNREADABLE_SHARD})


@dataclass
class SkipExample:
    """One recorded skip: which reason, where (shard path and sample key; key empty for a shard), and what.

    Not frozen: Lightning's ``apply_to_collection`` (precision input conversion) refuses frozen dataclasses, and a
    health travels inside each :class:`~chatumm_kit.data.streaming.StreamBatch`.
    """

    reason: str
    shard: str
    key: str
    message: str


@dataclass
class DataHealth:
    """Counts of good samples and of skips by reason, plus a bounded list of examples.

    Attributes:
        samples_ok: samples that decoded, passed every check and were delivered (emitted in a batch by the stream,
            or yielded by :func:`~chatumm_kit.data.shards.read_samples`).
        sample_skips: reason value → number of skipped samples (sample-level reasons).
        bad_shards: shard file name → reason value (shard-level reasons; one entry per distinct shard).
        examples: the first ``max_examples`` skips, for the log.
        max_examples: bound on ``examples``.
    """

    samples_ok: int = 0
    sample_skips: dict[str, int] = field(default_factory=dict)
    bad_shards: dict[str, str] = field(default_factory=dict)
    examples: list[SkipExample] = field(default_factory=list)
    max_examples: int = 16

    # ----------------------------------------------------------------- recording
    def record(self, reason: SkipReason, *, shard: str, key: str = "", message: str = "") -> None:
        """Count one skip. A shard-level reason for a shard already recorded is not counted again."""
        reason = SkipReason(reason)
        if reason in SHARD_REASONS:
            if shard in self.bad_shards:
                return
            self.bad_shards[shard] = reason.value
        else:
            self.sample_skips[reason.value] = self.sample_skips.get(reason.value, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(SkipExample(reason=reason.value, shard=shard, key=key, message=message))

    # ----------------------------------------------------------------- reading
    @property
    def counts(self) -> dict[str, int]:
        """Reason value → count (samples for sample-level reasons, distinct shards for shard-level ones)."""
        out = dict(self.sample_skips)
        for reason in self.bad_shards.values():
            out[reason] = out.get(reason, 0) + 1
        return dict(sorted(out.items()))

    @property
    def total_skipped(self) -> int:
        """Skipped samples plus bad shards."""
        return sum(self.sample_skips.values()) + len(self.bad_shards)

    def merge(self, other: DataHealth) -> DataHealth:
        """A new health holding both (sample counts add; bad shards are a union; examples are concatenated)."""
        skips = dict(self.sample_skips)
        for k, v in other.sample_skips.items():
            skips[k] = skips.get(k, 0) + v
        shards = dict(self.bad_shards)
        for k, v in other.bad_shards.items():
            shards.setdefault(k, v)
        examples = (self.examples + [e for e in other.examples if e not in self.examples])[: self.max_examples]
        return DataHealth(
            samples_ok=self.samples_ok + other.samples_ok,
            sample_skips=skips,
            bad_shards=shards,
            examples=examples,
            max_examples=self.max_examples,
        )

    @classmethod
    def merged(cls, healths: list[DataHealth]) -> DataHealth:
        out = cls()
        for h in healths:
            out = out.merge(h)
        return out

    def copy(self) -> DataHealth:
        return DataHealth(
            samples_ok=self.samples_ok,
            sample_skips=dict(self.sample_skips),
            bad_shards=dict(self.bad_shards),
            examples=list(self.examples),
            max_examples=self.max_examples,
        )

    def summary(self, *, title: str = "data") -> str:
        """A few human-readable lines: totals, counts per reason, then the examples."""
        head = f"{title}: {self.samples_ok} samples ok, {self.total_skipped} skipped"
        if not self.total_skipped:
            return head
        lines = [head + " (" + ", ".join(f"{k}: {v}" for k, v in self.counts.items()) + ")"]
        for e in self.examples:
            where = f"{e.shard}/{e.key}" if e.key else e.shard
            lines.append(f"  [{e.reason}] {where}: {e.message}")
        return "\n".join(lines)

    def metrics(self, *, prefix: str = "data/") -> dict[str, float]:
        """Flat scalars for a logger: ``{prefix}samples_ok``, ``{prefix}skipped``, ``{prefix}skip/<reason>``."""
        out = {f"{prefix}samples_ok": float(self.samples_ok), f"{prefix}skipped": float(self.total_skipped)}
        for reason, n in self.counts.items():
            out[f"{prefix}skip/{reason}"] = float(n)
        return out

    # ----------------------------------------------------------------- (de)serialisation for checkpoints
    def to_dict(self) -> dict[str, Any]:
        return {
            "samples_ok": self.samples_ok,
            "sample_skips": dict(self.sample_skips),
            "bad_shards": dict(self.bad_shards),
            "examples": [[e.reason, e.shard, e.key, e.message] for e in self.examples],
            "max_examples": self.max_examples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataHealth:
        return cls(
            samples_ok=int(data.get("samples_ok", 0)),
            sample_skips={str(k): int(v) for k, v in data.get("sample_skips", {}).items()},
            bad_shards={str(k): str(v) for k, v in data.get("bad_shards", {}).items()},
            examples=[SkipExample(*map(str, e)) for e in data.get("examples", [])],
            max_examples=int(data.get("max_examples", 16)),
        )
