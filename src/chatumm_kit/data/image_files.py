"""Reading an image reference (path, ``file://`` or ``data:`` URL) into ``uint8 [3, H, W]`` pixels with PIL.

Any format and mode PIL opens is accepted: EXIF orientation is applied (a phone photo comes out upright), the first
frame of an animation is taken, transparency is composited over white, 16-bit images are scaled (not clipped), and
everything ends as 8-bit RGB — all by :func:`~chatumm_kit.data.image_decode.decode_rgb`, the kit's one decoder. Images
larger than ``max_side`` on their long side are shrunk (aspect kept, Lanczos) so shards do not store pixels the
packer would throw away; smaller ones are kept as they are (the packer resizes views on the fly, SPEC §4.1).

Remote URLs are refused: the importer reads local files only (download your images first).

Example:
    >>> import base64, io
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (6, 4), (255, 0, 0)).save(buf, format="PNG")
    >>> img = read_image("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), images_dir=".")
    >>> tuple(img.shape), img[:, 0, 0].tolist()
    ((3, 4, 6), [255, 0, 0])
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from PIL import Image

from chatumm_kit.data.image_decode import ImageDecodeError, decode_rgb

__all__ = ["ImageReadError", "read_image", "describe_ref"]


class ImageReadError(ValueError):
    """An image reference that cannot be read; the message says what was tried."""


def describe_ref(ref: str) -> str:
    """A short description of a reference for reports (a data URL is not repeated in full)."""
    if ref.startswith("data:"):
        return f"{ref[: ref.find(',') + 1 or 30]}… ({len(ref)} chars)"
    return ref


def _source(ref: str, images_dir: Path) -> io.BytesIO | Path:
    if ref.startswith("data:"):
        head, sep, payload = ref.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ImageReadError(f"{describe_ref(ref)}: only base64 data URLs are supported")
        try:
            return io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError) as e:
            raise ImageReadError(f"{describe_ref(ref)}: bad base64 ({e})") from None
    scheme = urlparse(ref).scheme.lower()
    if scheme == "file":
        path = Path(unquote(urlparse(ref).path))
    elif scheme in ("http", "https", "ftp", "s3", "gs"):
        raise ImageReadError(f"{ref}: remote URLs are not fetched; download the images and give their paths")
    else:
        path = Path(ref)
        if not path.is_absolute():
            path = images_dir / path
    if not path.is_file():
        raise ImageReadError(f"no such image file: {path}")
    return path


def read_image(ref: str, *, images_dir: str | Path, max_side: int | None = None) -> torch.Tensor:
    """The pixels of ``ref`` as ``uint8 [3, H, W]``.

    Args:
        ref: a path (relative ones resolve against ``images_dir``), a ``file://`` URL or a base64 ``data:`` URL.
        images_dir: the folder relative paths are read from.
        max_side: shrink so the long side is at most this many pixels (``None`` or ``0``: keep the size).

    Raises:
        ImageReadError: missing file, remote URL, or bytes PIL cannot decode (the message names the reference).
    """
    src = _source(ref, Path(images_dir))
    data = src.getvalue() if isinstance(src, io.BytesIO) else src.read_bytes()
    try:  # the kit's one decoder: pixel cap from the header, EXIF orientation, alpha on white, 16-bit scaled
        pixels = decode_rgb(data, min_side=max_side or None, where=describe_ref(ref))
    except ImageDecodeError as e:
        raise ImageReadError(f"cannot decode: {e}") from None
    if max_side and max(pixels.shape[1:]) > max_side:
        scale = max_side / max(pixels.shape[1:])
        size = (max(1, round(pixels.shape[2] * scale)), max(1, round(pixels.shape[1] * scale)))
        im = Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize(size, Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    return pixels
