"""Encoded image bytes → ``uint8 [3, H, W]`` RGB, safely: one rule for shards, synthesis sources and the chat CLI.

* **Pixel cap before decoding.** PIL reads the size from the header without decoding (``Image.open`` is lazy), so
  an image of more than ``max_pixels`` pixels is refused (:class:`ImageTooLargeError`) before any memory is spent —
  a 400 KB PNG of 20000×20000 pixels costs nothing.
* **Reduced while decoding.** Given ``min_side`` (the longest side the consumer needs, e.g. the packer's
  ``max_image_side``), a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps its longer side at
  least ``min_side`` (``Image.draft``), so a 24 MP photo for a 980-pixel view decodes at 1/2 or 1/4 of the work.
  Other formats decode in full and are then reduced by an integer box factor (``Image.reduce``) with the same bound.
* **Modes converted correctly.** 16-bit greyscale (``I;16``, ``I;16B``, ``I`` with values above 255) is scaled
  ``>> 8`` instead of clipped (PIL's ``convert("RGB")`` turns it all white); float images (``F``) in ``[0, 1]`` are
  scaled by 255; transparent images are composited on white; palette, greyscale, CMYK and other modes go through
  PIL's conversion. The EXIF orientation of a photo is applied (a phone picture stands the right way up).

Anything that does not decode raises :class:`ImageDecodeError` (its ``reason`` is a
:class:`~chatumm_kit.data.skips.SkipReason` value), never a library-specific exception.

Example:
    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("I;16", (4, 2), 40000).save(buf, format="PNG")
    >>> img = decode_rgb(buf.getvalue())
    >>> img.shape, int(img[0, 0, 0])
    (torch.Size([3, 2, 4]), 156)
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["DEFAULT_MAX_PIXELS", "ImageDecodeError", "ImageTooLargeError", "decode_rgb", "image_size", "load_rgb"]

DEFAULT_MAX_PIXELS = 1 << 26  # 67 MP: above any camera photo; 200 MB as RGB


class ImageDecodeError(ValueError):
    """Bytes that do not decode to an RGB image; ``reason`` is the skip reason (``corrupt_image``)."""

    reason = "corrupt_image"


class ImageTooLargeError(ImageDecodeError):
    """An image whose header declares more pixels than the cap; nothing was decoded."""

    reason = "image_too_large"


def _open(data: bytes | Path, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our cap is the check that counts
            return Image.open(data if isinstance(data, Path) else io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"{where}: its header declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels (nothing decoded)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        size = f"{len(data)} bytes" if isinstance(data, bytes) else str(data)
        raise ImageDecodeError(f"{where}: not a readable image ({size}): {e}") from None


def image_size(data: bytes | Path, *, where: str = "image") -> tuple[int, int]:
    """``(width, height)`` from the header alone (nothing decoded; a file is read only as far as its header)."""
    with _open(data, where) as im:
        return im.size


def _to_rgb_array(im) -> np.ndarray:
    """A loaded PIL image → ``uint8 [H, W, 3]``, scaling high-bit-depth modes instead of clipping them."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.int64)
        top = int(arr.max()) if arr.size else 0
        if mode.startswith("I;16") or top > 255:  # 16-bit data (I from a 16-bit PNG/PGM/TIFF)
            arr = np.clip(arr, 0, 65535) >> 8
        grey = np.clip(arr, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        from PIL import Image

        rgba = im.convert("RGBA")  # transparent pixels show the white they would be shown on, not their hidden colour
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        im = white
    return np.asarray(im.convert("RGB"))


def decode_rgb(
    data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int | None = None, where: str = "image"
) -> torch.Tensor:
    """Decode ``data`` to ``uint8 [3, H, W]`` RGB (see the module docstring).

    Args:
        data: the encoded bytes (PNG, JPEG, WebP, GIF, BMP, TIFF, ... whatever PIL reads; the first frame).
        max_pixels: refuse images whose header declares more pixels (``None``: no cap).
        min_side: reduce while decoding, keeping the longer side ``>= min_side`` (``None``: full size).
        where: names the image in error messages.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels.
        ImageDecodeError: anything else that keeps the bytes from decoding.
    """
    im = _open(data, where)
    try:
        width, height = im.size
        if width < 1 or height < 1:
            raise ImageDecodeError(f"{where}: empty image {width}x{height}")
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(
                f"{where}: {width}x{height} = {width * height} pixels > cap {max_pixels} (max_image_pixels)"
            )
        long = max(width, height)
        if min_side is not None and long > min_side and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
            scale = min_side / long
            im.draft("RGB" if im.mode != "L" else "L", (max(1, int(width * scale)), max(1, int(height * scale))))
        try:
            from PIL import ImageOps

            im.load()
            arr = _to_rgb_array(ImageOps.exif_transpose(im))
        except ImageDecodeError:
            raise
        except Exception as e:  # truncated files, bad CRCs, codec errors: bad data is data
            raise ImageDecodeError(f"{where}: {type(e).__name__}: {e}") from None
    finally:
        im.close()
    if min_side is not None:
        arr = _reduce(arr, min_side)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageDecodeError(f"{where}: decoded to shape {arr.shape}, expected [H, W, 3]")
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def _reduce(arr: np.ndarray, min_side: int) -> np.ndarray:
    """Box-reduce ``[H, W, 3]`` by the largest integer factor keeping the longer side ``>= min_side`` (or as is)."""
    from PIL import Image

    factor = max(arr.shape[:2]) // max(1, min_side)
    if factor < 2:
        return arr
    return np.asarray(Image.fromarray(arr).reduce(factor))


def load_rgb(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An image file → ``uint8 [3, H, W]`` RGB; a missing, unreadable or non-image file raises
    :class:`ImageDecodeError` naming it (one line, for a user who typed a path)."""
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"no such image file: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"cannot read {path}: {e.strerror or e}") from None
    return decode_rgb(data, max_pixels=max_pixels, where=str(path))
