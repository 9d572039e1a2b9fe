"""run_script / read_script: a JSON-lines dialogue drives a session; replies and written images come back."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.io import read_image, write_png

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.script import read_script, run_script
from chatumm_kit.inference.session import ChatSession, SessionConfig
from chatumm_kit.presets import build_model

CONFIG = SessionConfig(vit_patch_size=8, vae_token_stride=8, max_image_side=32, image_size=(32, 32))


@pytest.fixture(scope="module")
def tok():
    return ChatTokenizer.train(["draw a red circle", "make it blue", "it is red"] * 5, vocab_size=290)


@pytest.fixture(scope="module")
def model(tok):
    m = build_model({"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": tok.vocab_size})
    torch.nn.init.normal_(m.vae.llm2vae.weight, std=0.05)
    return m


def test_script_replies_and_writes_images(model, tok, tmp_path):
    photo = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    write_png(photo, str(tmp_path / "photo.png"))
    script = tmp_path / "chat.jsonl"
    lines = [
        {"user": "draw a red circle", "images": ["photo.png"]},
        {"rollback": 0},
        {"user": "make it blue", "respond": {"max_segments": 1}},
    ]
    script.write_text("# a comment\n\n" + "\n".join(json.dumps(x) for x in lines) + "\n")
    parsed = read_script(script)
    assert parsed == lines

    # first reply: an image then the end; second reply: cut after one segment
    plan = [tok.vision_start_id, tok.end_id, tok.vision_start_id]
    calls = []

    def hook(module, args, out):
        target = plan[min(len(calls), len(plan) - 1)]
        calls.append(target)
        return out + 100.0 * torch.nn.functional.one_hot(torch.tensor(target), out.shape[-1])

    session = ChatSession(model=model, tokenizer=tok, config=CONFIG)
    handle = model.backbone.lm_head.register_forward_hook(hook)
    try:
        records = run_script(
            session, parsed, image_dir=tmp_path / "out", sampler=SamplerConfig(num_steps=2, seed=0), base_dir=tmp_path
        )
    finally:
        handle.remove()
    assert [r["turn"] for r in records] == [1, 1]  # the rollback removed the first exchange
    assert records[0]["intents"] == ["image", "end"] and records[0]["finished"]
    assert records[1]["intents"] == ["image"] and not records[1]["finished"]
    assert records[1]["images"] == [str(tmp_path / "out" / "turn1_0.png")]
    assert torch.equal(read_image(records[1]["images"][0]), session.images[session.dialogue.turns[1].image_keys[0]])
    assert session.num_turns == 2 and session.dialogue.turns[0].text == "make it blue"
    assert list(session.images) == session.dialogue.turns[1].image_keys  # the user's photo was forgotten


def test_script_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "hi"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: each line must be a JSON object"):
        read_script(bad)
    with pytest.raises(ValueError, match="script line 0: unknown keys"):
        run_script(None, [{"usr": "hi"}], image_dir=tmp_path)
