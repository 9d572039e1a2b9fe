"""`chatumm chat` on user mistakes: each is one line and the session goes on; script replies are written as made."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torchvision.io import write_png

from chatumm_kit.cli import main
from chatumm_kit.inference.session import ChatSession


@pytest.mark.parametrize(
    "args, says",
    [
        (["--steps", "0"], "num_steps must be an integer >= 1"),
        (["--image-size", "0", "0"], "image_size must be two integers >= 1"),
        (["--cfg-text", "nan"], "cfg_text_scale must be a finite number"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--script", "no/such/script.jsonl"], "no such script file"),
    ],
)
def test_bad_settings_are_one_line_before_anything_loads(trained_checkpoint, capsys, args, says) -> None:
    assert main(["chat", str(trained_checkpoint), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and says in err[0], err


def test_script_mistakes_are_one_line_each_and_the_script_goes_on(trained_checkpoint, tmp_path, capsys) -> None:
    (tmp_path / "notes.png").write_text("not a picture")
    lines = [
        {"user": "Draw a large red circle in the center."},
        {"user": "hi", "images": "x.jpg"},
        {"user": "look", "images": ["missing.png"]},
        {"user": "look", "images": ["notes.png"]},
        {"rollback": 99},
        {"user": "x", "respond": {"temperature": -1}},
        {"user": "y", "respond": {"top_p": "high"}},
        {"user": "What colour is the circle?"},
    ]
    script = tmp_path / "chat.jsonl"
    script.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    assert main(["chat", str(trained_checkpoint), "--script", str(script), "--out", str(out), "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [int(e.split("script line ")[1].split(":")[0]) for e in err] == [1, 2, 3, 4, 5, 6], err
    says = ["'images' must be a list", "no such image file", "not a readable image", "rollback", "temperature", "top_p"]
    assert all(s in e for s, e in zip(says, err)), err
    records = [json.loads(x) for x in (out / "replies.jsonl").read_text().splitlines()]
    assert [(r["line"], r["turn"]) for r in records] == [(0, 1), (7, 3)]  # the bad lines left the session as it was


def test_script_replies_are_written_as_they_are_made(trained_checkpoint, tmp_path, monkeypatch) -> None:
    script = tmp_path / "chat.jsonl"
    script.write_text("\n".join(json.dumps({"user": f"Say something {i}."}) for i in range(4)) + "\n")
    out = tmp_path / "out"
    real = ChatSession.respond
    seen = []

    def respond(self, **kw):
        seen.append((out / "replies.jsonl").read_text().count("\n"))
        if len(seen) == 3:
            raise KeyboardInterrupt  # killed while line 3 is being answered
        return real(self, **kw)

    monkeypatch.setattr(ChatSession, "respond", respond)
    with pytest.raises(KeyboardInterrupt):
        main(["chat", str(trained_checkpoint), "--script", str(script), "--out", str(out), "--steps", "2"])
    assert seen == [0, 1, 2]  # each reply was on disk before the next line was played
    assert [json.loads(x)["line"] for x in (out / "replies.jsonl").read_text().splitlines()] == [0, 1]


def test_interactive_mistakes_are_one_line_each_and_the_chat_goes_on(
    trained_checkpoint, tmp_path, capsys, monkeypatch
) -> None:
    picture = tmp_path / "pic.png"
    write_png(torch.zeros((3, 32, 32), dtype=torch.uint8), str(picture))
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    typed = [
        "/image missing.png",
        f"/image {notes}",
        "/rollback 99",
        "/rollback x",
        f"/save {notes}/inside",  # a folder under a file: cannot be made
        "/bogus",
        f"/image {picture}",
        "What is in this picture?",
        f"/save {tmp_path / 'saved'}",
        "/quit",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(typed) + "\n"))
    out = tmp_path / "out"
    assert main(["chat", str(trained_checkpoint), "--out", str(out), "--steps", "2", "--max-new-tokens", "4"]) == 0
    shown = capsys.readouterr().out.splitlines()
    errors = [ln for ln in shown if ln.startswith("error:")]
    assert len(errors) == 6, shown
    for says, line in zip(["no such image file", "not a readable image", "rollback", "rollback", "cannot save",
                           "unknown command"], errors):  # fmt: skip
        assert says in line, line
    assert any(ln.startswith("assistant") for ln in shown) and f"attached {picture}" in shown
    assert (tmp_path / "saved" / "session.json").is_file()
