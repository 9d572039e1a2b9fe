"""Offline consolidation and export (checkpoint files and DCP folders built in-process) and strict loading."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _tiny_system import TinyNet
from safetensors.torch import load_file, save_file

from chatumm_kit.training.checkpoints import (
    StateDictMismatchError,
    export_safetensors,
    is_sharded_checkpoint,
    load_safetensors_into,
    read_weights,
)
from chatumm_kit.training.ema import EMA_CALLBACK_MARKER, EMA_KEY_PREFIX


def _model_state() -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in TinyNet().state_dict().items()}


def _ema_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v + 1.0 for k, v in state.items() if "norm" not in k}  # pretend norms were frozen (no EMA)


def _lightning_file(path, state, ema=None, **extra):
    ckpt = {"state_dict": state, "global_step": 3, "callbacks": {"Other": {"x": 1}}, **extra}
    if ema is not None:
        ckpt["callbacks"]["EMACallback"] = {"format": EMA_CALLBACK_MARKER, "num_updates": 2, "shadow": ema}
    torch.save(ckpt, path)
    return path


def _dcp_folder(path, state, ema):
    sd = {"state_dict": {**state, **{EMA_KEY_PREFIX + k: v for k, v in ema.items()}}}
    sd["optimizer_0"] = {"state": {k: {"exp_avg": torch.randn_like(v)} for k, v in state.items()}}
    dcp.save(sd, checkpoint_id=path, no_dist=True)
    torch.save({"global_step": 3}, path / "meta.pt")
    return path


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_read_and_export_a_checkpoint_file(tmp_path):
    state = _model_state()
    ema = _ema_of(state)
    ckpt = _lightning_file(tmp_path / "a.ckpt", state, ema)
    assert not is_sharded_checkpoint(ckpt)
    assert _equal(read_weights(ckpt), state)
    with_ema = read_weights(ckpt, use_ema=True)
    assert _equal(with_ema, {**state, **ema})  # EMA where averaged, the model's own weights elsewhere
    out = export_safetensors(ckpt, tmp_path / "rel" / "ema.safetensors", use_ema=True, prefix="model.")
    assert _equal(load_file(out), {k[len("model.") :]: v for k, v in with_ema.items()})


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_read_and_export_a_dcp_folder_without_a_process_group(tmp_path):
    state = _model_state()
    ema = _ema_of(state)
    folder = _dcp_folder(tmp_path / "step=3.ckpt", state, ema)
    assert is_sharded_checkpoint(folder)
    assert _equal(read_weights(folder), state)  # EMA and optimizer entries are not part of the model
    assert _equal(read_weights(folder, use_ema=True), {**state, **ema})
    out = export_safetensors(folder, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    exported = load_file(out)
    assert all(v.dtype == torch.bfloat16 for v in exported.values())
    assert _equal(exported, {k: v.to(torch.bfloat16) for k, v in state.items()})


def test_tied_tensors_export_and_missing_ema_is_an_error(tmp_path):
    state = _model_state()
    state["model.head.weight"] = state["model.embed.weight"]  # shared storage, as torch.load gives tied weights
    ckpt = _lightning_file(tmp_path / "t.ckpt", state)
    out = load_file(export_safetensors(ckpt, tmp_path / "t.safetensors"))
    assert torch.equal(out["model.head.weight"], out["model.embed.weight"])
    with pytest.raises(ValueError, match="holds no EMA weights"):
        read_weights(ckpt, use_ema=True)
    with pytest.raises(ValueError, match="no key starts with prefix 'net.'"):
        read_weights(ckpt, prefix="net.")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a DCP checkpoint folder"):
        read_weights(tmp_path / "nope")


class _Custom:  # a pickled object that weights_only loading refuses
    pass


def test_weights_only_refusal_names_the_file_and_never_advises_unpickling(tmp_path):
    ckpt = _lightning_file(tmp_path / "p.ckpt", _model_state(), hyper_parameters={"cfg": _Custom()})
    with pytest.raises(ValueError, match="safe loading") as e:
        read_weights(ckpt)
    assert str(ckpt) in str(e.value) and "weights_only=False" not in str(e.value)
    assert read_weights(ckpt, weights_only=False).keys() == _model_state().keys()


def test_load_safetensors_into_is_strict(tmp_path):
    net = TinyNet()
    good = {f"model.{k}": v.clone() + 1 for k, v in TinyNet().state_dict().items()}
    save_file(good, tmp_path / "good.safetensors")
    load_safetensors_into(net, tmp_path / "good.safetensors", prefix="model.")
    assert _equal({f"model.{k}": v for k, v in net.state_dict().items()}, good)

    bad = {k: v for k, v in good.items() if k != "model.norm.weight"}
    bad["model.extra.weight"] = torch.zeros(2)
    bad["model.head.weight"] = torch.zeros(3, 8)
    save_file(bad, tmp_path / "bad.safetensors")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(StateDictMismatchError) as err:
        load_safetensors_into(net, tmp_path / "bad.safetensors", prefix="model.")
    assert err.value.missing == ["norm.weight"] and err.value.unexpected == ["extra.weight"]
    assert err.value.mismatched == ["head.weight: file (3, 8) vs module (17, 8)"]
    assert "missing keys: 1 ['norm.weight']" in str(err.value)
    assert _equal(net.state_dict(), before)  # nothing was loaded
    with pytest.raises(StateDictMismatchError) as err:
        load_safetensors_into(net, tmp_path / "good.safetensors")  # forgot the prefix
    assert "model.embed.weight" in err.value.unexpected and "embed.weight" in err.value.missing
