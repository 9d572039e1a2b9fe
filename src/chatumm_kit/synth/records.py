"""Typed single-turn records: what the synthesis pipeline reads from datasets (SPEC §6, input side).

Five kinds, one dataclass each: :class:`TextToImageRecord` (caption, image), :class:`EditRecord` (source,
instruction, target), :class:`VQARecord` (image, question, answer), :class:`CaptionRecord` (image, caption) and
:class:`ChatRecord` (prompt, response). Images are :class:`ImageRef` s: a stable ``key`` that links records sharing
an image (a caption record and a VQA record over the same COCO picture, or an edit whose source is another edit's
target) plus a lazy way to get the pixels, so a pool of a million records holds keys, not pictures.

``meta`` carries JSON-able extras; the ShapesChat source stores each image's ground-truth scene there
(``ImageRef.truth``), which the rule-based backend and the verification tests read.

Example:
    >>> img = ImageRef.from_tensor(torch.zeros(3, 4, 4, dtype=torch.uint8))
    >>> rec = TextToImageRecord(id="t2i/0", caption="a black square", image=img)
    >>> rec.kind, rec.input_images, rec.output_images == (img,)
    ('t2i', (), True)
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

__all__ = [
    "ImageRef",
    "Record",
    "TextToImageRecord",
    "EditRecord",
    "VQARecord",
    "CaptionRecord",
    "ChatRecord",
    "RECORD_KINDS",
    "decode_image",
    "encode_png",
]


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 ``[3, H, W]`` → PNG bytes."""
    from PIL import Image

    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"encode_png: expected uint8 [3, H, W], got {image.dtype} {tuple(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, *, where: str = "image") -> torch.Tensor:
    """Encoded image bytes (PNG, JPEG, ...) → uint8 ``[3, H, W]`` (RGB), through the kit's one image decoder
    (:func:`chatumm_kit.data.image_decode.decode_rgb`: pixel cap, 16-bit and other modes scaled, not clipped)."""
    from chatumm_kit.data.image_decode import decode_rgb

    return decode_rgb(data, where=where)


def _sniff_mime(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "application/octet-stream"


@dataclass(frozen=True, eq=False)
class ImageRef:
    """A lazily loaded image with a stable identity.

    Attributes:
        key: identity used to link records (equal keys = the same picture) and to key the answer cache. Adapters
            use a content digest or a dataset id.
        load: returns the raw encoded bytes (``encoded``) or the pixels; see the constructors.
        truth: optional JSON-able ground truth of the picture (a ShapesChat scene); ``None`` for real datasets.

    Compare refs by ``key``; the loader is not part of equality.
    """

    key: str
    loader: Callable[[], bytes | torch.Tensor] = field(repr=False)
    truth: dict[str, Any] | None = field(default=None, repr=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageRef) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_tensor(cls, image: torch.Tensor, *, key: str | None = None, truth: dict | None = None) -> ImageRef:
        """Wrap pixels (uint8 ``[3, H, W]``); the key defaults to a digest of the pixels."""
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"ImageRef.from_tensor: expected uint8 [3, H, W], got {image.dtype} {tuple(image.shape)}")
        if key is None:
            h = hashlib.sha256(str(tuple(image.shape)).encode())
            h.update(image.contiguous().numpy().tobytes())
            key = "px:" + h.hexdigest()[:24]
        return cls(key=key, loader=lambda: image, truth=truth)

    @classmethod
    def from_bytes(cls, data: bytes, *, key: str | None = None) -> ImageRef:
        """Wrap encoded bytes held in memory; the key defaults to a digest of the bytes."""
        return cls(key=key or "sha:" + hashlib.sha256(data).hexdigest()[:24], loader=lambda: data)

    @classmethod
    def lazy(cls, key: str, loader: Callable[[], bytes | torch.Tensor], *, truth: dict | None = None) -> ImageRef:
        """An image whose pixels or bytes are fetched only when needed (a file, a tar member, a renderer)."""
        return cls(key=key, loader=loader, truth=truth)

    # ------------------------------------------------------------------ access
    def tensor(self) -> torch.Tensor:
        """The pixels, uint8 ``[3, H, W]``."""
        raw = self.loader()
        return raw if isinstance(raw, torch.Tensor) else decode_image(raw, where=f"image {self.key!r}")

    def encoded(self) -> tuple[str, bytes]:
        """``(mime type, bytes)`` to send to a vision LLM: original bytes when we have them, else a PNG."""
        raw = self.loader()
        if isinstance(raw, torch.Tensor):
            return "image/png", encode_png(raw)
        mime = _sniff_mime(raw)
        if mime == "application/octet-stream":  # unknown container: normalise through PIL
            return "image/png", encode_png(decode_image(raw, where=f"image {self.key!r}"))
        return mime, raw


@dataclass(frozen=True, kw_only=True, eq=False)
class Record:
    """Base of every record: an ``id`` unique within its source, and JSON-able ``meta``."""

    kind: ClassVar[str] = "record"
    id: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_images(self) -> tuple[ImageRef, ...]:
        """Images the user provides (or refers to) for this task."""
        return ()

    @property
    def output_images(self) -> tuple[ImageRef, ...]:
        """Images the assistant produces for this task."""
        return ()


@dataclass(frozen=True, kw_only=True, eq=False)
class TextToImageRecord(Record):
    kind: ClassVar[str] = "t2i"
    caption: str
    image: ImageRef

    @property
    def output_images(self) -> tuple[ImageRef, ...]:
        return (self.image,)


@dataclass(frozen=True, kw_only=True, eq=False)
class EditRecord(Record):
    kind: ClassVar[str] = "edit"
    source: ImageRef
    instruction: str
    target: ImageRef

    @property
    def input_images(self) -> tuple[ImageRef, ...]:
        return (self.source,)

    @property
    def output_images(self) -> tuple[ImageRef, ...]:
        return (self.target,)


@dataclass(frozen=True, kw_only=True, eq=False)
class VQARecord(Record):
    kind: ClassVar[str] = "vqa"
    image: ImageRef
    question: str
    answer: str

    @property
    def input_images(self) -> tuple[ImageRef, ...]:
        return (self.image,)


@dataclass(frozen=True, kw_only=True, eq=False)
class CaptionRecord(Record):
    kind: ClassVar[str] = "caption"
    image: ImageRef
    caption: str

    @property
    def input_images(self) -> tuple[ImageRef, ...]:
        return (self.image,)


@dataclass(frozen=True, kw_only=True, eq=False)
class ChatRecord(Record):
    kind: ClassVar[str] = "chat"
    prompt: str
    response: str


RECORD_KINDS: dict[str, type[Record]] = {
    c.kind: c for c in (TextToImageRecord, EditRecord, VQARecord, CaptionRecord, ChatRecord)
}
