"""The README's "Fine-tune BAGEL on your dialogues" block runs as written, on a tiny BAGEL-format release, on CPU.

The test reads the bash block after the ``<!-- journey`` marker and the tiny-run variables from the README's "Tiny
runs" bullet (``EXTRA``, ``EXTRA_FSDP``, ``CHAT``, ``EVAL``, ``DEVICES``, ``STEPS``), writes the release folder
(stored in bf16, like BAGEL's) and a dialogue folder — the three JSONL layouts, real-size photos (600×800,
1000×250) and one broken line — and runs the block with bash: convert → import → plan → both recipes on 2 processes
→ resume → a 2-turn chat with a photo → eval → export → reload. Then it checks what each step left behind, and that
the exported release gives the checkpoint's logits.

Part of the default suite (CI runs it). Eleven ``chatumm`` / ``python`` commands, three of them 2-process trainings:
148 s of CPU in all processes (a cgroup's count, on the shared 2-core machine under a load of ~13, where it took
11 min of wall time), most of it Python start-up — torch, Lightning, diffusers — in each of its 14 processes; the
single-process commands run one after another and the trainings' two ranks side by side, so an idle 2-core machine
should take ~100-120 s (an estimate: no idle machine was available to measure).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from _tiny_bagel import make_tiny_bagel

README = Path(__file__).resolve().parents[1] / "README.md"
DISTRIBUTED_VARIABLES = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                         "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"}  # fmt: skip
SRC = Path(__file__).resolve().parents[1] / "src"


def journey_block(text: str) -> str:
    """The bash block after the ``<!-- journey`` marker."""
    marker = text.index("<!-- journey")
    match = re.search(r"```bash\n(.*?)```", text[marker:], flags=re.S)
    assert match, "README: no bash block after the journey marker"
    return match.group(1)


def tiny_variables(text: str) -> dict[str, str]:
    """The values the README's "Tiny runs" bullet gives (quoted ``NAME="..."`` and ``DEVICES=2 STEPS=2``)."""
    start = text.index("**Tiny runs.**")
    bullet = " ".join(text[start : text.index("\n\n", start)].split())
    found = dict(re.findall(r'`(\w+)="([^"]*)"`', bullet))
    found.update(re.findall(r"\b(DEVICES|STEPS)=(\d+)\b", bullet))
    assert {"EXTRA", "EXTRA_FSDP", "CHAT", "EVAL", "DEVICES", "STEPS"} <= found.keys(), found
    return found


