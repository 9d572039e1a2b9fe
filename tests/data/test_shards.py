"""Shard format: round trips, the index, atomic writes and resume, and bad input counted by reason."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from hypothesis import given
from hypothesis import strategies as st
from torchvision.io import encode_png

from chatumm_kit.data.dialogue import Dialogue, DialogueError, DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.shards import (
    DialogueShardWriter,
    ShardFormatError,
    ShardIndex,
    decode_image_key,
    encode_image_key,
    image_member_name,
    read_samples,
    resolve_shards,
)
from chatumm_kit.data.skips import DataHealth, SkipReason


def make_sample(i: int, *, keys: tuple[str, ...] = ("img0",), side: int = 8, seed: int = 0) -> DialogueSample:
    """A small dialogue: user text + image(s), assistant text, assistant image; random uint8 pixels."""
    g = torch.Generator().manual_seed(seed * 1000 + i)
    turns = [
        Turn(role=Role.USER, segments=[TextSegment(text=f"look at this {i}")] + [ImageSegment(image=k) for k in keys]),
        Turn(role=Role.ASSISTANT, segments=[TextSegment(text=f"answer {i}")], meta={"task": "vqa"}),
        Turn(role=Role.USER, segments=[TextSegment(text="now draw it", droppable=True)]),
        Turn(role=Role.ASSISTANT, segments=[ImageSegment(image="out")], trainable=i % 2 == 0),
    ]
    images = {k: torch.randint(0, 256, (3, side, side + 2), dtype=torch.uint8, generator=g) for k in (*keys, "out")}
    return DialogueSample(dialogue=Dialogue(id=f"d{i}", turns=turns, meta={"n": i}), images=images)


def assert_same(a: DialogueSample, b: DialogueSample) -> None:
    assert a.dialogue == b.dialogue
    assert sorted(a.images) == sorted(b.images)
    for k in a.images:
        assert b.images[k].dtype == torch.uint8
        assert torch.equal(a.images[k], b.images[k]), k


def test_round_trip_png_is_exact_and_index_counts(tmp_path: Path) -> None:
    samples = [make_sample(i, keys=("img0", "Cat.v2", "é/x")) for i in range(5)]
    with DialogueShardWriter(directory=tmp_path, max_samples_per_shard=2) as w:
        where = [w.write(s) for s in samples]
    assert where[:3] == ["shard-000000.tar/000000", "shard-000000.tar/000001", "shard-000001.tar/000000"]
    index = ShardIndex.load(tmp_path / "index.json")
    assert [(e.name, e.num_samples) for e in index.shards] == [
        ("shard-000000.tar", 2),
        ("shard-000001.tar", 2),
        ("shard-000002.tar", 1),
    ]
    assert index.total_samples == 5
    assert json.loads((tmp_path / "index.json").read_text())["total_samples"] == 5
    health = DataHealth()
    back = list(read_samples(tmp_path, health=health))
    assert len(back) == 5 and health.samples_ok == 5 and health.total_skipped == 0
    for a, b in zip(samples, back):
        assert_same(a, b)
    assert back[3].key == "shard-000001.tar/000001"
    # Every member name is what the docstring promises: lower-case, one dot-free key per image.
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        names = tf.getnames()
    assert "000000.json" in names and "000000.img.img0.png" in names
    assert f"000000.{image_member_name('Cat.v2')}" == "000000.img.x-4361742e7632.png"
    assert "000000.img.x-4361742e7632.png" in names


def test_jpeg_option_is_close_not_exact(tmp_path: Path) -> None:
    s = make_sample(0, side=16)
    s.images = {k: torch.full_like(v, 120) for k, v in s.images.items()}  # flat images survive JPEG well
    with DialogueShardWriter(directory=tmp_path, image_format="jpg") as w:
        w.write(s)
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        assert "000000.img.img0.jpg" in tf.getnames()
    (b,) = read_samples(tmp_path)
    for k in s.images:
        assert b.images[k].shape == s.images[k].shape
        assert (b.images[k].int() - s.images[k].int()).abs().max() <= 3


@given(st.text(max_size=30))
def test_image_key_encoding_round_trips_to_safe_extensions(key: str) -> None:
    enc = encode_image_key(key)
    assert decode_image_key(enc) == key
    assert "." not in enc and "/" not in enc and enc == enc.lower()


def test_image_key_encoding_keeps_safe_keys_and_rejects_garbage() -> None:
    assert encode_image_key("img_0") == "img_0"
    assert encode_image_key("Img") == "x-496d67"
    with pytest.raises(ShardFormatError, match="not an encoded image key"):
        decode_image_key("Bad-Key")


def test_writer_that_raises_leaves_no_complete_looking_shard(tmp_path: Path) -> None:
    samples = [make_sample(i) for i in range(5)]
    with pytest.raises(RuntimeError, match="boom"):
        with DialogueShardWriter(directory=tmp_path, max_samples_per_shard=2) as w:
            for s in samples[:3]:
                w.write(s)
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "shard-000000.tar"]
    assert [e.name for e in ShardIndex.load(tmp_path / "index.json").shards] == ["shard-000000.tar"]
    assert [s.dialogue.id for s in read_samples(tmp_path)] == ["d0", "d1"]


def test_killed_writer_leaves_only_tmp_and_resume_continues(tmp_path: Path) -> None:
    samples = [make_sample(i) for i in range(9)]
    with DialogueShardWriter(directory=tmp_path, max_samples_per_shard=2) as w:
        for s in samples[:3]:
            w.write(s)
    first = (tmp_path / "shard-000000.tar").read_bytes()
    # A killed writer: a child process writes three samples and dies without any cleanup (os._exit).
    child = multiprocessing.get_context("fork").Process(target=_write_then_die, args=(tmp_path, samples[3:6]))
    child.start()
    child.join()
    assert child.exitcode == 17
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar.tmp"]
    assert ShardIndex.load(tmp_path / "index.json").total_samples == 3
    assert glob_tars(tmp_path) == ["shard-000000.tar", "shard-000001.tar"]  # readers never see the .tmp
    # Resume: the stale temporary goes, numbering continues, earlier shards are untouched.
    with DialogueShardWriter(directory=tmp_path, max_samples_per_shard=2) as w:
        for s in samples[6:]:
            w.write(s)
    assert not list(tmp_path.glob("*.tmp"))
    index = ShardIndex.load(tmp_path / "index.json")
    assert [e.name for e in index.shards] == [f"shard-00000{i}.tar" for i in range(4)]
    assert [e.num_samples for e in index.shards] == [2, 1, 2, 1]
    assert (tmp_path / "shard-000000.tar").read_bytes() == first
    assert [s.dialogue.id for s in read_samples(tmp_path / "index.json")] == ["d0", "d1", "d2", "d6", "d7", "d8"]


def _write_then_die(directory: Path, samples: list[DialogueSample]) -> None:
    w = DialogueShardWriter(directory=directory, max_samples_per_shard=4).open()
    for s in samples:
        w.write(s)
    w._file.flush()  # the bytes reach the file, as they would before a kill
    os._exit(17)


def glob_tars(d: Path) -> list[str]:
    return sorted(Path(r.path).name for r in resolve_shards(str(d / "*.tar")))


def test_writer_rejects_bad_samples_without_corrupting_the_shard(tmp_path: Path) -> None:
    good = make_sample(0)
    with DialogueShardWriter(directory=tmp_path) as w:
        bad = make_sample(1)
        bad.images["img0"] = bad.images["img0"].float()
        with pytest.raises(ShardFormatError, match=r"image 'img0': expected uint8 \[3, H, W\]"):
            w.write(bad)
        missing = make_sample(2)
        del missing.images["out"]
        with pytest.raises(DialogueError, match="'out' does not resolve"):
            w.write(missing)
        w.write(good)
    (back,) = read_samples(tmp_path)
    assert_same(good, back)
    with pytest.raises(ShardFormatError, match="prefix"):
        DialogueShardWriter(directory=tmp_path, prefix="a/b")


def _member_bytes(sample: DialogueSample) -> dict[str, bytes]:
    out = {"json": sample.dialogue.to_json().encode()}
    for k, v in sample.images.items():
        out[image_member_name(k)] = encode_png(v).numpy().tobytes()
    return out


def write_bad_shards(d: Path) -> dict[str, int]:
    """One shard holding every kind of bad sample, plus an empty, a zero-byte and a truncated shard.

    Returns the expected counts per reason.
    """
    d.mkdir(parents=True, exist_ok=True)
    good = [_member_bytes(make_sample(i)) for i in range(3)]
    corrupt = dict(good[0], **{image_member_name("img0"): b"\x89PNG not really"})
    no_json = {k: v for k, v in good[0].items() if k != "json"}
    malformed = dict(good[0], json=b'{"id": "x", "turns": [')
    schema = dict(good[0], json=json.dumps({"id": "y", "turns": [{"role": "bot", "segments": []}]}).encode())
    unresolved = {k: v for k, v in good[0].items() if k != image_member_name("out")}
    bad_name = dict(good[0], **{"img.Not.Valid.png": b"x"})
    twice = dict(good[0], **{"img.img0.jpg": good[0][image_member_name("img0")]})
    rows = [good[0], corrupt, no_json, malformed, good[1], schema, unresolved, bad_name, twice, good[2]]
    with wds.TarWriter(str(d / "bad-000000.tar"), encoder=False) as tw:
        for i, members in enumerate(rows):
            tw.write({"__key__": f"{i:06d}", **members})
    with wds.TarWriter(str(d / "bad-000001.tar"), encoder=False):
        pass  # an archive with no member
    (d / "bad-000002.tar").write_bytes(b"")
    for name in ("bad-000003.tar", "bad-000004.tar"):
        with wds.TarWriter(str(d / name), encoder=False) as tw:
            for i in range(3):
                tw.write({"__key__": f"{i:06d}", **good[i]})
    # Members per sample: img.img0.png, img.out.png, json. Cut shard 3 inside sample 1's second image (tarfile
    # raises) and shard 4 exactly before sample 1's json header (tarfile ends quietly; the end marker is missing).
    # Either way sample 0 survives and sample 1 is lost with the shard's record.
    with tarfile.open(d / "bad-000003.tar") as tf:
        members = tf.getmembers()
    data = (d / "bad-000003.tar").read_bytes()
    (d / "bad-000003.tar").write_bytes(data[: members[4].offset_data + 10])
    (d / "bad-000004.tar").write_bytes(data[: members[5].offset])
    return {
        "corrupt_image": 1,
        "missing_json": 1,
        "malformed_json": 2,
        "unresolved_image": 1,
        "bad_member": 2,
        "empty_shard": 2,
        "truncated_shard": 2,
    }


def test_bad_input_is_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    expected = write_bad_shards(tmp_path)
    health = DataHealth(max_examples=50)
    got = list(read_samples(str(tmp_path / "bad-*.tar"), health=health))
    # Shard 0 keeps its three good samples; a truncated shard keeps those that were complete before the cut.
    assert [s.key for s in got] == [
        "bad-000000.tar/000000",
        "bad-000000.tar/000004",
        "bad-000000.tar/000009",
        "bad-000003.tar/000000",
        "bad-000004.tar/000000",
    ]
    assert health.counts == expected
    assert health.samples_ok == 5
    by_reason = {e.reason: e for e in health.examples}
    assert by_reason["corrupt_image"].key == "000001" and "img0" in by_reason["corrupt_image"].message
    assert by_reason["unresolved_image"].key == "000006" and "'out'" in by_reason["unresolved_image"].message
    truncated = [e for e in health.examples if e.reason == "truncated_shard"]
    assert [Path(e.shard).name for e in truncated] == ["bad-000003.tar", "bad-000004.tar"]
    assert all("sample '000001' lost" in e.message for e in truncated)
    assert "bad-000000.tar/000001" in health.summary()
    assert health.metrics()["data/skip/malformed_json"] == 2.0


def test_index_detects_a_shard_shorter_than_listed(tmp_path: Path) -> None:
    with DialogueShardWriter(directory=tmp_path, max_samples_per_shard=10) as w:
        for i in range(4):
            w.write(make_sample(i))
    # Rewrite the shard with only its first two samples: a well-formed tar that is still "truncated".
    src = tmp_path / "shard-000000.tar"
    with tarfile.open(src) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for m, data in members:
            if m.name.startswith(("000000.", "000001.")):
                out.addfile(m, io.BytesIO(data))
    src.write_bytes(buf.getvalue())
    health = DataHealth()
    assert len(list(read_samples(tmp_path / "index.json", health=health))) == 2
    assert health.counts == {"truncated_shard": 1}
    assert "holds 2 samples, index lists 4" in health.examples[0].message


def test_resolve_shards_specs_and_errors(tmp_path: Path) -> None:
    with DialogueShardWriter(directory=tmp_path, max_samples_per_shard=1) as w:
        for i in range(3):
            w.write(make_sample(i))
    by_index = resolve_shards(tmp_path / "index.json")
    assert [(r.name, r.num_samples) for r in by_index] == [(f"shard-00000{i}.tar", 1) for i in range(3)]
    assert resolve_shards(tmp_path) == by_index
    braces = resolve_shards(str(tmp_path / "shard-{000000..000001}.tar"))
    assert [(r.name, r.num_samples) for r in braces] == [("shard-000000.tar", 1), ("shard-000001.tar", 1)]
    assert len(resolve_shards([str(tmp_path / "*.tar"), str(tmp_path / "shard-000000.tar")])) == 4
    with pytest.raises(ShardFormatError, match=r"src\[1\]: pattern .* matches no shard"):
        resolve_shards([str(tmp_path / "*.tar"), str(tmp_path / "nope-*.tar")], where="src")
    with pytest.raises(ShardFormatError, match="does not exist"):
        resolve_shards(tmp_path / "missing.tar")


def test_missing_shard_file_is_counted_not_raised(tmp_path: Path) -> None:
    with DialogueShardWriter(directory=tmp_path, max_samples_per_shard=1) as w:
        for i in range(2):
            w.write(make_sample(i))
    (tmp_path / "shard-000000.tar").unlink()
    health = DataHealth()
    assert [s.dialogue.id for s in read_samples(tmp_path / "index.json", health=health)] == ["d1"]
    assert health.counts == {"unreadable_shard": 1}


def test_health_counts_shards_once_and_survives_serialisation() -> None:
    h = DataHealth(max_examples=2)
    for _ in range(2):
        h.record(SkipReason.TRUNCATED_SHARD, shard="a.tar", message="cut")
    for i in range(3):
        h.record(SkipReason.CORRUPT_IMAGE, shard="b.tar", key=str(i), message="bad")
    h.samples_ok = 7
    assert h.counts == {"corrupt_image": 3, "truncated_shard": 1}
    assert len(h.examples) == 2 and h.total_skipped == 4
    back = DataHealth.from_dict(json.loads(json.dumps(h.to_dict())))
    assert back == h
    other = DataHealth(samples_ok=1, bad_shards={"a.tar": "truncated_shard", "c.tar": "empty_shard"})
    m = h.merge(other)
    assert m.counts == {"corrupt_image": 3, "empty_shard": 1, "truncated_shard": 1} and m.samples_ok == 8
