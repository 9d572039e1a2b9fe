"""load_checkpoint(device=, dtype=): the model is built on the meta device and every checkpoint tensor is cast as it is
read — no randomly initialised model, no kit-folder weights, no whole fp32 copy of a sharded checkpoint on the host."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from chatumm_kit.convert.bagel import load_bagel, save_kit_folder
from chatumm_kit.training import checkpoints, loading
from chatumm_kit.training.ema import EMA_KEY_PREFIX
from chatumm_kit.training.loading import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny_bagel import make_tiny_bagel  # noqa: E402

KIT = "chatumm_kit.convert.bagel.kit_folder"


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("kit")
    release = make_tiny_bagel(root / "release")
    loaded = load_bagel(release.folder)
    folder = save_kit_folder(loaded.model, loaded.model_spec, root / "kit", tokenizer=loaded.tokenizer)
    trained = {k: v.float() + 0.01 * torch.randn_like(v.float()) for k, v in loaded.model.state_dict().items()}
    return folder, trained  # "trained": fp32 master weights that differ from the kit folder's


def hparams(folder: Path) -> dict:
    return {"model": {"_component_": KIT, "path": str(folder), "attn_backend": "sdpa"}}


@pytest.fixture
def spies(monkeypatch):
    built = []
    architecture = loading.model_architecture

    def spy(spec):
        model = architecture(spec)
        built.append({p.device.type for p in model.parameters()})
        return model

    monkeypatch.setattr(loading, "model_architecture", spy)
    import chatumm_kit.convert.bagel as bagel

    def never(*a, **k):
        raise AssertionError("the kit folder's weights were read")

    monkeypatch.setattr(bagel, "load_kit_folder", never)
    return built


def test_file_checkpoint_loads_onto_the_device_in_the_target_dtype(kit, tmp_path, spies):
    folder, trained = kit
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in trained.items()}, "hyper_parameters": hparams(folder)}, ckpt)
    loaded = load_checkpoint(ckpt, dtype=torch.bfloat16, device="cpu")
    assert spies == [{"meta"}]  # built without weights; the kit folder's weight file was never opened
    state = loaded.model.state_dict()
    floats = {k for k, v in trained.items() if v.is_floating_point()}
    assert {state[k].dtype for k in floats} == {torch.bfloat16}
    assert all(torch.equal(state[k], trained[k].to(torch.bfloat16)) for k in floats)
    assert loaded.model.backbone.config.attn_backend == "sdpa"  # the spec's override still applies


def test_sharded_checkpoint_is_read_in_groups_and_only_the_ema(kit, tmp_path, spies, monkeypatch):
    folder, trained = kit
    ema = {k: v + 1.0 for k, v in trained.items() if v.is_floating_point()}
    state = {"model." + k: v for k, v in trained.items()}
    state |= {EMA_KEY_PREFIX + "model." + k: v for k, v in ema.items()}
    ckpt = tmp_path / "sharded"
    dcp.save({"state_dict": state}, checkpoint_id=ckpt, no_dist=True)
    torch.save({"hyper_parameters": hparams(folder)}, ckpt / "meta.pt")
    total = sum(v.numel() * v.element_size() for v in trained.values())
    group = total // 8
    monkeypatch.setattr(checkpoints, "DCP_READ_GROUP_BYTES", group)
    reads = []
    original = dcp.load

    def spy(target, **kwargs):
        reads.append(sum(t.numel() * t.element_size() for t in target.values()))
        return original(target, **kwargs)

    monkeypatch.setattr(dcp, "load", spy)
    loaded = load_checkpoint(ckpt, dtype=torch.bfloat16, use_ema=True)
    assert loaded.ema and spies == [{"meta"}]
    largest = max(v.numel() * v.element_size() for v in trained.values())
    assert len(reads) >= 8 and max(reads) < group + largest  # never the whole fp32 model at once
    assert sum(reads) == total  # each weight read once: its EMA value, not the raw one as well
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], ema[k].to(torch.bfloat16)) for k in ema)
