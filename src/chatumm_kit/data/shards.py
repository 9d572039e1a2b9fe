"""The shard format: dialogues and their pixels in webdataset tar files, plus an ``index.json``.

**One sample** is a group of tar members sharing a key (webdataset convention ``{key}.{extension}``):

* ``{key}.json`` — the dialogue, :meth:`Dialogue.to_json`;
* ``{key}.img.{ekey}.png`` (or ``.jpg``) — one member per image, where ``ekey`` is the image key encoded by
  :func:`encode_image_key`: a key made only of ``[a-z0-9_]`` is kept as is (``img0`` → ``img.img0.png``);
  any other key becomes ``x-`` + the hex of its UTF-8 bytes (``Cat.v2`` → ``img.x-4361742e7632.png``). The encoding
  is reversible and keeps every extension lower-case and dot-free, which webdataset needs (it splits a member name
  at the first dot and lower-cases extensions). Other members are ignored by readers (room for future fields).

Keys are the sample's position in its shard (``000000``, ``000001``, …); the dialogue id lives in the JSON.

**Files.** A directory holds ``{prefix}-{NNNNNN}.tar`` shards and ``index.json`` (:class:`ShardIndex`: per-shard
file name and sample count). :class:`DialogueShardWriter` writes each shard as ``….tar.tmp``, fsyncs it and renames
it to ``….tar`` only when the shard is complete, then rewrites the index atomically; a writer that is killed or
raises leaves no ``.tar`` that looks complete, and the index never lists a shard that is not. Reopening a directory
resumes: numbering continues after the existing shards and the index is extended.

**Reading.** :func:`read_samples` decodes to :class:`DialogueSample` (images ``uint8 [3, H, W]``); bad input is
skipped and counted in a :class:`~chatumm_kit.data.skips.DataHealth`, never raised. The lower layers
(:func:`iter_shard`, :func:`decode_sample`) serve the streaming datamodule, which shuffles raw samples before
decoding them.

Example:
    >>> with DialogueShardWriter(directory=tmp, max_samples_per_shard=100) as w:   # doctest: +SKIP
    ...     w.write(sample)
    >>> [s.dialogue for s in read_samples(tmp)] == [sample.dialogue]               # doctest: +SKIP
    True
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import torch
import webdataset as wds
from torchvision.io import encode_jpeg, encode_png
from webdataset.tariterators import base_plus_ext

from chatumm_kit.data.dialogue import Dialogue, DialogueSample
from chatumm_kit.data.image_decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_rgb
from chatumm_kit.data.skips import DataHealth, SkipReason

__all__ = [
    "INDEX_NAME",
    "IMAGE_FORMATS",
    "ShardFormatError",
    "ShardEntry",
    "ShardIndex",
    "ShardRef",
    "RawSample",
    "DialogueShardWriter",
    "encode_image_key",
    "decode_image_key",
    "image_member_name",
    "resolve_shards",
    "iter_shard",
    "decode_sample",
    "read_samples",
]

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
IMAGE_FORMATS = ("png", "jpg")
_IMAGE_SUFFIXES = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}
_SAFE_KEY = re.compile(r"[a-z0-9_]+")
_HEX_KEY = re.compile(r"x-((?:[0-9a-f]{2})*)")
_PREFIX = re.compile(r"[A-Za-z0-9_-]+")


class ShardFormatError(ValueError):
    """Something cannot be written in, or resolved as, the shard format; the message names what and where."""


# --------------------------------------------------------------------------------------------- image key naming
def encode_image_key(key: str) -> str:
    """The image key as it appears in a member extension (see the module docstring). Reversible."""
    if _SAFE_KEY.fullmatch(key):
        return key
    return "x-" + key.encode("utf-8").hex()


def decode_image_key(encoded: str) -> str:
    """Inverse of :func:`encode_image_key`; raises :class:`ShardFormatError` for a string it cannot produce."""
    if _SAFE_KEY.fullmatch(encoded):
        return encoded
    m = _HEX_KEY.fullmatch(encoded)
    if m is None:
        raise ShardFormatError(f"{encoded!r} is not an encoded image key ([a-z0-9_]+ or x-<hex of UTF-8>)")
    try:
        return bytes.fromhex(m.group(1)).decode("utf-8")
    except UnicodeDecodeError:
        raise ShardFormatError(f"{encoded!r}: hex does not decode as UTF-8") from None


def image_member_name(key: str, image_format: str = "png") -> str:
    """The webdataset extension of an image: ``img.<encoded key>.<png|jpg>``."""
    return f"img.{encode_image_key(key)}.{image_format}"


# --------------------------------------------------------------------------------------------- index
@dataclass(frozen=True)
class ShardEntry:
    """One shard of an index: its file name (relative to the index's directory) and how many samples it holds."""

    name: str
    num_samples: int


@dataclass
class ShardIndex:
    """The ``index.json`` of a shard directory.

    Example:
        >>> idx = ShardIndex(shards=[ShardEntry("shard-000000.tar", 3)])
        >>> idx.total_samples
        3
    """

    shards: list[ShardEntry] = field(default_factory=list)
    version: int = 1

    @property
    def total_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def paths(self, directory: str | Path) -> list[Path]:
        return [Path(directory) / s.name for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "total_samples": self.total_samples,
            "shards": [{"name": s.name, "num_samples": s.num_samples} for s in self.shards],
        }

    @classmethod
    def load(cls, path: str | Path) -> ShardIndex:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            shards = [ShardEntry(name=str(s["name"]), num_samples=int(s["num_samples"])) for s in data["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ShardFormatError(f"{path}: not a readable shard index ({type(e).__name__}: {e})") from None
        return cls(shards=shards, version=int(data.get("version", 1)))

    def save(self, path: str | Path) -> None:
        """Write atomically: a reader sees the old index or the new one, never half of one."""
        _atomic_write_bytes(Path(path), (json.dumps(self.to_dict(), indent=1) + "\n").encode())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------------------- writer
class DialogueShardWriter:
    """Writes :class:`DialogueSample` s into numbered webdataset shards with atomic finalisation and an index.

    Args:
        directory: where shards and ``index.json`` go (created if missing). One writer per directory at a time.
        prefix: shard file prefix, ``[A-Za-z0-9_-]+``; shards are ``{prefix}-{NNNNNN}.tar``.
        max_samples_per_shard: a shard is finalised when it holds this many samples.
        max_bytes_per_shard: optionally also finalise once a shard's size reaches about this many bytes (the tar
            stream buffers one 10 KiB record, so a shard may end up to that much larger).
        image_format: ``"png"`` (lossless) or ``"jpg"``.
        jpeg_quality: JPEG quality when ``image_format == "jpg"``.

    Use as a context manager. On a clean exit the open shard is finalised; when the block raises, the open shard
    is discarded (its ``.tar.tmp`` removed) and only shards finalised before stay listed. A killed process leaves a
    ``.tar.tmp`` that no reader picks up; the next writer with the same prefix removes it. Reopening a directory
    appends: numbering continues after the highest existing shard, nothing is overwritten.

    Example:
        >>> with DialogueShardWriter(directory="out", max_samples_per_shard=2) as w:   # doctest: +SKIP
        ...     for s in samples:
        ...         w.write(s)
        >>> ShardIndex.load("out/index.json").total_samples == len(samples)             # doctest: +SKIP
        True
    """

    def __init__(
        self,
        *,
        directory: str | Path,
        prefix: str = "shard",
        max_samples_per_shard: int = 1000,
        max_bytes_per_shard: int | None = None,
        image_format: str = "png",
        jpeg_quality: int = 95,
    ) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ShardFormatError(f"shard prefix {prefix!r}: use letters, digits, '_' and '-' only")
        if max_samples_per_shard < 1:
            raise ShardFormatError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        if image_format not in IMAGE_FORMATS:
            raise ShardFormatError(f"image_format {image_format!r}: expected one of {IMAGE_FORMATS}")
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_samples_per_shard = max_samples_per_shard
        self.max_bytes_per_shard = max_bytes_per_shard
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self._name_re = re.compile(re.escape(prefix) + r"-(\d{6,})\.tar")
        self.index = ShardIndex()
        self._next_number = 0
        self._opened = False
        self._file: Any = None
        self._tar: wds.TarWriter | None = None
        self._count = 0
        self._shard_name = ""

    # ----------------------------------------------------------------- lifecycle
    def open(self) -> DialogueShardWriter:
        """Prepare the directory: load its index, remove this prefix's stale temporaries, find the next number."""
        self.directory.mkdir(parents=True, exist_ok=True)
        index_path = self.directory / INDEX_NAME
        self.index = ShardIndex.load(index_path) if index_path.exists() else ShardIndex()
        numbers = [-1]
        for p in self.directory.iterdir():
            if p.name.endswith(".tar.tmp") and self._name_re.fullmatch(p.name[: -len(".tmp")]):
                logger.warning("removing %s: a shard left unfinished by an earlier writer", p)
                p.unlink()
                continue
            m = self._name_re.fullmatch(p.name)
            if m:
                numbers.append(int(m.group(1)))
        listed = {s.name for s in self.index.shards}
        unlisted = sorted(p.name for p in self.directory.glob(f"{self.prefix}-*.tar") if p.name not in listed)
        if unlisted:
            logger.warning("%s: shards not in %s (kept, not indexed): %s", self.directory, INDEX_NAME, unlisted)
        for s in self.index.shards:
            m = self._name_re.fullmatch(s.name)
            if m:
                numbers.append(int(m.group(1)))
        self._next_number = max(numbers) + 1
        self._opened = True
        return self

    def __enter__(self) -> DialogueShardWriter:
        return self.open()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> ShardIndex:
        """Finalise the open shard (if it holds samples) and return the index."""
        self._finish_shard()
        self._opened = False
        return self.index

    def abort(self) -> None:
        """Discard the open shard; finalised shards and the index stay as they are."""
        if self._tar is not None:
            tmp = self._tmp_path()
            try:
                self._tar.close()
                self._file.close()
            finally:
                self._tar, self._file = None, None
                tmp.unlink(missing_ok=True)
                logger.warning("discarded unfinished shard %s (%d samples)", tmp.name, self._count)
        self._opened = False

    # ----------------------------------------------------------------- writing
    def write(self, sample: DialogueSample) -> str:
        """Append one sample; returns ``"{shard file name}/{key}"``.

        Raises:
            DialogueError: the dialogue is invalid or references an image the sample does not carry.
            ShardFormatError: an image is not a ``uint8 [3, H, W]`` tensor.
        """
        if not self._opened:
            raise ShardFormatError("DialogueShardWriter: call open() or use it as a context manager before write()")
        sample.validate()
        # Encode every member before touching the tar, so a failing sample never leaves half a sample behind.
        members: dict[str, bytes] = {"json": sample.dialogue.to_json().encode("utf-8")}
        for key, img in sample.images.items():
            members[image_member_name(key, self.image_format)] = self._encode_image(img, where=(sample, key))
        if self._tar is None:
            self._start_shard()
        key = f"{self._count:06d}"
        self._tar.write({"__key__": key, **members})
        self._count += 1
        where = f"{self._shard_name}/{key}"
        full = self._count >= self.max_samples_per_shard
        if self.max_bytes_per_shard is not None and self._file.tell() >= self.max_bytes_per_shard:
            full = True
        if full:
            self._finish_shard()
        return where

    def _encode_image(self, img: torch.Tensor, *, where: tuple[DialogueSample, str]) -> bytes:
        sample, key = where
        if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            desc = f"{img.dtype} {tuple(img.shape)}" if isinstance(img, torch.Tensor) else type(img).__name__
            raise ShardFormatError(
                f"sample {sample.key or sample.dialogue.id!r} image {key!r}: expected uint8 [3, H, W], got {desc}"
            )
        img = img.contiguous()
        data = encode_png(img) if self.image_format == "png" else encode_jpeg(img, quality=self.jpeg_quality)
        return data.numpy().tobytes()

    def _tmp_path(self) -> Path:
        return self.directory / (self._shard_name + ".tmp")

    def _start_shard(self) -> None:
        self._shard_name = f"{self.prefix}-{self._next_number:06d}.tar"
        self._next_number += 1
        self._count = 0
        self._file = open(self._tmp_path(), "wb")
        # Fixed integer mtime → byte-reproducible shards (a float would cost a PAX header per member); PAX →
        # image keys of any length.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0, format="PAX_FORMAT")

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # writes the end-of-archive blocks; the file object is ours to close
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tar, self._file = None, None
        os.replace(self._tmp_path(), self.directory / self._shard_name)
        _fsync_dir(self.directory)
        # Rename first, then index: a crash in between leaves a complete but unlisted shard, never the reverse.
        self.index.shards.append(ShardEntry(name=self._shard_name, num_samples=self._count))
        self.index.save(self.directory / INDEX_NAME)


# --------------------------------------------------------------------------------------------- resolving sources
@dataclass(frozen=True)
class ShardRef:
    """A shard to read: its path and, when an index lists it, how many samples it should hold."""

    path: str
    num_samples: int | None = None

    @property
    def name(self) -> str:
        return Path(self.path).name


def _index_counts(directory: Path, cache: dict[Path, dict[str, int]]) -> dict[str, int]:
    if directory not in cache:
        index_path = directory / INDEX_NAME
        counts: dict[str, int] = {}
        if index_path.exists():
            try:
                counts = {s.name: s.num_samples for s in ShardIndex.load(index_path).shards}
            except ShardFormatError as e:
                logger.warning("ignoring unreadable index: %s", e)
        cache[directory] = counts
    return cache[directory]


def resolve_shards(spec: str | Path | Iterable[str | Path], *, where: str = "shards") -> list[ShardRef]:
    """Turn a shard specification into a list of :class:`ShardRef`.

    ``spec`` may be: the path of an ``index.json`` (its shards, with counts); a directory (its ``index.json`` if
    present, else its ``*.tar`` files sorted); a glob and/or brace pattern (``data/shard-{000000..000009}.tar``,
    ``data/*.tar``); a single ``.tar`` path; or a list of any of these. Counts are attached from the shard's
    directory's ``index.json`` where it lists the shard, so truncation can be detected.

    Raises:
        ShardFormatError: a pattern matches nothing or a named file does not exist (the message starts with ``where``).
    """
    cache: dict[Path, dict[str, int]] = {}
    if isinstance(spec, (list, tuple)):
        out: list[ShardRef] = []
        for i, s in enumerate(spec):
            out.extend(resolve_shards(s, where=f"{where}[{i}]"))
        return out
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        path = path / INDEX_NAME if (path / INDEX_NAME).exists() else path
        if path.is_dir():
            tars = sorted(path.glob("*.tar"))
            if not tars:
                raise ShardFormatError(f"{where}: directory {str(spec)!r} holds no .tar shard and no {INDEX_NAME}")
            return [ShardRef(str(p)) for p in tars]
    if path.suffix == ".json":
        if not path.exists():
            raise ShardFormatError(f"{where}: index {text!r} does not exist")
        index = ShardIndex.load(path)
        return [ShardRef(str(p), e.num_samples) for p, e in zip(index.paths(path.parent), index.shards)]
    patterns = list(braceexpand.braceexpand(text))
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = sorted(glob.glob(pattern))
            if not matched:
                raise ShardFormatError(f"{where}: pattern {pattern!r} matches no shard")
            paths.extend(matched)
        elif Path(pattern).is_file():
            paths.append(pattern)
        else:
            raise ShardFormatError(f"{where}: shard {pattern!r} does not exist")
    return [ShardRef(p, _index_counts(Path(p).parent, cache).get(Path(p).name)) for p in paths]


# --------------------------------------------------------------------------------------------- reading
@dataclass
class RawSample:
    """The undecoded members of one sample.

    Attributes:
        shard: the shard's path (as resolved), used in skip records.
        key: the sample key inside the shard.
        members: extension (``"json"``, ``"img.<ekey>.png"``, …) → bytes.
        problem: set when the members themselves are inconsistent (a duplicated extension).
    """

    shard: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's convention for archive metadata members


def _tar_members(f: Any, stop: list[int]) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of the regular members of a tar stream; ``stop[0]`` is set to the offset where reading
    ended (the header that ended the archive: end-of-archive zeros, or a damaged header tarfile stopped at)."""
    with tarfile.open(fileobj=f, mode="r|*") as tf:
        for info in tf:
            stop[0] = tf.offset
            if not info.isreg() or _META_MEMBER.match(info.name):
                continue
            data = tf.extractfile(info).read()
            stop[0] = tf.offset
            yield info.name, data
        stop[0] = tf.offset


def iter_shard(ref: ShardRef | str | Path, *, health: DataHealth) -> Iterator[RawSample]:
    """Raw samples of one shard, in file order. Shard-level problems are recorded in ``health``, never raised.

    A read error mid-archive ends the shard (samples before it are kept; the sample being read is lost and the
    record says so); so does a damaged member header (tarfile ends such an archive quietly; the bytes left after it
    tell) and a shard holding fewer samples than its index entry — each recorded as truncated.
    """
    ref = ref if isinstance(ref, ShardRef) else ShardRef(str(ref))
    count = 0
    current: RawSample | None = None
    try:
        f = open(ref.path, "rb")
    except OSError as e:
        health.record(SkipReason.UNREADABLE_SHARD, shard=ref.path, message=f"{type(e).__name__}: {e}")
        return
    expect = f" (index lists {ref.num_samples})" if ref.num_samples is not None else ""
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            health.record(SkipReason.EMPTY_SHARD, shard=ref.path, message="zero-byte file")
            return
        stop = [0]
        try:
            for name, data in _tar_members(f, stop):
                prefix, ext = base_plus_ext(name)
                if prefix is None:
                    continue  # a member name without an extension belongs to no sample
                if current is None or prefix != current.key:
                    if current is not None:
                        count += 1
                        yield current
                    current = RawSample(shard=ref.path, key=prefix)
                if ext in current.members:
                    current.problem = f"duplicate member {prefix}.{ext}"
                current.members[ext] = data
        except Exception as e:  # tarfile.ReadError, EOFError, zlib errors… whatever a damaged archive raises
            lost = f"; sample {current.key!r} lost" if current is not None else ""
            health.record(
                SkipReason.TRUNCATED_SHARD,
                shard=ref.path,
                message=f"read error after {count} complete samples{expect}{lost}: {type(e).__name__}: {e}",
            )
            return
        problem = _end_problem(f, stop[0])
        if current is not None and problem is not None:
            health.record(
                SkipReason.TRUNCATED_SHARD,
                shard=ref.path,
                message=f"{problem} after {count} complete samples{expect}; sample {current.key!r} lost (and any after it)",
            )
            return
    if current is not None:
        count += 1
        yield current
    if count == 0:
        health.record(SkipReason.EMPTY_SHARD, shard=ref.path, message="archive holds no sample")
    elif ref.num_samples is not None and count < ref.num_samples:
        health.record(
            SkipReason.TRUNCATED_SHARD, shard=ref.path, message=f"holds {count} samples, index lists {ref.num_samples}"
        )


def _end_problem(f: Any, offset: int) -> str | None:
    """Why an uncompressed tar that tarfile read to ``offset`` did not end properly, or ``None`` if it did.

    A complete archive ends with two zero blocks at ``offset``. Bytes that are not zeros there are a header tarfile
    could not parse (a flipped byte fails its checksum, and tarfile then ends the archive without a word); fewer
    than two blocks is a file cut short. Compressed archives are not checked (their stream errors raise instead).
    """
    f.seek(0)
    head = f.read(512)
    if head[257:262] != b"ustar":
        return None
    size = f.seek(0, os.SEEK_END)
    f.seek(offset)
    tail = f.read(1024)
    if len(tail) == 1024 and tail == bytes(1024):
        return None
    if tail[:512].strip(b"\0"):
        return f"damaged tar header at byte {offset} of {size}"
    return f"no end-of-archive marker (file ends at byte {size})"


def decode_sample(
    raw: RawSample,
    *,
    health: DataHealth,
    key: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> DialogueSample | None:
    """Decode one raw sample, or record why it is skipped and return ``None``. Never raises for bad data.

    Checks run cheapest first: members, JSON and schema, image references, then each image's header (the pixel
    cap) and decoding (:func:`~chatumm_kit.data.image_decode.decode_rgb`).

    Args:
        raw: the sample's members.
        health: where skips are recorded (``samples_ok`` is left to the caller, who knows when a sample counts).
        key: the :attr:`DialogueSample.key` to give; default ``"{shard file name}/{sample key}"``.
        max_pixels: skip a sample with an image of more pixels (read from the header, before decoding).
        min_side: reduce images while decoding, keeping their longer side ``>= min_side`` (the packer's
            ``max_image_side``); ``None`` decodes at full size.
    """

    def skip(reason: SkipReason, message: str) -> None:
        health.record(reason, shard=raw.shard, key=raw.key, message=message)

    if raw.problem is not None:
        return skip(SkipReason.BAD_MEMBER, raw.problem)
    if "json" not in raw.members:
        return skip(SkipReason.MISSING_JSON, f"no json member (members: {sorted(raw.members)})")
    image_data: dict[str, bytes] = {}
    for ext, data in raw.members.items():
        if not ext.startswith("img."):
            continue
        parts = ext.split(".")
        if len(parts) != 3 or parts[2].lower() not in _IMAGE_SUFFIXES:
            return skip(SkipReason.BAD_MEMBER, f"{ext!r} is not img.<key>.<png|jpg>")
        try:
            image_key = decode_image_key(parts[1])
        except ShardFormatError as e:
            return skip(SkipReason.BAD_MEMBER, f"{ext!r}: {e}")
        if image_key in image_data:
            return skip(SkipReason.BAD_MEMBER, f"image {image_key!r} stored twice")
        image_data[image_key] = data
    try:
        dialogue = Dialogue.from_json(raw.members["json"].decode("utf-8"))
    except Exception as e:  # DialogueError, UnicodeDecodeError, RecursionError on absurd nesting: all bad data
        return skip(SkipReason.MALFORMED_JSON, str(e) or type(e).__name__)
    missing = [k for k in dialogue.image_keys if k not in image_data]
    if missing:
        return skip(SkipReason.UNRESOLVED_IMAGE, f"dialogue {dialogue.id!r} references {missing}, not in the sample")
    images: dict[str, torch.Tensor] = {}
    for image_key, data in image_data.items():
        try:
            images[image_key] = decode_rgb(data, max_pixels=max_pixels, min_side=min_side, where=f"image {image_key!r}")
        except ImageDecodeError as e:
            return skip(SkipReason(e.reason), str(e))
        except Exception as e:  # a decoder bug or MemoryError on one sample must not end the worker
            return skip(SkipReason.CORRUPT_IMAGE, f"image {image_key!r}: {type(e).__name__}: {e}")
    return DialogueSample(dialogue=dialogue, images=images, key=key or f"{Path(raw.shard).name}/{raw.key}")


def read_samples(
    paths: str | Path | Iterable[str | Path | ShardRef], *, health: DataHealth | None = None
) -> Iterator[DialogueSample]:
    """Decoded samples of the given shards, in order; bad input is skipped and counted.

    Args:
        paths: anything :func:`resolve_shards` accepts, or a list of :class:`ShardRef`.
        health: where to count (``samples_ok`` and skips). When omitted, a private one is used and its summary is
            logged at the end (warning level when anything was skipped), so nothing is dropped silently.

    Example:
        >>> samples = list(read_samples("data/index.json"))   # doctest: +SKIP
    """
    own = health is None
    health = DataHealth() if health is None else health
    if isinstance(paths, (list, tuple)) and all(isinstance(p, ShardRef) for p in paths):
        refs = list(paths)
    else:
        refs = resolve_shards(paths)  # type: ignore[arg-type]
    for ref in refs:
        for raw in iter_shard(ref, health=health):
            sample = decode_sample(raw, health=health)
            if sample is not None:
                health.samples_ok += 1
                yield sample
    if own:
        logger.log(logging.WARNING if health.total_skipped else logging.INFO, "%s", health.summary(title="shards"))
