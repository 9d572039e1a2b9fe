"""Dataset adapters (JSONL + image folder, webdataset shards) and the record pool the chaining stage draws from.

An adapter turns rows of a single-turn dataset into typed records (:mod:`.records`). ``fields`` maps each record
field to where it lives in a row, so any dataset layout works without code:

* JSONL: a dotted JSON key (``"meta.caption"``); image fields hold a file path relative to ``image_root``;
* webdataset: a member extension (``"txt"``, ``"jpg|png"`` for alternatives) or a key inside the sample's JSON
  member (``"json.caption"``).

Images stay lazy: a JSONL image is read from its file when needed; a tar member is re-read by offset. Image keys
link records: JSONL images are keyed by their resolved path, tar images by a digest of their bytes, so a caption
record and a VQA record over the same picture, or an edit whose source is another edit's target, find each other.

A :class:`RecordPool` answers the two questions the chaining stage asks (SPEC §6 stage 1): "give me a fresh record of
kind X" and "give me a record of kind X that acts on this image". :class:`DatasetPool` answers them from records held
in memory (keys and text only); the ShapesChat pool (:mod:`.shapes_source`) makes records up from the world.

Example:
    >>> src = JsonlSource(path="t2i.jsonl", kind="t2i", fields={"caption": "text", "image": "file"})  # doctest: +SKIP
    >>> pool = DatasetPool(sources=[src])  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from chatumm_kit.data.image_decode import DEFAULT_MAX_PIXELS, ImageDecodeError, image_size
from chatumm_kit.synth.records import (
    RECORD_KINDS,
    CaptionRecord,
    ImageRef,
    Record,
    TextToImageRecord,
)

logger = logging.getLogger(__name__)

__all__ = [
    "RecordSource",
    "JsonlSource",
    "WebDatasetSource",
    "RecordPool",
    "DatasetPool",
    "DEFAULT_FIELDS",
    "IMAGE_FIELDS",
]

IMAGE_FIELDS = frozenset({"image", "source", "target"})

# Default locations of each record field: JSONL keys / webdataset extensions.
DEFAULT_FIELDS: dict[str, dict[str, dict[str, str]]] = {
    "jsonl": {
        "t2i": {"caption": "caption", "image": "image"},
        "edit": {"source": "source", "instruction": "instruction", "target": "target"},
        "vqa": {"image": "image", "question": "question", "answer": "answer"},
        "caption": {"image": "image", "caption": "caption"},
        "chat": {"prompt": "prompt", "response": "response"},
    },
    "wds": {
        "t2i": {"caption": "txt", "image": "jpg|jpeg|png|webp"},
        "edit": {"source": "src.jpg|src.png", "instruction": "txt", "target": "tgt.jpg|tgt.png"},
        "vqa": {"image": "jpg|jpeg|png|webp", "question": "json.question", "answer": "json.answer"},
        "caption": {"image": "jpg|jpeg|png|webp", "caption": "txt"},
        "chat": {"prompt": "json.prompt", "response": "json.response"},
    },
}


@runtime_checkable
class RecordSource(Protocol):
    """Anything iterable over records (an adapter, a list)."""

    def __iter__(self) -> Iterator[Record]: ...


def _record_fields(kind: str) -> list[str]:
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {sorted(RECORD_KINDS)}")
    return [f.name for f in dc_fields(RECORD_KINDS[kind]) if f.name not in ("id", "meta")]


def _field_map(fmt: str, kind: str, fields: Mapping[str, str] | None, where: str) -> dict[str, str]:
    wanted = _record_fields(kind)
    out = dict(DEFAULT_FIELDS[fmt][kind])
    for k, v in (fields or {}).items():
        if k not in wanted:
            raise ValueError(f"{where}: fields.{k}: a {kind!r} record has no field {k!r} (fields: {wanted})")
        out[k] = v
    return out


def _dig(row: Mapping[str, Any], dotted: str) -> Any:
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


class JsonlSource:
    """Records from a JSONL file; image fields are paths relative to ``image_root`` (default: the file's folder).

    Args:
        path: the ``.jsonl`` file.
        kind: ``t2i``, ``edit``, ``vqa``, ``caption`` or ``chat``.
        fields: record field → dotted JSON key (defaults: :data:`DEFAULT_FIELDS` ``["jsonl"]``).
        image_root: folder the image paths are relative to.
        id_field: dotted JSON key of a row id (default: ``<file stem>/<line number>``).
        limit: read at most this many rows.

    Rows with malformed JSON, a missing field, or an image that is missing, unreadable or over the pixel cap (read
    from its header) are skipped: counted by reason in ``skip_counts``, one message per row in ``skip_reasons``;
    :class:`DatasetPool` logs them and the synthesis report lists them.
    """

    def __init__(
        self,
        *,
        path: str | Path,
        kind: str,
        fields: Mapping[str, str] | None = None,
        image_root: str | Path | None = None,
        id_field: str | None = None,
        limit: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        self.fields = _field_map("jsonl", kind, fields, f"JsonlSource({self.path})")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.id_field = id_field
        self.limit = limit
        self.skip_reasons: list[str] = []
        self.skip_counts: Counter = Counter()

    @property
    def skipped(self) -> int:
        return len(self.skip_reasons)

    def _skip(self, code: str, message: str) -> None:
        self.skip_counts[code] += 1
        self.skip_reasons.append(message)

    def _image(self, rel: str) -> ImageRef:
        file = (self.image_root / rel).resolve()  # absolute: equal relative paths under other roots do not link
        return ImageRef.lazy(f"file:{file.as_posix()}", file.read_bytes)

    def _image_problem(self, rel: str) -> tuple[str, str] | None:
        """``(code, message)`` when the image file is missing, unreadable or too large (its header only is read)."""
        file = self.image_root / rel
        if not file.is_file():
            return "missing_image", f"image {rel!r} does not exist under {str(self.image_root)!r}"
        try:
            width, height = image_size(file, where=f"image {rel!r}")
        except ImageDecodeError as e:
            return e.reason, str(e)
        if width * height > DEFAULT_MAX_PIXELS:
            return "image_too_large", f"image {rel!r}: {width}x{height} pixels > cap {DEFAULT_MAX_PIXELS}"
        return None

    def __iter__(self) -> Iterator[Record]:
        self.skip_reasons = []
        self.skip_counts = Counter()
        cls = RECORD_KINDS[self.kind]
        with self.path.open(encoding="utf-8") as fh:
            n = 0
            for lineno, line in enumerate(fh, start=1):
                if self.limit is not None and n >= self.limit:
                    break
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    self._skip("malformed_json", f"{where}: malformed JSON: {e.msg}")
                    continue
                values: dict[str, Any] = {}
                for name, loc in self.fields.items():
                    v = _dig(row, loc)
                    if not isinstance(v, str) or not v:
                        self._skip("missing_field", f"{where}: field {name!r} (key {loc!r}) missing or not a string")
                        break
                    problem = self._image_problem(v) if name in IMAGE_FIELDS else None
                    if problem is not None:
                        self._skip(problem[0], f"{where}: field {name!r}: {problem[1]}")
                        break
                    values[name] = self._image(v) if name in IMAGE_FIELDS else v
                else:
                    rid = _dig(row, self.id_field) if self.id_field else None
                    rid = str(rid) if rid is not None else f"{self.path.stem}/{lineno}"
                    n += 1
                    yield cls(id=rid, **values)


class _TarMember:
    """Lazy reader of one tar member's bytes (by offset; the tar is re-opened on each read)."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self.path, self.offset, self.size = path, offset, size

    def __call__(self) -> bytes:
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            return fh.read(self.size)


def _expand(urls: str | Sequence[str]) -> list[Path]:
    import braceexpand

    items = [urls] if isinstance(urls, str) else list(urls)
    return [Path(p) for u in items for p in braceexpand.braceexpand(str(u))]


def _split_name(name: str) -> tuple[str, str]:
    """webdataset convention: ``dir/key.ext.ext`` → (``dir/key``, ``ext.ext``)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


class WebDatasetSource:
    """Records from webdataset tar shards (local paths; brace patterns such as ``data-{000..009}.tar`` expand).

    Args:
        urls: a shard path, a brace pattern, or a list of them.
        kind: record kind.
        fields: record field → member extension (``"txt"``, ``"jpg|png"``) or ``"json.<key>"`` inside the JSON member
            (defaults: :data:`DEFAULT_FIELDS` ``["wds"]``).
        limit: read at most this many samples.

    Image keys are digests of the image bytes (``sha:...``), so identical pictures link across datasets.
    """

    def __init__(
        self,
        *,
        urls: str | Sequence[str],
        kind: str,
        fields: Mapping[str, str] | None = None,
        limit: int | None = None,
    ) -> None:
        self.paths = _expand(urls)
        self.kind = kind
        self.fields = _field_map("wds", kind, fields, f"WebDatasetSource({urls!r})")
        self.limit = limit
        self.skip_reasons: list[str] = []
        self.skip_counts: Counter = Counter()

    @property
    def skipped(self) -> int:
        return len(self.skip_reasons)

    def _samples(self) -> Iterator[tuple[str, dict[str, tuple[bytes, _TarMember]]]]:
        for path in self.paths:
            if not path.is_file():
                raise FileNotFoundError(f"WebDatasetSource: shard {str(path)!r} does not exist")
            current, members = None, {}
            with tarfile.open(path, "r:") as tar:  # uncompressed tars only: members must be seekable by offset
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = _split_name(info.name)
                    if key != current:
                        if current is not None:
                            yield f"{path.name}/{current}", members
                        current, members = key, {}
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    members[ext] = (data, _TarMember(path, info.offset_data, info.size))
            if current is not None:
                yield f"{path.name}/{current}", members

    def _value(self, members: dict[str, tuple[bytes, _TarMember]], name: str, loc: str) -> Any:
        if loc.startswith("json."):
            raw = members.get("json")
            if raw is None:
                return None
            try:
                return _dig(json.loads(raw[0]), loc[5:])
            except json.JSONDecodeError:
                return None
        for ext in loc.split("|"):
            if ext in members:
                data, lazy = members[ext]
                if name in IMAGE_FIELDS:
                    return ImageRef.lazy("sha:" + hashlib.sha256(data).hexdigest()[:24], lazy)
                return data.decode("utf-8").strip()
        return None

    def __iter__(self) -> Iterator[Record]:
        self.skip_reasons = []
        self.skip_counts = Counter()
        cls = RECORD_KINDS[self.kind]
        n = 0
        for sid, members in self._samples():
            if self.limit is not None and n >= self.limit:
                return
            values: dict[str, Any] = {}
            for name, loc in self.fields.items():
                v = self._value(members, name, loc)
                if v is None or v == "":
                    self.skip_counts["missing_field"] += 1
                    self.skip_reasons.append(f"{sid}: field {name!r} ({loc!r}) missing; members: {sorted(members)}")
                    break
                values[name] = v if name in IMAGE_FIELDS else str(v)
            else:
                n += 1
                yield cls(id=sid, **values)


@runtime_checkable
class RecordPool(Protocol):
    """What the chaining stage draws records from. Implementations must be deterministic given ``rng``."""

    def fresh_kinds(self) -> frozenset[str]:
        """Record kinds :meth:`fresh` can return."""
        ...

    def fresh(self, kind: str, rng: random.Random) -> Record | None:
        """A record of ``kind`` unrelated to anything so far (None when there is none)."""
        ...

    def follow_up(self, kind: str, image: ImageRef, rng: random.Random) -> Record | None:
        """A record of ``kind`` whose input image is ``image`` (None when the data has none)."""
        ...

    def describe(self, image: ImageRef) -> str | None:
        """A short text description of a picture when the data knows one (a caption), else None."""
        ...


class DatasetPool:
    """A pool over records read from adapters, indexed by kind and by input image key.

    Follow-ups come from the data itself (an edit whose source is this image, a VQA over it) and, for images with a
    known caption, a caption record made from that caption. Records are sampled with replacement.

    Rows the adapters skipped are gathered in ``skip_counts`` (reason → rows) and ``skip_examples`` (the first
    messages), logged as a warning here, and listed in the synthesis report.

    Args:
        sources: adapters or plain lists of records.
    """

    def __init__(self, *, sources: Iterable[Iterable[Record]]) -> None:
        self.by_kind: dict[str, list[Record]] = defaultdict(list)
        self.by_input: dict[tuple[str, str], list[Record]] = defaultdict(list)
        self.captions: dict[str, str] = {}
        self.skip_counts: Counter = Counter()
        self.skip_examples: list[str] = []
        for src in sources:
            for rec in src:
                self.by_kind[rec.kind].append(rec)
                for img in rec.input_images:
                    self.by_input[(rec.kind, img.key)].append(rec)
                if isinstance(rec, (TextToImageRecord, CaptionRecord)):
                    self.captions.setdefault(rec.image.key, rec.caption)
            self.skip_counts.update(getattr(src, "skip_counts", None) or {})
            self.skip_examples.extend(list(getattr(src, "skip_reasons", None) or [])[: 20 - len(self.skip_examples)])
        if self.skip_counts:
            logger.warning(
                "DatasetPool: skipped %d source row(s) (%s); e.g. %s",
                sum(self.skip_counts.values()),
                ", ".join(f"{k} {v}" for k, v in sorted(self.skip_counts.items())),
                "; ".join(self.skip_examples[:3]),
            )
        if not self.by_kind:
            raise ValueError(
                "DatasetPool: the sources yielded no records"
                + (f" (skipped: {dict(sorted(self.skip_counts.items()))})" if self.skip_counts else "")
            )

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_kind.values())

    def fresh_kinds(self) -> frozenset[str]:
        return frozenset(self.by_kind)

    def fresh(self, kind: str, rng: random.Random) -> Record | None:
        recs = self.by_kind.get(kind)
        return recs[rng.randrange(len(recs))] if recs else None

    def follow_up(self, kind: str, image: ImageRef, rng: random.Random) -> Record | None:
        recs = self.by_input.get((kind, image.key))
        if recs:
            return recs[rng.randrange(len(recs))]
        if kind == "caption" and image.key in self.captions:
            return CaptionRecord(id=f"caption-of/{image.key}", image=image, caption=self.captions[image.key])
        return None

    def describe(self, image: ImageRef) -> str | None:
        return self.captions.get(image.key)
