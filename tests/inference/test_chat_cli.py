"""`chatumm chat`: scripted and interactive chats against a trained checkpoint; the training preview callback."""

import io
import json
from pathlib import Path

import torch
from torchvision.io import write_png

from chatumm_kit.cli import main
from chatumm_kit.inference.chat_loop import interactive
from chatumm_kit.inference.sampler import SamplerConfig
from chatumm_kit.inference.session import ChatSession, SessionConfig
from chatumm_kit.training.callbacks import GenerationPreview
from chatumm_kit.training.loading import load_checkpoint


def test_scripted_chat_writes_one_record_per_reply(trained_checkpoint, tmp_path, capsys):
    image = tmp_path / "in.png"
    write_png(torch.full((3, 32, 32), 255, dtype=torch.uint8), str(image))
    script = tmp_path / "dialogue.jsonl"
    script.write_text(
        json.dumps({"user": "Draw a large red circle in the center."})
        + "\n# a comment line\n"
        + json.dumps({"user": "What colour is the circle?", "images": ["in.png"], "respond": {"max_segments": 1}})
        + "\n"
        + json.dumps({"user": "Now make the first circle blue."})
        + "\n"
    )
    out = tmp_path / "out"
    code = main(["chat", str(trained_checkpoint), "--script", str(script), "--out", str(out), "--steps", "2"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert [r["turn"] for r in records] == [1, 3, 5]  # user turns 0, 2, 4 (line 2: its image, then its text)
    for r in records:
        assert r["intents"][0] in ("text", "image")
        assert all(Path(p).is_file() and Path(p).parent == out for p in r["images"])
        assert ("image" in r["intents"]) == bool(r["images"])


def test_bad_script_and_missing_checkpoint_exit_2(trained_checkpoint, tmp_path, capsys):
    script = tmp_path / "bad.jsonl"
    script.write_text('{"user": "hi"}\n{"usr": "typo"}\n')
    assert main(["chat", str(trained_checkpoint), "--script", str(script), "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "script line 1: unknown keys ['usr']" in capsys.readouterr().err
    assert main(["chat", str(tmp_path / "nope.ckpt")]) == 2
    assert "error:" in capsys.readouterr().err


def test_interactive_loop_attaches_images_rolls_back_and_quits(trained_checkpoint, tmp_path):
    loaded = load_checkpoint(trained_checkpoint)
    session = ChatSession(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        config=SessionConfig.for_model(loaded.model, image_size=(32, 32)),
    )
    image = tmp_path / "pic.png"
    write_png(torch.zeros((3, 32, 32), dtype=torch.uint8), str(image))
    lines = [f"/image {image}", "what is in this picture?", "/image missing.png", "/rollback 0", "/quit", "never read"]
    out = io.StringIO()
    interactive(
        session,
        sampler=SamplerConfig(num_steps=2, seed=0),
        out=tmp_path / "imgs",
        lines=lines,
        write=out,
        respond_kwargs={"max_new_tokens": 4},
    )
    text = out.getvalue()
    assert f"attached {image}" in text
    assert "assistant" in text  # a text or an image reply was printed
    assert "error: no such image file: missing.png" in text
    assert "rolled back to before turn 0" in text
    assert session.num_turns == 0


def test_generation_preview_renders_one_tile_per_prompt_deterministically(trained_checkpoint):
    loaded = load_checkpoint(trained_checkpoint)
    preview = GenerationPreview(prompts=["Draw a red circle.", "Draw a blue square."], num_steps=2, seed=3)
    a = preview.render(loaded.model, loaded.tokenizer)
    b = preview.render(loaded.model, loaded.tokenizer)
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not loaded.model.training  # load_checkpoint returns eval mode and render restores it


def test_chat_sizes_images_as_the_training_data_did(trained_checkpoint):
    """The checkpoint's recipe says how its data sized views; chat uses the same rule (SPEC §4.1)."""
    from chatumm_kit.data.view_sizing import ViewSizing
    from chatumm_kit.training.loading import checkpoint_view_sizing

    sizing = checkpoint_view_sizing(trained_checkpoint)
    assert sizing == ViewSizing.capped(vit_patch_size=8, vae_token_stride=8, max_side=32)
    loaded = load_checkpoint(trained_checkpoint)
    config = SessionConfig.for_model(loaded.model, view_sizing=sizing)
    assert config.image_size == (32, 32) and config.sizing == sizing


def test_chat_sampler_flags_preset_then_overrides(trained_checkpoint, tmp_path, capsys):
    from chatumm_kit.cli import build_parser, chat_sampler_config

    def config(*flags):
        return chat_sampler_config(build_parser().parse_args(["chat", "ckpt", *flags]))

    assert config() == SamplerConfig(seed=0)  # no flags: today's defaults
    edit = config("--preset", "bagel_edit", "--steps", "5", "--cfg-renorm-min", "0.2")
    assert (edit.cfg_image_scale, edit.cfg_renorm, edit.num_evaluations, edit.renorm_min) == (
        2.0,
        "text_channel",
        4,
        0.2,
    )
    own = config("--cfg-renorm", "channel", "--cfg-interval", "0", "1", "--shift", "1", "--cfg-skip-rule", "bagel")
    assert (own.cfg_renorm, own.cfg_interval, own.shift, own.cfg_skip_rule) == ("channel", (0.0, 1.0), 1.0, "bagel")
    # A bad preset fails before the checkpoint is read.
    assert main(["chat", str(tmp_path / "nope.ckpt"), "--preset", "bagle"]) == 2
    assert "unknown sampler preset 'bagle'" in capsys.readouterr().err
    script = tmp_path / "d.jsonl"
    script.write_text(json.dumps({"user": "Draw a large red circle in the center."}) + "\n")
    flags = ["--preset", "bagel_t2i", "--steps", "3"]
    assert main(["chat", str(trained_checkpoint), "--script", str(script), "--out", str(tmp_path / "o"), *flags]) == 0


def test_chat_mode_flag_and_per_line_modes(trained_checkpoint, tmp_path, capsys):
    image = tmp_path / "in.png"
    write_png(torch.full((3, 24, 16), 200, dtype=torch.uint8), str(image))
    script = tmp_path / "modes.jsonl"
    lines = [
        {"user": "What is 9 times 8?"},
        {"user": "Make the circle green.", "images": ["in.png"], "respond": {"mode": "edit"}},
        {"user": "What colour is the circle?", "respond": {"mode": "text", "max_new_tokens": 4}},
        {"user": "Draw a circle.", "respond": {"image_size": [16, 32]}},
    ]
    script.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    code = main(
        ["chat", str(trained_checkpoint), "--script", str(script), "--out", str(out), "--steps", "2", "--mode", "image"]
    )
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert [r["intents"] for r in records] == [["image", "end"], ["image", "end"], ["text", "end"], ["image", "end"]]
    from torchvision.io import read_image

    sizes = [tuple(read_image(r["images"][0]).shape[1:]) for r in records if r["images"]]
    assert sizes == [(32, 32), (24, 16), (16, 32)]  # session size, the edited image's, the line's own


def test_chat_device_and_dtype(trained_checkpoint, tmp_path, capsys):
    loaded = load_checkpoint(trained_checkpoint, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    reference = load_checkpoint(trained_checkpoint)
    w, w_ref = dict(loaded.model.named_parameters()), dict(reference.model.named_parameters())
    assert all(torch.equal(w[k], w_ref[k].to(torch.bfloat16)) for k in w_ref)
    script = tmp_path / "d.jsonl"
    script.write_text(json.dumps({"user": "Draw a circle.", "respond": {"mode": "image"}}) + "\n")
    flags = ["--script", str(script), "--out", str(tmp_path / "o"), "--steps", "2", "--dtype", "bfloat16"]
    assert main(["chat", str(trained_checkpoint), *flags]) == 0, capsys.readouterr().err
    assert main(["chat", str(trained_checkpoint), "--device", "gpu0"]) == 2
    assert "--device 'gpu0' is not a torch device" in capsys.readouterr().err


def test_chat_think_modes_and_system_prompts(trained_checkpoint, tmp_path, capsys):
    script = tmp_path / "think.jsonl"
    lines = [
        {"user": "Draw a circle."},  # --mode think_image
        {"user": "What colour is it?", "respond": {"mode": "think_text", "max_new_tokens": 4}},
        {"rollback": 4},  # forget the think_text reply and the system turn it put before its question
        {"user": "Is it red?", "respond": {"mode": "text"}},
    ]
    script.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    flags = ["--script", str(script), "--out", str(out), "--steps", "2", "--max-new-tokens", "3"]
    flags += ["--mode", "think_image", "--system", "Be brief.", "--think-image-prompt", "Plan first."]
    code = main(["chat", str(trained_checkpoint), *flags])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert [r["intents"] for r in records] == [["text", "image", "end"], ["text", "end"], ["text", "end"]]
    # turns: 0 system "Be brief.", 1 system "Plan first.", 2 user, 3 reply; then 4 system (BAGEL's text prompt), 5
    # user, 6 reply — rolled back from 4 on; the last line has no think prompt before it
    assert [r["turn"] for r in records] == [3, 6, 5]
    assert records[0]["think"] and records[0]["text"] == "" and len(records[0]["images"]) == 1
    assert records[2]["think"] == ""
    assert main(["chat", str(trained_checkpoint), "--think-text-prompt", ""]) == 2
    assert "think_text_prompt must be a non-empty string" in capsys.readouterr().err


def test_reply_flags_reach_a_script_and_view_sizing_is_checked(trained_checkpoint, tmp_path, capsys):
    script = tmp_path / "d.jsonl"
    script.write_text(json.dumps({"user": "Draw a circle."}) + "\n" + json.dumps({"user": "What colour is it?"}) + "\n")
    out = tmp_path / "o"
    flags = ["--script", str(script), "--out", str(out), "--steps", "1", "--max-segments", "1", "--top-p", "0.9"]
    assert main(["chat", str(trained_checkpoint), *flags]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert [len(r["intents"]) for r in records] == [1, 1]  # one segment each, no <|end|> predicted: the flag held
    # a policy whose strides are not the model's: one line, exit 2 (chat_tiny's ViT patch is 8, BAGEL's is 14)
    assert main(["chat", str(trained_checkpoint), *flags, "--view-sizing", "bagel"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["chat", str(trained_checkpoint), "--script", str(script), "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
