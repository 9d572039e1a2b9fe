"""One rank of a 2-process CPU training run, started by ``test_distributed.py`` (one process per rank).

Usage: ``python _dist_worker.py OUT_DIR`` with ``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` set (Lightning then
does not launch processes itself). Five runs in the same two processes, then ``OUT_DIR/rank<r>.pt``:

* ``ddp``: DDP, 6 steps with EMA, checkpoint files after steps 3 and 6 in ``OUT_DIR/ckD``.
* ``A``: FSDP2, 6 steps, sharded checkpoint folders after steps 3 (end of epoch 0) and 6 in ``OUT_DIR/ckA``.
* ``B``: FSDP2 from a different init, resumed from A's step-3 folder, trained to step 6 (folders in ``ckB``); its
  system shards itself in ``configure_model`` (A's is sharded by the strategy).
* ``C``: as A but with full single-file checkpoints (``save_distributed_checkpoint=False``) in ``ckC``.
* ``D``: as B but resumed from C's step-3 file (files in ``ckE``).

Each entry holds the final full weights and EMA (gathered here, for the test only), the per-step weight history,
learning rates and layout facts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from _tiny_system import TinySystem
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed._composable import _get_registry
from torch.distributed.tensor import DTensor

from chatumm_kit.training.ema import EMACallback
from chatumm_kit.training.strategies import ddp, fsdp2

EMA = {"decay": 0.5, "update_every": 2, "start_step": 1}
MAX_STEPS = 6


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


class Recorder(L.Callback):
    """Full trainable weights after every optimizer step (collective under FSDP2) and the learning rates."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []
        self._last = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {n: full(p) for n, p in pl_module.named_parameters()}  # after any checkpoint restore

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self._last:
            return
        self._last = trainer.global_step
        self.history.append({n: full(p) for n, p in pl_module.named_parameters()})
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def trainer(strategy, callbacks, ckpt_dir: Path | None) -> L.Trainer:
    if ckpt_dir is not None:
        # Step-based saving: with Lightning 2.6.6 a resume from an every_n_epochs (on_train_epoch_end) checkpoint
        # replays one extra batch in the finished epoch, so it would not match the uninterrupted run.
        callbacks = [
            *callbacks,
            ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=3, save_top_k=-1),
        ]
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=MAX_STEPS,
        gradient_clip_val=0.5,  # active (grad norms are ~1): global-norm clipping must agree across DDP and FSDP2
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def run(
    mode: str,
    out: Path,
    *,
    seed: int,
    ckpt_dir: Path | None = None,
    resume: Path | None = None,
    sharded_checkpoints: bool = True,
):
    L.seed_everything(0)  # also seeds the DistributedSampler's shuffle (PL_GLOBAL_SEED): same data order in A and B
    torch.manual_seed(seed)  # the model init (configure_model runs inside fit)
    system, ema, rec = TinySystem(shard_in_configure_model=resume is not None), EMACallback(**EMA), Recorder()
    strategy = (
        ddp()
        if mode == "ddp"
        else fsdp2(mixed_precision=None, activation_checkpointing=True, save_distributed_checkpoint=sharded_checkpoints)
    )
    tr = trainer(strategy, [ema, rec], ckpt_dir)
    tr.fit(system, ckpt_path=str(resume) if resume else None)
    weights = {k: full(v) for k, v in system.state_dict().items()}
    result = {
        "weights": weights,
        "ema": {k: full(v) for k, v in ema.ema.shadow.items()},
        "ema_updates": ema.ema.num_updates,
        "start": rec.start,
        "history": rec.history,
        "lrs": rec.lrs,
        "global_step": tr.global_step,
        "param_is_dtensor": {n: isinstance(p, DTensor) for n, p in system.named_parameters()},
        "ema_local_numel": {
            k: (v.to_local() if isinstance(v, DTensor) else v).numel() for k, v in ema.ema.shadow.items()
        },
        "sharded_units": getattr(strategy, "sharded_units", {}),
        "mesh_shape": tuple(strategy.device_mesh.shape) if mode == "fsdp2" else None,
        "layer_hooks": sorted(_get_registry(system.model.layers[0]) or {}),
        "sharded_by_system": bool(system.hparams.shard_in_configure_model),
    }
    return result


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["LOCAL_RANK"])
    # Both strategies in one pair of processes: importing Lightning is most of the cost of a run.
    result = {"ddp": run("ddp", out, seed=0, ckpt_dir=out / "ckD")}
    result["A"] = run("fsdp2", out, seed=0, ckpt_dir=out / "ckA")
    result["B"] = run("fsdp2", out, seed=1, ckpt_dir=out / "ckB", resume=out / "ckA" / "step=3.ckpt")
    # C: FSDP2 writing full single-file checkpoints (gathered on rank 0); D resumes from C's step-3 file.
    result["C"] = run("fsdp2", out, seed=0, ckpt_dir=out / "ckC", sharded_checkpoints=False)
    resume = out / "ckC" / "step=3.ckpt"
    result["D"] = run("fsdp2", out, seed=2, ckpt_dir=out / "ckE", resume=resume, sharded_checkpoints=False)
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # interpreter teardown after a Lightning run takes ~10 s here; everything is written and flushed
