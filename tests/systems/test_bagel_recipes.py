"""Both BAGEL recipes train for real on a converted tiny BAGEL release: FSDP2 and DDP, 1 and 2 CPU processes.

The release folder is the layout ``tests/_tiny_bagel.py`` writes, stored in **bf16** like BAGEL's own
``ema.safetensors``, converted with ``chatumm convert bagel-to-kit``; the shards are small synthesised dialogues.
Every run is the shipped recipe (``chatumm train bagel_7b/...``) with CPU-size overrides: the real
``ChatUMMSystem``, validation, EMA, checkpoints, TensorBoard logging (``train/grad_norm`` included).

Parity, read from each run's TensorBoard scalars:

* FSDP2 (``sft_chat_fsdp``, sharded DTensor parameters and gradients) and DDP (the same recipe with the ``ddp``
  strategy) on 2 processes see the same per-rank data and noise, so every logged loss and the global gradient norm
  agree step by step;
* a run resumed from FSDP2's sharded step-2 folder continues exactly;
* 2 processes against 1: with ``data.rank=0 data.world_size=1`` both ranks read the 1-process run's batches, and with
  ``mse_weight=0`` and ``sample_posterior=false`` the loss does not depend on the rank-seeded noise (flow noise,
  posterior draws), so the 2-process run's CE equals the 1-process run's at every step (both recipes).

Views are sized by BAGEL's rule scaled to the tiny release (``view_sizing_overrides``); every other run keeps the
recipes' posterior sampling on.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from _multiprocess import run_ranks
from _tiny_bagel import make_tiny_bagel, view_sizing_overrides
from chatumm_kit.cli import main as chatumm
from chatumm_kit.training.prepare import dialogue_texts

WORKER = Path(__file__).with_name("_cli_worker.py")
FSDP, DDP = "bagel_7b/sft_chat_fsdp", "bagel_7b/sft_chat_freeze_und_ddp"
STEPS = 3


def cpu_overrides(setup: SimpleNamespace, out: Path) -> list[str]:
    """The tiny-run overrides every recipe run here takes (paths, CPU, sizes of the tiny release, short run)."""
    return [
        f"output_dir={out}",
        f"vars.kit={setup.kit}",
        f"vars.train_shards={setup.train}",
        f"vars.val_shards={setup.val}",
        "trainer.accelerator=cpu",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.callbacks.0.every_n_train_steps=2",
        "trainer.callbacks.1.decay=0.5",
        "system.schedule.warmup_steps=1",  # the recipes' 200 would not fit in 3 steps
        "system.model.attn_backend=sdpa",
        "data.num_workers=0",
        *view_sizing_overrides(side=8),  # BAGEL's rule at the tiny release's size (32-pixel views)
        "data.token_budget=1024",
        "data.max_sample_tokens=1024",
        "data.pad_to_multiple=1",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
    ]


STRATEGY = {  # on CPU: FSDP2 computes in fp32 (bf16 needs CUDA); DDP keeps the recipe's bf16-mixed autocast
    FSDP: ["trainer.strategy.mixed_precision=null"],
    DDP: [],
}
AS_DDP = ["trainer.strategy._component_=chatumm_kit.training.strategies.ddp", "~trainer.strategy.mixed_precision",
          "~trainer.strategy.activation_checkpointing"]  # fmt: skip
# Same batches on every rank, no loss term that depends on the rank-seeded noise: the flow noise (MSE off) and the
# posterior draws of the clean latents that text turns attend to (sampling off; the other runs keep it on).
SAME_DATA_NO_MSE = [
    "+data.rank=0",
    "+data.world_size=1",
    "system.mse_weight=0.0",
    "system.model.sample_posterior=false",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("bagel_recipes")
    for split, n, size, seed in (("train", 8, 4, 0), ("val", 4, 2, 5)):
        argv = [
            f"output_dir={root / split}",
            f"synth.num_dialogues={n}",
            f"synth.shard_size={size}",
            f"synth.seed={seed}",
        ]
        assert chatumm(["synth", "shapes/synth", *argv]) == 0
    texts = list(dialogue_texts(str(root / "train" / "index.json")))
    release = make_tiny_bagel(root / "release", dtype=torch.bfloat16, texts=texts, side=8).folder
    assert chatumm(["convert", "bagel-to-kit", str(release), str(root / "kit"), "--attn-backend", "sdpa"]) == 0
    return SimpleNamespace(
        root=root,
        release=release,
        kit=root / "kit",
        train=root / "train" / "index.json",
        val=root / "val" / "index.json",
    )


def _argv(setup, recipe: str, name: str, *extra: str) -> list[str]:
    out = setup.root / "runs" / name
    return ["train", recipe, *cpu_overrides(setup, out), *STRATEGY[recipe], *extra]


@pytest.fixture(scope="module")
def runs(setup) -> dict[str, Path]:
    """Every run, in two launches: the 1-process runs, then the 2-process runs (one pair of processes)."""
    one = {
        "fsdp_1": _argv(setup, FSDP, "fsdp_1", "trainer.devices=1", *SAME_DATA_NO_MSE),
        "ddp_1": _argv(setup, DDP, "ddp_1", "trainer.devices=1", *SAME_DATA_NO_MSE),
    }
    resume_from = setup.root / "runs" / "fsdp_2" / "checkpoints" / "epoch=0-step=2.ckpt"
    two = {
        "fsdp_2": _argv(setup, FSDP, "fsdp_2", "trainer.devices=2"),
        "fsdp_as_ddp_2": _argv(setup, FSDP, "fsdp_as_ddp_2", "trainer.devices=2", *AS_DDP),
        "fsdp_resumed_2": _argv(setup, FSDP, "fsdp_resumed_2", "trainer.devices=2", f"resume_from={resume_from}"),
        "fsdp_same_2": _argv(setup, FSDP, "fsdp_same_2", "trainer.devices=2", *SAME_DATA_NO_MSE),
        "ddp_same_2": _argv(setup, DDP, "ddp_same_2", "trainer.devices=2", *SAME_DATA_NO_MSE),
    }
    for world, group in ((1, one), (2, two)):
        spec = setup.root / f"runs_{world}.json"
        spec.write_text(json.dumps(list(group.values())))
        run_ranks(WORKER, str(spec), world=world, timeout=600, env={"OMP_NUM_THREADS": "1"})
    return {name: setup.root / "runs" / name for name in (*one, *two)}


def scalars(run: Path) -> dict[str, dict[int, float]]:
    """``tag -> {step: value}`` of a run's TensorBoard events (rank 0's)."""
    (events,) = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _close(a: dict[int, float], b: dict[int, float], *, rel: float) -> None:
    assert a.keys() == b.keys() and a
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=rel), (step, a, b)


def test_fsdp2_and_ddp_on_two_processes_log_the_same_losses_and_grad_norms(runs):
    fsdp, ddp = scalars(runs["fsdp_2"]), scalars(runs["fsdp_as_ddp_2"])
    assert len(fsdp["train/ce"]) == STEPS  # every step logged, incl. the global grad norm of sharded gradients
    for tag in ("train/ce", "train/mse", "train/grad_norm", "val/ce", "val/mse"):
        _close(fsdp[tag], ddp[tag], rel=1e-4)
    assert all(v > 0 for v in fsdp["train/grad_norm"].values())
    # FSDP2 wrote sharded checkpoint folders, DDP single files; both hold EMA weights
    from chatumm_kit.training.checkpoints import is_sharded_checkpoint
    from chatumm_kit.training.loading import checkpoint_has_ema

    assert is_sharded_checkpoint(runs["fsdp_2"] / "checkpoints" / "last.ckpt")
    assert (runs["fsdp_as_ddp_2"] / "checkpoints" / "last.ckpt").is_file()
    assert checkpoint_has_ema(runs["fsdp_2"] / "checkpoints" / "last.ckpt")


def test_fsdp2_resumed_from_a_sharded_folder_continues_exactly(runs):
    full, resumed = scalars(runs["fsdp_2"]), scalars(runs["fsdp_resumed_2"])
    last = STEPS - 1
    assert set(resumed["train/ce"]) == {last}  # only the step after the restored one ran
    for tag in ("train/ce", "train/mse", "train/grad_norm"):
        assert resumed[tag][last] == pytest.approx(full[tag][last], rel=1e-5)


@pytest.mark.parametrize(("one", "two"), [("fsdp_1", "fsdp_same_2"), ("ddp_1", "ddp_same_2")])
def test_two_processes_match_one_process(runs, one, two):
    a, b = scalars(runs[one]), scalars(runs[two])
    _close(a["train/ce"], b["train/ce"], rel=1e-5)
    _close(a["val/ce"], b["val/ce"], rel=1e-5)
    _close(a["train/grad_norm"], b["train/grad_norm"], rel=1e-4)
    assert len(set(a["train/ce"].values())) == STEPS  # three different batches (resampled), not one repeated


@pytest.mark.parametrize("recipe", [FSDP, DDP, "bagel_7b/lora_chat"])
def test_bagel_recipes_size_views_like_bagel_and_sample_the_posterior(setup, recipe):
    """Every BAGEL recipe names the ``ViewSizing.bagel`` preset (VAE 512–1024 / 16, ViT 224–980 / 14: a 1920×1080
    photo gets (576, 1024) and (546, 980)) and trains a converted model on posterior samples (SPEC §4.1)."""
    from omegaconf import OmegaConf

    from chatumm_kit.components.tokenizer import ChatTokenizer
    from chatumm_kit.config import instantiate, load_recipe
    from chatumm_kit.data.view_sizing import ViewSizing, view_sizing_of_data

    cfg = load_recipe(recipe)
    assert cfg.data.view_sizing._component_ == "chatumm_kit.data.view_sizing.ViewSizing.bagel"
    assert "max_image_side" not in cfg.data and "vit_patch_size" not in cfg.data
    sizing = instantiate(cfg.data.view_sizing)
    assert sizing == view_sizing_of_data(OmegaConf.to_container(cfg.data)) == ViewSizing.bagel()
    assert tuple(sizing.sizes(1080, 1920)) == ((546, 980), (576, 1024))
    assert cfg.system.model.sample_posterior is True and cfg.system.model.timestep_shift == 1.0

    tiny = load_recipe(recipe, [*cpu_overrides(setup, setup.root / "unused"), "system.model.timestep_shift=3.0"])
    model = instantiate(tiny.system.model).train()  # the converted tiny release, with the recipe's flow settings
    assert model.sample_posterior
    batch = _one_batch(ChatTokenizer.from_file(setup.kit))
    flow = model.draw_flow(batch, generator=torch.Generator().manual_seed(0))
    assert flow.posterior_noise is not None and len(flow.posterior_noise) == len(batch.vae_images) == 2
    # the recipe's timestep shift reaches the training timesteps: t = s·u / (1 + (s − 1)·u), u = sigmoid(N(0, 1))
    u = torch.sigmoid(torch.randn(1, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(flow.timesteps, 3.0 * u / (1 + 2.0 * u)) and not torch.allclose(flow.timesteps, u)
    # a posterior sample differs from the mean the model used before (and uses in evaluation)
    sampled = model.vae_clean_tokens(batch, flow=flow)
    mean = model.vae_clean_tokens(batch)
    assert sampled.shape == mean.shape and not torch.allclose(sampled, mean)


def test_trainable_parameters_are_fp32_master_weights_from_a_bf16_release(setup):
    from chatumm_kit.config import instantiate, load_recipe

    with safe_open(str(setup.kit / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("backbone.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16  # as converted
    for recipe in (FSDP, DDP):
        cfg = load_recipe(recipe, cpu_overrides(setup, setup.root / "unused"))
        system = instantiate(cfg.system)
        system.configure_model()
        trainable = {n: p.dtype for n, p in system.model.named_parameters() if p.requires_grad}
        assert trainable and set(trainable.values()) == {torch.float32}, recipe
    # ... and bf16 compute: FSDP2's policy casts parameters to bf16, DDP's trainer autocasts
    assert load_recipe(FSDP).trainer.strategy.mixed_precision == "bf16"
    assert load_recipe(FSDP).trainer.precision == "32-true"
    assert load_recipe(DDP).trainer.precision == "bf16-mixed"


def test_freeze_recipe_still_learns_text_replies_and_intents(setup):
    """``sft_chat_freeze_und_ddp`` freezes the understanding expert, yet CE on a text-only turn falls (through the
    trainable embed_tokens/lm_head) while the frozen expert's weights stay exactly as loaded."""
    from chatumm_kit.components.tokenizer import ChatTokenizer
    from chatumm_kit.config import instantiate, load_recipe
    from chatumm_kit.data.dialogue import Dialogue, DialogueSample, Role, TextSegment, Turn
    from chatumm_kit.data.packing import Packer

    cfg = load_recipe(
        DDP,
        [*cpu_overrides(setup, setup.root / "unused"), "system.optimizer.lr=3.0e-3", "system.schedule.warmup_steps=0"],
    )
    system = instantiate(cfg.system)
    system.configure_model()
    model = system.model
    assert system.freeze.understanding and not system.freeze.embeddings
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert "layers.0.mlp.up_proj.weight" in frozen and "norm.weight" in frozen and "lm_head.weight" not in frozen
    dialogue = Dialogue(
        id="text_only",
        turns=[
            Turn(role=Role.USER, segments=[TextSegment(text="what colour is the circle")]),
            Turn(role=Role.ASSISTANT, segments=[TextSegment(text="it is red")]),
        ],
    )
    packer = Packer(
        tokenizer=ChatTokenizer.from_file(setup.kit), vit_patch_size=4, vae_token_stride=4, max_image_side=16
    )
    batch = packer.pack([DialogueSample(dialogue=dialogue, images={}, key="text_only")])
    assert batch.mse_indices.numel() == 0 and batch.ce_indices.numel() > 3  # text and intent targets only
    optimizer = system.configure_optimizers()["optimizer"]
    ces = []
    for _ in range(8):
        optimizer.zero_grad()
        out = model(batch)
        ces.append(float(out.ce_loss))
        out.ce_loss.backward()
        optimizer.step()
    assert ces[-1] < 0.75 * ces[0] and all(b < a for a, b in zip(ces, ces[1:])), ces
    after = dict(model.backbone.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in frozen.items())
    # The recipe as it was (shared embeddings frozen with the expert): no trainable path reaches a text turn's CE.
    cfg = load_recipe(DDP, [*cpu_overrides(setup, setup.root / "unused"), "system.freeze.embeddings=true"])
    old = instantiate(cfg.system)
    old.configure_model()
    assert not old.model(batch).ce_loss.requires_grad


