"""``chatumm data import``: the three layouts in, indexed shards out, bad lines reported by line/turn/field and
skipped, images of real sizes kept exactly, CFG dropout marks by policy, streaming, and the shards read back by
``DialogueDataModule`` into packed batches."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from chatumm_kit.cli import main
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data import importer as importer_module
from chatumm_kit.data.datamodule import DialogueDataModule
from chatumm_kit.data.dialogue import Dialogue, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.droppable import DroppablePolicy, mark_droppable
from chatumm_kit.data.image_files import ImageReadError, read_image
from chatumm_kit.data.import_formats import DialogueImportError, ImportFormat, parse_line
from chatumm_kit.data.importer import ERRORS_NAME, REPORT_NAME, import_dialogues
from chatumm_kit.data.shards import DialogueShardWriter, ShardFormatError, ShardIndex, read_samples


def _pixels(width: int, height: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)


def _save(t: torch.Tensor, path: Path, **kw) -> None:
    Image.fromarray(t.permute(1, 2, 0).numpy()).save(path, **kw)


def _data_url(t: torch.Tensor) -> str:
    buf = io.BytesIO()
    Image.fromarray(t.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Non-square images of real sizes: 600×800 and 1000×250 PNG (lossless), a 300×200 RGBA PNG."""
    root = tmp_path_factory.mktemp("photos")
    px = {"tall": _pixels(600, 800, 1), "wide": _pixels(1000, 250, 2), "small": _pixels(40, 30, 3)}
    (root / "sub").mkdir()
    _save(px["tall"], root / "tall.png")
    _save(px["wide"], root / "sub" / "wide.png")
    rgba = torch.cat([_pixels(300, 200, 4), torch.full((1, 200, 300), 0, dtype=torch.uint8)])
    Image.fromarray(rgba.permute(1, 2, 0).numpy(), mode="RGBA").save(root / "clear.png")
    return {"root": root, "px": px}


KIT_LINE = {
    "id": "kit-1",
    "turns": [
        {"role": "user", "segments": [{"type": "text", "text": "Draw a tall picture."}]},
        {"role": "assistant", "segments": [{"type": "image", "image": "tall.png"}]},
        {"role": "user", "segments": [{"type": "text", "text": "Describe it.", "droppable": True}]},
        {"role": "assistant", "segments": [{"type": "text", "text": "Noise, mostly."}]},
    ],
    "meta": {"source": "mine"},
}
LLAVA_LINE = {
    "id": 7,
    "images": ["sub/wide.png", "tall.png"],
    "conversations": [
        {"from": "human", "value": "<image>\nWhat is in this wide image?"},
        {"from": "gpt", "value": "A wide strip of noise."},
        {"from": "human", "value": "Now make it tall."},
        {"from": "gpt", "value": "Here it is: <image> Done."},
    ],
}


def _openai_line(small: torch.Tensor) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Edit this:"},
                    {"type": "image_url", "image_url": {"url": _data_url(small)}},
                ],
            },
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "sub/wide.png"}}]},
            {"role": "user", "content": "And this one?"},
            {"role": "assistant", "content": "Old answer.", "weight": 0},
            {"role": "user", "content": [{"type": "image", "image": "clear.png"}, {"type": "text", "text": "Why?"}]},
            {"role": "assistant", "content": "Because."},
        ]
    }


