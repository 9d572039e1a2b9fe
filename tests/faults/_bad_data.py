"""Writers of damaged data for the fault tests: a shard mixing every bad-sample kind, a shard with a damaged header."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from chatumm_kit.data.shards import iter_shard, resolve_shards
from chatumm_kit.data.skips import DataHealth


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def good_samples(shards: str | Path, n: int) -> list[dict[str, bytes]]:
    """The raw members of the first ``n`` samples of a shard directory (copied as they are)."""
    out = []
    for ref in resolve_shards(str(shards)):
        for raw in iter_shard(ref, health=DataHealth()):
            out.append(dict(raw.members))
            if len(out) == n:
                return out
    return out


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """Members ``{key}.{ext}`` for each sample, keys ``000000``, ``000001``, … in order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _with_dialogue(members: dict[str, bytes], edit) -> dict[str, bytes]:
    d = json.loads(members["json"])
    edit(d)
    return {**members, "json": json.dumps(d).encode()}


def _image_ext(members: dict[str, bytes]) -> str:
    return next(k for k in members if k.startswith("img."))


def bad_mix(good: list[dict[str, bytes]]) -> tuple[list[dict[str, bytes]], dict[str, int], int]:
    """A list of samples mixing every bad kind with good ones; returns ``(samples, expected skip counts, good)``.

    ``good`` must hold at least 3 samples with an image (they are the base of the damaged ones).
    """
    with_image = [m for m in good if any(k.startswith("img.") for k in m)]
    a, b, c = with_image[:3]
    grey16 = png(Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)))  # a 16-bit greyscale PNG: trains
    huge = png(Image.new("L", (20000, 20000)))  # 400 MP in ~400 KB: refused from its header
    bad = {
        "malformed_json": [
            _with_dialogue(a, lambda d: d["turns"][0].__setitem__("meta", ["a", "list"])),  # turn meta a list
            _with_dialogue(a, lambda d: d.__setitem__("meta", "a string")),  # dialogue meta a string
            _with_dialogue(a, lambda d: d["turns"][1].__setitem__("trainable", "no")),  # a string, not a boolean
            _with_dialogue(a, lambda d: d["turns"][0]["segments"][0].__setitem__("droppable", "false")),
            _with_dialogue(a, lambda d: d.__setitem__("turns", [])),  # an empty dialogue
            {**a, "json": b"\xff\xfe not utf-8"},
            {**a, "json": b'{"id": "x", "turns": ' + b"[" * 5000 + b"]" * 5000 + b"}"},  # absurd nesting
        ],
        "corrupt_image": [{**b, _image_ext(b): b"\x89PNG\r\n\x1a\n garbage"}],
        "image_too_large": [{**b, _image_ext(b): huge}],
        "missing_json": [{k: v for k, v in c.items() if k != "json"}],
        "unresolved_image": [{k: v for k, v in c.items() if not k.startswith("img.")}],
        "bad_member": [{**c, "img.Bad-Key!.png": grey16}],
        "over_length": [_with_dialogue(a, lambda d: d.__setitem__("turns", d["turns"] * 250))],  # 500+ turns
    }
    sixteen_bit = {**c, _image_ext(c): grey16}
    samples = [*good, sixteen_bit]
    for kinds in bad.values():
        samples.extend(kinds)
    return samples, {k: len(v) for k, v in bad.items()}, len(good) + 1


def flip_header_byte(path: Path, member_index: int) -> None:
    """Flip a byte in the name field of the ``member_index``-th member's header (its checksum no longer matches)."""
    data = bytearray(path.read_bytes())
    offset = 0
    for _ in range(member_index):
        size = int(data[offset + 124 : offset + 136].rstrip(b"\0 ") or b"0", 8)
        offset += 512 + (size + 511) // 512 * 512
    data[offset + 3] ^= 0x55
    path.write_bytes(bytes(data))
