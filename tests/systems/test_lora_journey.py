"""The LoRA user journeys end to end, through `chatumm` commands on the real ChatUMMSystem:

* ShapesChat: `shapes/lora_tiny` adapts a trained chat_tiny checkpoint (the shared 2-step one) to its new task mix;
  the base stays frozen, the adapter exports alone, and `chatumm chat` runs the unmerged adapter — from the LoRA
  checkpoint and from the base checkpoint plus `--adapter` — with the same replies; a resumed run is exact.
* BAGEL: a tiny BAGEL release → `convert bagel-to-kit` → `train bagel_7b/lora_chat` (bf16-mixed, bf16 base, gradient
  checkpointing, on CPU) → `adapter export` → `adapter merge` into a BAGEL release folder, whose model gives the
  unmerged adapter's logits and velocities.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatumm_kit.cli import main
from chatumm_kit.config import load_recipe
from chatumm_kit.convert.bagel import load_bagel
from chatumm_kit.data.packing import Packer
from chatumm_kit.data.shards import read_samples
from chatumm_kit.synth.pipeline import run_synth
from chatumm_kit.training.adapters import has_adapter, merge_adapter
from chatumm_kit.training.loading import load_checkpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "convert"))
from _tiny_bagel import make_tiny_bagel, view_sizing_overrides  # noqa: E402

QUIET = ["+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]


def _lora_tiny_overrides(trained_checkpoint: Path, out: Path, data: Path, steps: int = 2) -> list[str]:
    base_data = trained_checkpoint.parents[2] / "data"  # the conftest run's data: its tokenizer is the base's
    return [
        f"output_dir={out}",
        f"vars.base_checkpoint={trained_checkpoint}",
        f"vars.base_data_dir={base_data}",
        f"vars.data_dir={data}",
        "vars.train_dialogues=8",
        "vars.val_dialogues=4",
        "~system.model.vae_weights",  # the conftest model has the untrained autoencoder (weights come from init_from)
        "system.model.hidden_size=32",
        "system.model.num_layers=1",
        "system.model.intermediate_size=64",
        "+system.model.vit_hidden=32",
        "+system.model.vit_layers=1",
        "system.adapter.rank=2",
        "system.schedule.warmup_steps=1",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.callbacks.0.every_n_train_steps=2",
        "+trainer.callbacks.0.save_top_k=-1",
        "data.num_workers=0",
        "data.token_budget=1024",
        "~trainer.logger",
        *QUIET,
    ]


@pytest.fixture(scope="module")
def lora_run(trained_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_tiny")
    out = root / "run"
    assert main(["train", "shapes/lora_tiny", *_lora_tiny_overrides(trained_checkpoint, out, root / "data", 4)]) == 0
    return out, root


def test_lora_tiny_trains_only_the_adapter_on_the_frozen_chat_tiny_base(lora_run, trained_checkpoint):
    out, _ = lora_run
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    weights, hparams = state["state_dict"], state["hyper_parameters"]
    assert hparams["adapter"]["_component_"] == "chatumm_kit.training.adapters.LoraSpec"
    base = load_file(out / "base.safetensors")  # the chat_tiny checkpoint's EMA weights, exported by `prepare`
    for key in ("backbone.layers.0.self_attn.q_proj_moe_gen.weight", "backbone.layers.0.mlp.down_proj.weight"):
        adapted = "model." + key.replace(".weight", ".base_layer.weight")
        assert torch.equal(weights[adapted], base[key])  # frozen base unchanged after 4 steps
    assert torch.equal(weights["model.vit.connector.fc1.weight"], base["vit.connector.fc1.weight"])
    lora_b = [v for k, v in weights.items() if ".lora_B." in k or "lora_embedding_B" in k]
    assert len(lora_b) == 2 * 7 + 2 and all(v.abs().max() > 0 for v in lora_b)  # every zero-initialised B moved
    ema = next(s for s in state["callbacks"].values() if isinstance(s, dict) and "shadow" in s)["shadow"]
    assert ema and all(".lora_" in k for k in ema)  # EMA of the adapter weights only


def test_adapter_exports_alone_and_chat_runs_it_unmerged(lora_run, trained_checkpoint, tmp_path, capsys):
    out, _ = lora_run
    ckpt = out / "checkpoints" / "last.ckpt"
    adapter = tmp_path / "adapter"
    assert main(["adapter", "export", str(ckpt), str(adapter)]) == 0
    assert "EMA weights" in capsys.readouterr().out
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert all(k.startswith("base_model.model.") for k in load_file(adapter / "adapter_model.safetensors"))
    loaded = load_checkpoint(ckpt)
    assert has_adapter(loaded.model) and loaded.ema

    script = tmp_path / "dialogue.jsonl"
    script.write_text(json.dumps({"user": "What colour is the circle?", "respond": {"max_segments": 1}}) + "\n")
    replies = []
    for args in ([str(ckpt)], [str(trained_checkpoint), "--adapter", str(adapter)]):
        dest = tmp_path / f"chat{len(replies)}"
        code = main(["chat", *args, "--script", str(script), "--out", str(dest), "--steps", "1"])
        assert code == 0, capsys.readouterr().err
        replies.append((dest / "replies.jsonl").read_text())
    assert replies[0] == replies[1]  # the LoRA checkpoint = the base checkpoint + its exported adapter
    assert main(["adapter", "export", str(trained_checkpoint), str(tmp_path / "none")]) == 2
    assert "not trained with system.adapter" in capsys.readouterr().err


def test_resumed_lora_run_equals_the_uninterrupted_one(lora_run, trained_checkpoint, tmp_path):
    out, root = lora_run
    resumed = tmp_path / "resumed"
    overrides = _lora_tiny_overrides(trained_checkpoint, resumed, root / "data", 4)
    overrides.append(f"resume_from={out / 'checkpoints' / 'step=2.ckpt'}")
    if not (out / "checkpoints" / "step=2.ckpt").exists():
        (step2,) = [p for p in (out / "checkpoints").glob("*step=2*.ckpt")]
        overrides[-1] = f"resume_from={step2}"
    assert main(["train", "shapes/lora_tiny", *overrides]) == 0
    a = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a if ".lora_" in k) < 1e-6


# ---------------------------------------------------------------------------------------------------- BAGEL


@pytest.fixture(scope="module")
def bagel(tmp_path_factory):
    root = tmp_path_factory.mktemp("bagel_lora")
    make_tiny_bagel(root / "release")
    assert main(["convert", "bagel-to-kit", str(root / "release"), str(root / "kit"), "--attn-backend", "sdpa"]) == 0
    cfg = load_recipe("shapes/synth", [f"output_dir={root / 'data'}", "synth.num_dialogues=6", "synth.shard_size=6"])
    run_synth(cfg)
    shards = str(root / "data" / "index.json")
    overrides = [
        f"output_dir={root / 'run'}",
        f"vars.kit={root / 'kit'}",
        f"vars.train_shards={shards}",
        f"vars.val_shards={shards}",
        "system.model.attn_backend=sdpa",
        "system.adapter.rank=4",
        "system.schedule.warmup_steps=1",
        "system.optimizer.lr=2.0e-2",  # two steps that move the adapter well past bf16 rounding
        *view_sizing_overrides(),  # BAGEL's rule at the tiny release's size: ViT patch 4 (4 per side), 16-pixel views
        "data.token_budget=2048",
        "data.max_sample_tokens=2048",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "resume_from=null",
        *QUIET,
    ]
    assert main(["validate", "bagel_7b/lora_chat", *overrides]) == 0
    assert main(["train", "bagel_7b/lora_chat", *overrides]) == 0
    return root


def test_bagel_lora_chat_trains_exports_and_merges_into_a_bagel_release(bagel, capsys):
    ckpt = bagel / "run" / "checkpoints" / "last.ckpt"
    adapter, release = bagel / "adapter", bagel / "merged"
    assert main(["adapter", "export", str(ckpt), str(adapter), "--base", str(bagel / "kit")]) == 0
    assert main(["adapter", "merge", str(bagel / "kit"), str(adapter), str(release)]) == 0
    assert {"llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors"} <= {
        p.name for p in release.iterdir()
    }
    capsys.readouterr()

    unmerged = load_checkpoint(ckpt).model.float()  # the bf16 base, exactly as trained, compared in fp32
    merged = load_bagel(release, attn_backend="sdpa").model.float()
    tokenizer = load_bagel(release).tokenizer
    sample = next(iter(read_samples(bagel / "data" / "index.json")))
    packer = Packer(tokenizer=tokenizer, vit_patch_size=4, vae_token_stride=4, max_image_side=16,
                    drop_rates={"text": 0.0, "vit": 0.0, "vae": 0.0})  # fmt: skip
    batch = packer.pack([sample])
    flow = merged.draw_flow(batch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = unmerged.eval()(batch, flow=flow), merged.eval()(batch, flow=flow)
        base = load_bagel(bagel / "release", attn_backend="sdpa").model.eval()(batch, flow=flow)
    effect = (a.logits - base.logits).abs().max()
    assert effect > 5e-2  # the adapter changed the model
    # The base trains in bf16 (base_dtype), so merging rounds W + (α/r)·BA to bf16 once more; the merged release
    # stays well inside the adapter's own effect (the fp32 unit test holds merged == unmerged to 1e-5).
    assert (a.logits - b.logits).abs().max() < effect / 10
    assert (a.velocity - b.velocity).abs().max() < (a.velocity - base.velocity).abs().max() / 5
    assert not has_adapter(merge_adapter(unmerged))
