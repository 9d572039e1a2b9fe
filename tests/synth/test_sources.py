"""Dataset adapters (JSONL + images, webdataset shards), the record pool, and a real-data run with an LLM stand-in."""

from __future__ import annotations

import random

import pytest
import torch
import webdataset as wds

from chatumm_kit.data.shards import read_samples
from chatumm_kit.synth import (
    ChainStage,
    DatasetPool,
    DistractorStage,
    EditRecord,
    InterleaveStage,
    JsonlSource,
    SynthPipeline,
    TextToImageRecord,
    VQARecord,
    WebDatasetSource,
)
from conftest import EchoBackend, jpeg_bytes, png_bytes, write_jsonl

RED, BLUE, GREEN = (220, 20, 40), (30, 70, 220), (30, 160, 50)


@pytest.fixture
def jsonl_data(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    for name, colour in (("red", RED), ("blue", BLUE), ("green", GREEN)):
        (img / f"{name}.png").write_bytes(png_bytes(colour))
    t2i = write_jsonl(
        tmp_path / "t2i.jsonl",
        [
            {"meta": {"text": "a plain red square"}, "file": "red.png", "uid": "r"},
            {"meta": {"text": "a plain blue square"}, "file": "blue.png", "uid": "b"},
            {"meta": {"text": "no image here"}, "uid": "x"},  # skipped: missing image field
        ],
    )
    (tmp_path / "t2i.jsonl").write_text(t2i.read_text() + "{not json\n")
    edit = write_jsonl(
        tmp_path / "edit.jsonl", [{"source": "red.png", "instruction": "turn it green", "target": "green.png"}]
    )
    vqa = write_jsonl(
        tmp_path / "vqa.jsonl", [{"image": "green.png", "question": "What colour is it?", "answer": "green"}]
    )
    return tmp_path, t2i, edit, vqa


def test_jsonl_source_maps_fields_and_skips_bad_rows(jsonl_data):
    root, t2i, _, _ = jsonl_data
    src = JsonlSource(path=t2i, kind="t2i", fields={"caption": "meta.text", "image": "file"},
                      image_root=root / "imgs", id_field="uid")  # fmt: skip
    recs = list(src)
    assert [type(r) for r in recs] == [TextToImageRecord, TextToImageRecord]
    assert [r.id for r in recs] == ["r", "b"] and recs[0].caption == "a plain red square"
    assert recs[0].image.tensor()[:, 0, 0].tolist() == list(RED)  # lazy: read from the file on demand
    assert src.skipped == 2 and "missing" in src.skip_reasons[0] and "malformed JSON" in src.skip_reasons[1]
    with pytest.raises(ValueError, match="no field 'text'"):
        JsonlSource(path=t2i, kind="t2i", fields={"text": "x"})


def test_webdataset_source_reads_members_lazily_and_links_by_content(tmp_path):
    shard = tmp_path / "vqa-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        w.write({"__key__": "s0", "jpg": jpeg_bytes(RED), "json": {"question": "What colour?", "answer": "red"}})
        w.write({"__key__": "s1", "png": png_bytes(BLUE), "json": {"question": "What colour?", "answer": "blue"}})
        w.write({"__key__": "s2", "json": {"question": "no image", "answer": "x"}})
    cap = tmp_path / "cap-000000.tar"
    with wds.TarWriter(str(cap)) as w:
        w.write({"__key__": "c0", "png": png_bytes(BLUE), "txt": "a blue square"})
    vqa = WebDatasetSource(urls=str(tmp_path / "vqa-{000000..000000}.tar"), kind="vqa")
    recs = list(vqa)
    assert [r.answer for r in recs] == ["red", "blue"] and vqa.skipped == 1 and "missing" in vqa.skip_reasons[0]
    assert isinstance(recs[0], VQARecord) and recs[0].id == "vqa-000000.tar/s0"
    mime, data = recs[0].image.encoded()
    assert mime == "image/jpeg" and data == jpeg_bytes(RED)  # original bytes, read back by offset
    assert recs[1].image.tensor()[:, 3, 3].tolist() == list(BLUE)
    # the same picture in two datasets has one key: the pool links the caption to the VQA record
    pool = DatasetPool(sources=[vqa, WebDatasetSource(urls=str(cap), kind="caption")])
    caption_rec = pool.fresh("caption", random.Random(0))
    assert caption_rec.image.key == recs[1].image.key
    assert pool.follow_up("vqa", caption_rec.image, random.Random(0)).answer == "blue"
    assert pool.describe(recs[1].image) == "a blue square" and pool.describe(recs[0].image) is None


def test_pool_follow_ups_chain_generate_edit_ask(jsonl_data):
    root, t2i, edit, vqa = jsonl_data
    pool = DatasetPool(
        sources=[
            JsonlSource(
                path=t2i, kind="t2i", fields={"caption": "meta.text", "image": "file"}, image_root=root / "imgs"
            ),
            JsonlSource(path=edit, kind="edit", image_root=root / "imgs"),
            JsonlSource(path=vqa, kind="vqa", image_root=root / "imgs"),
        ]
    )
    red = next(r for r in pool.by_kind["t2i"] if "red" in r.caption)
    ed = pool.follow_up("edit", red.image, random.Random(0))
    assert isinstance(ed, EditRecord) and ed.instruction == "turn it green"
    assert pool.follow_up("vqa", ed.target, random.Random(0)).answer == "green"
    cap = pool.follow_up("caption", red.image, random.Random(0))  # known caption → a caption record
    assert cap.caption == "a plain red square"
    assert pool.follow_up("edit", ed.target, random.Random(0)) is None


def test_real_data_pipeline_carries_pixels_and_chains(jsonl_data, tmp_path):
    root, t2i, edit, vqa = jsonl_data
    fields = {"caption": "meta.text", "image": "file"}
    pool = DatasetPool(
        sources=[
            JsonlSource(path=t2i, kind="t2i", fields=fields, image_root=root / "imgs", limit=1),  # the red one
            JsonlSource(path=edit, kind="edit", image_root=root / "imgs"),
            JsonlSource(path=vqa, kind="vqa", image_root=root / "imgs"),
        ]
    )
    be = EchoBackend()
    out = tmp_path / "out"
    report = SynthPipeline(
        pool=pool,
        backend=be,
        stages=[
            ChainStage(turns=[3, 3], follow_prob=1.0, task_prior={"generate": 10, "edit": 10}),
            DistractorStage(k=[2]),
            InterleaveStage(p=1.0),
        ],
        output_dir=out,
        num_dialogues=12,
        shard_size=5,
        report_png=False,
        progress=False,
    ).run()
    assert report.written == 12 and be.calls > 0
    samples = list(read_samples(out))
    assert len(samples) == 12
    colours = {tuple(c) for c in (RED, BLUE, GREEN)}
    chained = 0
    for s in samples:
        for img in s.images.values():  # pixels come straight from the dataset files
            assert tuple(img[:, 0, 0].tolist()) in colours
        turns = s.dialogue.turns
        for u, a in zip(turns[::2], turns[1::2]):
            ref = a.meta.get("refers_to")
            if a.meta["tags"]["task"] == "edit" and ref:
                chained += 1
                # the edit acts on the red picture made earlier and yields the green one
                assert torch.equal(s.images[ref["image"]][:, 0, 0], torch.tensor(RED, dtype=torch.uint8))
                out_key = a.segments[0].image
                assert torch.equal(s.images[out_key][:, 0, 0], torch.tensor(GREEN, dtype=torch.uint8))
                if ref["distance"] > 0:
                    assert u.text.startswith("Going back to the picture of a plain red square")
    assert chained >= 3
