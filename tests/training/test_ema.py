"""EMA math on a toy update sequence, the swap context, strict loading, and the callback on one CPU device."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from _tiny_system import TinySystem
from torch import nn

from chatumm_kit.training.ema import EMA_CALLBACK_MARKER, EMACallback, EMAWeights, state_key_of


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        self.frozen = nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)
        self.register_buffer("count", torch.zeros(1))


def test_ema_math_exact_on_a_toy_sequence():
    toy = Toy()
    ema = EMAWeights(module=toy, decay=0.9)
    assert list(ema.shadow) == ["w"]  # frozen parameters and buffers are not averaged
    values = [[3.0, 0.0], [5.0, 1.0], [-1.0, 4.0]]
    expected = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for v in values:
        with torch.no_grad():
            toy.w.copy_(torch.tensor(v, dtype=torch.float64))
        ema.update(toy)
        expected = 0.9 * expected + 0.1 * torch.tensor(v, dtype=torch.float64)
    # closed form: 0.9³·w0 + 0.1·(0.9²·v1 + 0.9·v2 + v3)
    closed = 0.729 * torch.tensor([1.0, -2.0]) + 0.1 * (0.81 * torch.tensor(values[0]) + 0.9 * torch.tensor(values[1]))
    closed = closed.double() + 0.1 * torch.tensor(values[2], dtype=torch.float64)
    assert torch.allclose(ema.shadow["w"], expected, atol=1e-14, rtol=0)
    assert torch.allclose(ema.shadow["w"], closed, atol=1e-6, rtol=0)
    assert ema.num_updates == 3
    ema.update(toy, decay=0.0)  # decay 0: the average jumps to the weights
    assert torch.equal(ema.shadow["w"], toy.w.detach())
    ema.update(toy, decay=1.0)
    assert torch.equal(ema.shadow["w"], toy.w.detach())


def test_shadow_is_a_copy_and_copy_from_resets_it():
    toy = Toy()
    ema = EMAWeights(module=toy, decay=0.5)
    with torch.no_grad():
        toy.w.add_(10.0)
    assert ema.shadow["w"].tolist() == [1.0, -2.0]
    ema.copy_from(toy)
    assert ema.shadow["w"].tolist() == [11.0, 8.0] and ema.num_updates == 0


def test_swapped_loads_ema_and_restores_even_on_error():
    toy = Toy()
    ema = EMAWeights(module=toy, decay=0.5)
    with torch.no_grad():
        toy.w.copy_(torch.tensor([3.0, 2.0], dtype=torch.float64))
    ema.update(toy)  # shadow = [2, 0]
    w_obj = toy.w
    with ema.swapped(toy) as m:
        assert m is toy and toy.w.tolist() == [2.0, 0.0]
        assert toy.w is w_obj  # in-place: optimizer / FSDP references stay valid
    assert toy.w.tolist() == [3.0, 2.0]
    with pytest.raises(RuntimeError, match="boom"), ema.swapped(toy):
        raise RuntimeError("boom")
    assert toy.w.tolist() == [3.0, 2.0] and ema.shadow["w"].tolist() == [2.0, 0.0]


def test_load_state_dict_is_strict():
    ema = EMAWeights(module=nn.Linear(2, 3), decay=0.9)
    good = {"weight": torch.full((3, 2), 7.0), "bias": torch.zeros(3)}
    ema.load_state_dict(good)
    assert torch.equal(ema.shadow["weight"], good["weight"])
    with pytest.raises(KeyError, match=r"missing keys \['bias'\], unexpected keys \['extra'\]"):
        ema.load_state_dict({"weight": good["weight"], "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"weight: shape \(2, 3\) != \(3, 2\)"):
        ema.load_state_dict({"weight": torch.zeros(2, 3), "bias": torch.zeros(3)})
    with pytest.raises(KeyError, match="changed since the EMA was created"):
        ema.update(nn.Linear(2, 4, bias=False))
    with pytest.raises(ValueError, match="decay"):
        EMAWeights(module=nn.Linear(1, 1), decay=1.5)


def test_state_key_of_drops_wrapper_fragments():
    assert state_key_of("model._orig_mod.layers.0._checkpoint_wrapped_module.fc1.weight") == "model.layers.0.fc1.weight"


def _trainer(tmp_path, callbacks, max_steps, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


class _Weights(L.Callback):
    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        if len(self.steps) < trainer.global_step:
            self.steps.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def test_callback_follows_optimizer_steps_with_accumulation(tmp_path):
    L.seed_everything(0)
    ema_cb, rec = EMACallback(decay=0.75, update_every=1, start_step=2), _Weights()
    trainer = _trainer(tmp_path, [ema_cb, rec], max_steps=5, accumulate_grad_batches=2, enable_checkpointing=False)
    trainer.fit(TinySystem(num_samples=40))
    assert trainer.global_step == 5 and len(rec.steps) == 5
    assert ema_cb.ema.num_updates == 3  # steps 3, 4, 5 (not one per batch: 10 batches ran)
    ref = dict(rec.steps[1])  # tracks the weights up to start_step = 2
    for w in rec.steps[2:]:
        ref = {k: 0.75 * ref[k] + 0.25 * w[k] for k in ref}
    for k, v in ema_cb.ema.shadow.items():
        assert torch.allclose(v, ref[k], atol=1e-6), k


def test_callback_checkpoint_file_round_trip_resumes_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, ckpt_path=None, seed=0):
        L.seed_everything(seed)
        ema_cb = EMACallback(decay=0.5, update_every=2)
        ckpt = ModelCheckpoint(dirpath=tmp_path / f"ck{seed}", filename="{step}", every_n_train_steps=3, save_top_k=-1)
        trainer = _trainer(tmp_path, [ema_cb, ckpt], max_steps=max_steps)
        system = TinySystem(num_samples=12)  # 3 batches: the step-3 checkpoint closes epoch 0 (exact resume point)
        trainer.fit(system, ckpt_path=ckpt_path)
        return system, ema_cb

    full, ema_full = run(6)
    state = torch.load(tmp_path / "ck0" / "step=3.ckpt", weights_only=True)["callbacks"]["EMACallback"]
    assert state["format"] == EMA_CALLBACK_MARKER and state["num_updates"] == 1 and "shadow" in state
    resumed, ema_resumed = run(6, ckpt_path=tmp_path / "ck0" / "step=3.ckpt", seed=1)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    assert ema_resumed.ema.num_updates == ema_full.ema.num_updates == 3
    for k, v in ema_full.ema.shadow.items():
        assert torch.allclose(v, ema_resumed.ema.shadow[k], atol=1e-6), k
        assert not torch.allclose(v, dict(full.named_parameters())[k], atol=1e-4), k  # EMA differs from weights