def _one_batch(tokenizer):
    from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, TextSegment, Turn
    from chatumm_kit.data.packing import Packer

    g = torch.Generator().manual_seed(0)
    dialogue = Dialogue(
        id="d0",
        turns=[
            Turn(role=Role.USER, segments=[TextSegment(text="make it blue"), ImageSegment(image="a")]),
            Turn(role=Role.ASSISTANT, segments=[TextSegment(text="a blue square"), ImageSegment(image="b")]),
        ],
    )
    images = {k: torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g) for k in "ab"}
    packer = Packer(tokenizer=tokenizer, vit_patch_size=4, vae_token_stride=4, max_image_side=16)
    return packer.pack([DialogueSample(dialogue=dialogue, images=images, key="d0")])


@pytest.mark.parametrize(("run", "ema"), [("fsdp_2", True), ("ddp_same_2", False)])
def test_checkpoint_opens_with_no_arguments_and_exports_to_a_bagel_release(runs, tmp_path, run, ema):
    """``load_checkpoint`` finds the tokenizer in the kit folder; ``chatumm convert kit-to-bagel CKPT OUT [--ema]``
    (a sharded FSDP2 folder, a DDP file) writes a release that ``load_bagel`` reads back to the same logits."""
    from chatumm_kit.convert.bagel import load_bagel
    from chatumm_kit.model import FlowInputs
    from chatumm_kit.training.loading import load_checkpoint

    ckpt = runs[run] / "checkpoints" / "last.ckpt"
    loaded = load_checkpoint(ckpt, use_ema=ema)
    assert loaded.ema is ema and loaded.tokenizer.encode("a blue square")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}  # the trained fp32 weights, kept
    argv = ["convert", "kit-to-bagel", str(ckpt), str(tmp_path / "release"), *(["--ema"] if ema else [])]
    assert chatumm(argv) == 0
    back = load_bagel(tmp_path / "release", attn_backend="sdpa")
    batch = _one_batch(back.tokenizer)
    n = int(batch.mse_token_mask.sum())
    flow = FlowInputs(timesteps=torch.full((1,), 0.5), noise=torch.randn(n, 16, generator=torch.Generator()))
    with torch.no_grad():
        a, b = loaded.model(batch, flow=flow), back.model(batch, flow=flow)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.velocity, b.velocity)
    # the release holds the trained weights, not the converted ones it started from
    start = load_bagel(runs[run].parent.parent / "release", attn_backend="sdpa").model
    with torch.no_grad():
        assert not torch.allclose(start(batch, flow=flow).logits.float(), a.logits, atol=1e-4)
