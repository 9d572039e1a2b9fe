"""DDP and FSDP2 with 2 CPU processes (gloo): identical ranks, FSDP2 = DDP, exact resume, EMA, export.

One pair of worker processes (``_dist_worker.py``, started here with torchrun-style environment variables so the
test process never initialises a process group) runs DDP, an uninterrupted FSDP2 run A with sharded checkpoints at
steps 3 and 6, an FSDP2 run B from another init resumed from A's step-3 folder, and FSDP2 runs C/D writing full
single-file checkpoints (D resumes from C's step-3 file). The tests then compare.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny_system import TinyNet
from safetensors.torch import load_file

from _multiprocess import run_ranks
from chatumm_kit.training.checkpoints import export_safetensors, is_sharded_checkpoint, load_safetensors_into
from chatumm_kit.training.ema import EMA_KEY_PREFIX

WORKER = Path(__file__).with_name("_dist_worker.py")
DECAY, UPDATE_EVERY, START_STEP = 0.5, 2, 1  # as in _dist_worker.EMA
TOL = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run_ranks(WORKER, str(out), timeout=240)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return out, ranks


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _reference_ema(history: list[dict[str, torch.Tensor]], upto: int) -> dict[str, torch.Tensor]:
    """EMACallback's rule replayed on full weights after steps 1..upto (plain float64 tensors)."""
    ema: dict[str, torch.Tensor] = {}
    for step in range(1, upto + 1):
        w = {k: v.double() for k, v in history[step - 1].items()}
        if step <= START_STEP:
            ema = dict(w)
        elif (step - START_STEP) % UPDATE_EVERY == 0:
            ema = {k: DECAY * ema[k] + (1 - DECAY) * w[k] for k in ema}
    return ema


def test_ddp_ranks_end_identical_and_trained(runs):
    _, (r0, r1) = runs
    a, b = r0["ddp"], r1["ddp"]
    assert _max_diff(a["weights"], b["weights"]) == 0.0
    assert _max_diff(a["ema"], b["ema"]) == 0.0
    assert a["global_step"] == 6 and a["ema_updates"] == 2  # updates after steps 3 and 5
    assert _max_diff(a["start"], a["history"][-1]) > 1e-2  # it trained
    assert _max_diff(a["ema"], {k: a["weights"][k] for k in a["ema"]}) > 1e-3  # the EMA is not the weights


def test_fsdp2_shards_every_layer_and_matches_ddp(runs):
    _, (r0, r1) = runs
    a0, a1 = r0["A"], r1["A"]
    assert a0["mesh_shape"] == (2, 1)  # data parallel over both ranks, no tensor parallelism
    assert a0["sharded_units"] == {"model": ["layers.0", "layers.1", ""]}
    assert all(a0["param_is_dtensor"].values())
    assert a0["layer_hooks"] == ["checkpoint", "fully_shard"]  # activation checkpointing on each layer
    # EMA shadows are shards: the two ranks' local pieces add up to each full parameter, split unevenly (17 rows).
    for k, full in a0["ema"].items():
        assert a0["ema_local_numel"][k] + a1["ema_local_numel"][k] == full.numel()
    assert (a0["ema_local_numel"]["model.embed.weight"], a1["ema_local_numel"]["model.embed.weight"]) == (72, 64)
    # FSDP2 (reduce-scatter, sharded AdamW, recomputed activations) trains exactly like DDP.
    assert _max_diff(a0["weights"], r0["ddp"]["weights"]) < TOL
    assert _max_diff(a0["ema"], r0["ddp"]["ema"]) < TOL


def test_ema_equals_reference_rule_under_ddp_and_fsdp2(runs):
    _, (r0, _) = runs
    for run in (r0["ddp"], r0["A"]):
        ref = _reference_ema(run["history"], upto=6)
        assert _max_diff(run["ema"], ref) < TOL