@pytest.fixture(scope="module")
def imported(photos: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One JSONL mixing the three layouts, with bad lines at 2 (bad JSON), 5 (missing image) and 7 (placeholders)."""
    root = tmp_path_factory.mktemp("import")
    lines = [
        json.dumps(KIT_LINE),  # 1
        '{"id": "broken", "conversations": [',  # 2: not JSON
        json.dumps(LLAVA_LINE),  # 3
        "",  # 4: blank
        json.dumps(
            {
                "image": "missing.jpg",
                "conversations": [  # 5: missing file
                    {"from": "human", "value": "<image> hi"},
                    {"from": "gpt", "value": "hello"},
                ],
            }
        ),
        json.dumps(_openai_line(photos["px"]["small"])),  # 6
        json.dumps(
            {
                "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
                "image": "tall.png",
            }
        ),  # 7: two placeholders, one image
    ]
    jsonl = root / "chats.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    out = root / "shards"
    code = main(
        ["data", "import", str(jsonl), "--images", str(photos["root"]), "--out", str(out), "--samples-per-shard", "2"]
    )
    return {"code": code, "out": out, "jsonl": jsonl}


def test_import_counts_report_and_bad_lines(imported: dict, capsys: pytest.CaptureFixture) -> None:
    assert imported["code"] == 0
    out: Path = imported["out"]
    report = json.loads((out / REPORT_NAME).read_text())
    assert (report["lines"], report["blank_lines"], report["imported"], report["skipped"]) == (7, 1, 3, 3)
    assert report["formats"] == {"kit": 1, "llava": 1, "openai": 1}
    assert report["images"] == 1 + 2 + 3 and report["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    errors = [json.loads(x) for x in (out / ERRORS_NAME).read_text().splitlines()]
    assert [e["line"] for e in errors] == [2, 5, 7]
    assert "not valid JSON" in errors[0]["reason"]
    assert (errors[1]["turn"], errors[1]["field"]) == (0, "image") and "missing.jpg" in errors[1]["reason"]
    assert (errors[2]["turn"], errors[2]["field"]) == (0, "conversations[0].value")
    assert "more <image> placeholders than images" in errors[2]["reason"]
    assert ShardIndex.load(out / "index.json").total_samples == 3


def test_imported_dialogues_and_pixels_are_exact(imported: dict, photos: dict) -> None:
    px = photos["px"]
    samples = {s.dialogue.id: s for s in read_samples(imported["out"])}
    assert sorted(samples) == ["7", "kit-1", "line-6"]

    kit = samples["kit-1"]
    assert kit.dialogue.meta["source"] == "mine"
    assert kit.dialogue.meta["import"] == {
        "file": "chats.jsonl",
        "line": 1,
        "format": "kit",
        "images": {"img0": "tall.png"},
    }
    assert torch.equal(kit.images["img0"], px["tall"])  # 600 wide × 800 high, untouched
    # default policy: the user turn answered with an image is droppable; the explicit mark of turn 2 is kept
    assert [[s.droppable for s in t.segments] for t in kit.dialogue.turns] == [[True], [False], [True], [False]]

    llava = samples["7"]
    t = llava.dialogue.turns
    assert [x.role for x in t] == [Role.USER, Role.ASSISTANT, Role.USER, Role.ASSISTANT]
    assert t[0].segments == [ImageSegment(image="img0"), TextSegment(text="What is in this wide image?")]
    assert t[3].segments == [TextSegment(text="Here it is:"), ImageSegment(image="img1"), TextSegment(text="Done.")]
    assert t[2].segments == [TextSegment(text="Now make it tall.", droppable=True)]
    assert torch.equal(llava.images["img0"], px["wide"]) and tuple(llava.images["img0"].shape) == (3, 250, 1000)
    assert torch.equal(llava.images["img1"], px["tall"])

    oa = samples["line-6"]
    t = oa.dialogue.turns
    # the system message is a system turn of its own: text only, never marked droppable (text-unconditional CFG
    # keeps it, SPEC §4.1); the user turn after it is marked as before
    assert t[0].role is Role.SYSTEM and t[0].segments == [TextSegment(text="You are helpful.")]
    t = t[1:]
    assert t[0].segments[0] == TextSegment(text="Edit this:", droppable=True)
    assert [s.image for s in t[0].segments if isinstance(s, ImageSegment)] == ["img0"]
    assert torch.equal(oa.images["img0"], px["small"])  # the data URL
    assert t[1].segments == [ImageSegment(image="img1")] and t[3].trainable is False
    assert oa.dialogue.meta["import"]["images"]["img0"].startswith("data:image/png;base64,")
    clear = oa.images["img2"]  # transparent RGBA composited over white
    assert tuple(clear.shape) == (3, 200, 300) and int(clear.min()) == 255


def test_datamodule_reads_imported_shards_into_batches(imported: dict) -> None:
    samples = list(read_samples(imported["out"]))
    texts = [s.text for x in samples for t in x.dialogue.turns for s in t.segments if isinstance(s, TextSegment)]
    tok = ChatTokenizer.train(texts * 4, vocab_size=300)
    dm = DialogueDataModule(
        train_sources=[{"name": "mine", "shards": str(imported["out"])}],
        tokenizer=tok,
        vit_patch_size=14,
        vae_token_stride=16,
        max_image_side=224,
        token_budget=3000,
        num_workers=0,
        shuffle_buffer=1,
        drop_rates={"text": 0.0, "vit": 0.0, "vae": 0.0},
    )
    dm.setup("fit")
    batches = [dm.consume(item) for item in dm.train_dataloader()]
    assert sorted(k.split("#")[0] for b in batches for k in b.sample_keys) == [
        "mine/shard-000000.tar/000000",
        "mine/shard-000000.tar/000001",
        "mine/shard-000001.tar/000000",
    ]
    # every image appearance enters as a ViT view (6), each generated one also as a noised VAE view (3)
    assert sum(b.vit_grid_hw.shape[0] for b in batches) == 6
    assert sum(int(b.vae_view_noised.sum()) for b in batches) == 3
    assert all(b.ce_indices.numel() > 0 for b in batches)
    assert dm.health().total_skipped == 0


# ------------------------------------------------------------------------------------------------- parsers
@pytest.mark.parametrize(
    ("row", "turn", "field", "says"),
    [
        ({"conversations": [{"from": "bot", "value": "x"}]}, 0, "conversations[0].from", "unknown role 'bot'"),
        ({"conversations": [{"from": "human", "value": ""}]}, 0, "conversations[0].value", "empty text"),
        (
            {"image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            None,
            "image",
            "1 image(s) but 0 <image> placeholder(s)",
        ),
        ({"conversations": [{"from": "human", "value": "hi"}]}, None, "conversations", "no trained assistant turn"),
        (
            {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
            0,
            "conversations",
            "must start with a user turn",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            0,
            "messages[0].content[0].type",
            "unknown content part type 'audio'",
        ),
        ({"messages": [{"role": "user", "content": []}]}, 0, "messages[0].content", "an empty list"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]},
            1,
            "messages[1].weight",
            "weight must be 0 or 1",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
            1,
            None,
            "a system message with no user message after it",
        ),
        (
            {"messages": [{"role": "system", "content": "b"}, {"role": "assistant", "content": "a"}]},
            1,
            "messages[1]",
            "must be followed by a user message",
        ),
        (
            {"messages": [{"role": "system", "content": [{"type": "image", "image": "x.png"}]}]},
            0,
            "messages[0]",
            "cannot hold an image",
        ),
        ({"turns": [{"role": "user", "segments": [{"type": "video"}]}], "id": "k"}, 0, "turns", "segment 0"),
        ({"turns": [], "messages": []}, None, None, "found 'turns' and 'messages'"),
    ],
)
def test_parse_errors_name_line_turn_and_field(row: dict, turn: int | None, field: str | None, says: str) -> None:
    with pytest.raises(DialogueImportError) as err:
        parse_line(row, line=42)
    e = err.value
    assert (e.line, e.turn, e.field) == (42, turn, field), str(e)
    assert says in e.reason
    assert str(e).startswith("line 42")


def test_forced_format_and_llava_single_image_and_id() -> None:
    row = {
        "image": "x.png",
        "conversations": [{"from": "user", "value": "see <image>"}, {"from": "assistant", "value": "ok"}],
    }
    parsed = parse_line(row, line=3, format="llava")
    assert parsed.dialogue.id == "line-3" and parsed.image_fields == {"x.png": (0, "image")}
    assert parsed.dialogue.turns[0].segments == [TextSegment(text="see"), ImageSegment(image="x.png")]
    with pytest.raises(DialogueImportError, match="no 'messages' key"):
        parse_line(row, line=3, format=ImportFormat.OPENAI)


def test_read_image_refusals_and_shrink(photos: dict, tmp_path: Path) -> None:
    root = photos["root"]
    with pytest.raises(ImageReadError, match="remote URLs are not fetched"):
        read_image("https://example.com/a.png", images_dir=root)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="cannot decode"):
        read_image("junk.png", images_dir=tmp_path)
    img = read_image(f"file://{root / 'sub' / 'wide.png'}", images_dir=tmp_path, max_side=500)
    assert tuple(img.shape) == (3, 125, 500)
    # a JPEG with an EXIF orientation (rotate 90) comes out upright: 40 wide × 30 high stored, 30 × 40 shown
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(photos["px"]["small"], tmp_path / "rot.jpg", exif=exif.tobytes())
    assert tuple(read_image("rot.jpg", images_dir=tmp_path).shape) == (3, 40, 30)


# ------------------------------------------------------------------------------------------------- policy
def _gen_dialogue() -> Dialogue:
    return Dialogue(
        id="d",
        turns=[
            Turn(role=Role.USER, segments=[TextSegment(text="draw"), ImageSegment(image="a")]),
            Turn(role=Role.ASSISTANT, segments=[ImageSegment(image="b")]),
            Turn(role=Role.USER, segments=[TextSegment(text="what?")]),
            Turn(role=Role.ASSISTANT, segments=[TextSegment(text="this")]),
            Turn(role=Role.USER, segments=[TextSegment(text="again")]),
            Turn(role=Role.ASSISTANT, segments=[ImageSegment(image="c")], trainable=False),
        ],
    )


@pytest.mark.parametrize(
    ("policy", "marks"),
    [
        ("image-replies", [[True, True], [False], [False], [False], [False], [False]]),
        ("user-turns", [[True, True], [False], [True], [False], [True], [False]]),
        ("none", [[False, False], [False], [False], [False], [False], [False]]),
    ],
)
def test_droppable_policies(policy: str, marks: list) -> None:
    out = mark_droppable(_gen_dialogue(), DroppablePolicy(policy))
    assert [[s.droppable for s in t.segments] for t in out.turns] == marks


# ------------------------------------------------------------------------------------------------- streaming, CLI
def test_import_streams_one_line_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jsonl = tmp_path / "many.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    jsonl.write_text("\n".join(json.dumps(row) for _ in range(50)) + "\n")
    read = {"n": 0}
    real_lines = importer_module._numbered_lines

    def counting(path):
        for item in real_lines(path):
            read["n"] += 1
            yield item

    real_write = DialogueShardWriter.write

    def checked_write(self, sample):
        # the sample of line n is written before line n + 1 is read: nothing accumulates
        assert sample.dialogue.meta["import"]["line"] == read["n"]
        return real_write(self, sample)

    monkeypatch.setattr(importer_module, "_numbered_lines", counting)
    monkeypatch.setattr(DialogueShardWriter, "write", checked_write)
    report = import_dialogues(jsonl, out=tmp_path / "out", samples_per_shard=20)
    assert (report.imported, len(report.shards), read["n"]) == (50, 3, 50)


def test_cli_refuses_existing_shards_unless_append(imported: dict, capsys: pytest.CaptureFixture) -> None:
    args = ["data", "import", str(imported["jsonl"]), "--out", str(imported["out"])]
    assert main(args) == 2
    assert "already holds shards" in capsys.readouterr().err
    with pytest.raises(ShardFormatError):
        import_dialogues(imported["jsonl"], out=imported["out"])


def test_readme_bring_your_own_dialogues_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's example lines and command, exactly as written, with the images they name."""
    import shlex

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Bring your own dialogues", 1)[1].split("\n## ", 1)[0]
    jsonl = section.split("```jsonl\n", 1)[1].split("```", 1)[0]
    command = section.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    (tmp_path / "dialogues.jsonl").write_text(jsonl)
    (tmp_path / "images").mkdir()
    for i, name in enumerate(("kite.png", "photo.jpg", "night.jpg")):
        _save(_pixels(64 + 16 * i, 48, i), tmp_path / "images" / name)
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)
    assert argv[0] == "chatumm"
    assert main(argv[1:]) == 0
    samples = list(read_samples(tmp_path / "data" / "mine"))
    assert [s.dialogue.id for s in samples] == ["k1", "l1", "line-3"]
    assert [len(s.images) for s in samples] == [1, 2, 2]