def _photo(path: Path, size: tuple[int, int], seed: int) -> str:
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.zeros((h, w, 3), dtype=np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
    pixels[h // 4 : h // 2, w // 4 : w // 2] = rng.integers(0, 255, 3, dtype=np.uint8)  # a block of another colour
    Image.fromarray(pixels).save(path)
    return path.name


def write_dialogues(folder: Path) -> None:
    """train.jsonl (kit, LLaVA and OpenAI lines, one broken line), val.jsonl, images/ with photo.jpg."""
    images = folder / "images"
    images.mkdir(parents=True)
    tall = _photo(images / "photo.jpg", (600, 800), 0)
    wide = _photo(images / "wide.png", (1000, 250), 1)
    kit = {"id": "kit{}", "turns": [
        {"role": "user", "segments": [{"type": "text", "text": "Draw a red kite."}]},
        {"role": "assistant", "segments": [{"type": "image", "image": wide}]}]}  # fmt: skip
    llava = {"id": "llava{}", "images": [tall, wide], "conversations": [  # the gpt turn's <image> is generated
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A kite on a beach."},
        {"from": "human", "value": "Make it night-time."}, {"from": "gpt", "value": "<image>"}]}  # fmt: skip
    openai = {"messages": [
        {"role": "system", "content": "You are a helpful artist."},
        {"role": "user", "content": [{"type": "text", "text": "What colour is this?"},
                                     {"type": "image_url", "image_url": {"url": tall}}]},
        {"role": "assistant", "content": "Mostly one colour, with a square of another."}]}  # fmt: skip

    def lines(n: int) -> list[str]:
        out = []
        for i in range(n):
            layout = (kit, llava, openai)[i % 3]
            out.append(json.dumps(json.loads(json.dumps(layout).replace("{}", str(i)))))
        return out

    train = lines(6)
    train.insert(3, '{"id": "broken", "conversations": [{"from": "human", "value": "<image> no image given"}]}')
    (folder / "train.jsonl").write_text("\n".join(train) + "\n")
    (folder / "val.jsonl").write_text("\n".join(lines(8)) + "\n")


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    root = tmp_path_factory.mktemp("journey")
    text = README.read_text()
    block, tiny = journey_block(text), tiny_variables(text)
    make_tiny_bagel(root / "BAGEL-tiny", dtype=torch.bfloat16, side=8)
    write_dialogues(root / "my_dialogues")
    # a fresh shell's environment: not the rendezvous of a process group an earlier test left in this process
    # (Lightning sets MASTER_PORT in os.environ; its port may still be held, EADDRINUSE)
    fresh = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    env = {
        **fresh,
        **tiny,
        "BAGEL": str(root / "BAGEL-tiny"),
        "DATA": "my_dialogues",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        ["bash", "-c", block], cwd=root, env=env, capture_output=True, text=True, timeout=1500, check=False
    )
    assert proc.returncode == 0, f"the README journey failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return root, proc.stdout, int(tiny["STEPS"])


def test_import_reports_the_bad_line_and_keeps_the_rest(journey):
    root, out, _ = journey
    report = json.loads((root / "runs/bagel_7b/data/train/import_report.json").read_text())
    text = json.dumps(report)
    assert "line 4" in text or '"line": 4' in text, text[:2000]
    written = json.loads((root / "runs/bagel_7b/data/train/index.json").read_text())
    assert sum(s["num_samples"] for s in written["shards"]) == 6


def test_both_recipes_trained_and_the_fsdp_run_resumed(journey):
    from chatumm_kit.training.checkpoints import is_sharded_checkpoint
    from chatumm_kit.training.loading import checkpoint_has_ema

    root, _, steps = journey
    fsdp = root / "runs/bagel_7b/sft_chat_fsdp/checkpoints/last.ckpt"
    ddp = root / "runs/bagel_7b/sft_chat_freeze_und_ddp/checkpoints/last.ckpt"
    assert is_sharded_checkpoint(fsdp) and ddp.is_file()
    assert checkpoint_has_ema(fsdp) and checkpoint_has_ema(ddp)
    meta = torch.load(fsdp / "meta.pt", weights_only=True)
    assert meta["global_step"] == 2 * steps  # the resume went on from the first run's last step
    assert torch.load(ddp, weights_only=True, map_location="cpu")["global_step"] == steps
    for run in (fsdp, ddp):  # the recipes' BAGEL settings, with the README's tiny view sizing in place of the preset
        recipe = yaml.safe_load((run.parents[1] / "recipe.yaml").read_text())
        assert recipe["system"]["model"]["sample_posterior"] is True
        assert recipe["data"]["view_sizing"]["vae"] == {"min_side": 16, "max_side": 32, "stride": 4}


def test_chat_played_two_turns_with_the_photo(journey):
    """Two replies; images come out at the sizes the checkpoint's view sizing gives (BAGEL's rule at the tiny size):
    a reply to the 600×800 photo at the photo's VAE view, 24×32, a reply to text at the 32-pixel square cap."""
    root, _, _ = journey
    records = [json.loads(line) for line in (root / "runs/bagel_7b/chat/replies.jsonl").read_text().splitlines()]
    assert [r["user"] for r in records] == ["What is in this photo?", "Now draw the same scene at night."]
    assert all(r["text"] or r["images"] for r in records)
    for record, size in zip(records, [(24, 32), (32, 32)], strict=True):
        for image in record["images"]:
            assert Image.open(root / image).size == size, (image, record)


def test_eval_wrote_its_reports(journey):
    root, out, _ = journey
    for stem, slice_name in (("eval_report", "recomposed"), ("eval_report_unseen_vocab", "unseen_vocab")):
        report = json.loads((root / f"runs/bagel_7b/eval/{stem}.json").read_text())
        assert "headline" in report and report["slice"] == slice_name
        assert report["data"]["num_dialogues"] == 2  # the tiny EVAL's count, in both slices
    assert not (root / "runs/shapes").exists()  # every output of the journey stays under runs/bagel_7b
    # chatumm diagnose-edits read that report and its held-out shards, and printed the model's edit table
    report = json.loads((root / "runs/bagel_7b/eval/eval_report.json").read_text())
    edits = [t for t in report["models"]["multi_turn"]["turns"] if t["task"] == "edit"]
    rows = out[out.index("edits of multi_turn") :].splitlines()[2:]
    all_row = next(line.split() for line in rows if line.split()[:1] == ["all"])
    assert int(all_row[1]) == len(edits)


def test_release_reloads_with_the_checkpoints_logits(journey):
    from chatumm_kit.convert.bagel import load_bagel
    from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, TextSegment, Turn
    from chatumm_kit.data.packing import Packer
    from chatumm_kit.model import FlowInputs
    from chatumm_kit.training.loading import load_checkpoint

    root, out, _ = journey
    assert "2 layers" in out
    loaded = load_checkpoint(root / "runs/bagel_7b/sft_chat_fsdp/checkpoints/last.ckpt", use_ema=True)
    back = load_bagel(root / "runs/bagel_7b/release", attn_backend="sdpa")
    dialogue = Dialogue(id="d", turns=[
        Turn(role=Role.USER, segments=[TextSegment(text="make it blue"), ImageSegment(image="a")]),
        Turn(role=Role.ASSISTANT, segments=[TextSegment(text="a blue kite"), ImageSegment(image="b")])])  # fmt: skip
    images = {k: torch.randint(0, 256, (3, 32, 24), dtype=torch.uint8) for k in "ab"}
    packer = Packer(tokenizer=back.tokenizer, vit_patch_size=4, vae_token_stride=4, max_image_side=32)
    batch = packer.pack([DialogueSample(dialogue=dialogue, images=images, key="d")])
    flow = FlowInputs(timesteps=torch.full((1,), 0.5), noise=torch.randn(int(batch.mse_token_mask.sum()), 16))
    with torch.no_grad():
        a, b = loaded.model(batch, flow=flow), back.model(batch, flow=flow)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.velocity, b.velocity)