def test_fsdp2_resume_from_sharded_folder_is_exact(runs):
    _, (r0, _) = runs
    a, b = r0["A"], r0["B"]
    assert b["sharded_by_system"] and not a["sharded_by_system"]  # B: configure_model called strategy.shard_model
    assert b["sharded_units"] == a["sharded_units"] and b["layer_hooks"] == a["layer_hooks"]
    assert _max_diff(b["start"], a["history"][2]) == 0.0  # weights restored from the step-3 folder
    assert b["global_step"] == 6 and len(b["history"]) == 3  # the step count was restored
    assert b["lrs"] == pytest.approx(a["lrs"][3:], abs=1e-12)  # the LR schedule continued
    assert _max_diff(b["weights"], a["weights"]) < TOL  # optimizer moments restored too
    assert _max_diff(b["ema"], a["ema"]) < TOL and b["ema_updates"] == a["ema_updates"] == 2


def test_fsdp2_with_full_file_checkpoints_resumes_exactly(runs, tmp_path):
    out, (r0, _) = runs
    a, c, d = r0["A"], r0["C"], r0["D"]
    assert _max_diff(c["weights"], a["weights"]) < TOL and _max_diff(c["ema"], a["ema"]) < TOL
    assert (out / "ckC" / "step=3.ckpt").is_file()  # one file, gathered on rank 0, EMA gathered into callback state
    assert _max_diff(d["start"], a["history"][2]) == 0.0  # full weights re-sharded onto FSDP2
    assert _max_diff(d["weights"], a["weights"]) < TOL
    assert _max_diff(d["ema"], a["ema"]) < TOL and d["ema_updates"] == 2  # full EMA re-sharded on load
    ema = load_file(export_safetensors(out / "ckE" / "step=6.ckpt", tmp_path / "e.safetensors", use_ema=True))
    assert _max_diff(ema, a["ema"]) < TOL


def test_sharded_checkpoint_is_a_folder_of_shards_without_gathered_ema(runs):
    out, _ = runs
    ckpt = out / "ckA" / "step=3.ckpt"
    assert ckpt.is_dir() and is_sharded_checkpoint(ckpt)
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    state = meta["callbacks"]["EMACallback"]
    assert state["shadow_in"] == "state_dict" and "shadow" not in state and state["num_updates"] == 1
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert f"state_dict.{EMA_KEY_PREFIX}model.layers.0.fc1.weight" in keys


def test_export_safetensors_equals_full_state_of_uninterrupted_run(runs, tmp_path):
    out, (r0, _) = runs
    a = r0["A"]
    for folder in ("ckA", "ckB"):  # the uninterrupted and the resumed run's last folder
        weights = load_file(export_safetensors(out / folder / "step=6.ckpt", tmp_path / f"{folder}.safetensors"))
        assert weights.keys() == a["weights"].keys()
        assert _max_diff(weights, a["weights"]) < TOL
        ema = load_file(export_safetensors(out / folder / "step=6.ckpt", tmp_path / f"{folder}_ema.st", use_ema=True))
        assert _max_diff(ema, a["ema"]) < TOL
    # The step-3 folder's EMA is the rule applied to steps 1..3; with a prefix, keys fit the inner model.
    ema3 = load_file(export_safetensors(out / "ckA" / "step=3.ckpt", tmp_path / "e3.st", use_ema=True, prefix="model."))
    ref3 = _reference_ema(a["history"], upto=3)
    assert _max_diff({f"model.{k}": v for k, v in ema3.items()}, ref3) < TOL


def test_export_from_ddp_checkpoint_file_and_load_into_model(runs, tmp_path):
    out, (r0, _) = runs
    d = r0["ddp"]
    ckpt = out / "ckD" / "step=6.ckpt"
    assert ckpt.is_file() and not is_sharded_checkpoint(ckpt)
    f = export_safetensors(ckpt, tmp_path / "ema.safetensors", use_ema=True, prefix="model.")
    net = TinyNet()
    load_safetensors_into(net, f)
    assert _max_diff({f"model.{k}": v for k, v in net.state_dict().items()}, d["ema"]) < TOL
