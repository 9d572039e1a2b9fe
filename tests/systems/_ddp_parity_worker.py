"""One rank of the 2-process DDP parity run, started by ``test_ddp_parity.py`` (one process per rank).

Usage: ``python _ddp_parity_worker.py RUN_DIR`` with ``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` set, so Lightning
joins the given process group instead of launching processes itself. ``RUN_DIR`` holds what the test wrote:

* ``system.pt``: the keyword arguments of :class:`~chatumm_kit.systems.unified.ChatUMMSystem` (its ``init_from``
  names ``init.safetensors``, so every rank and the test's single process start from the same weights);
* ``batches.pt``: one :class:`~chatumm_kit.components.batch.PackedBatch` per rank (each rank trains on its own; no
  distributed sampler).

One optimizer step of the real system under :func:`chatumm_kit.training.strategies.ddp`, then ``RUN_DIR/rank<r>.pt``
with the gradients after DDP's all-reduce (as the optimizer sees them), the weights after the step, the rank's
forward outputs (loss sums, token counts, the flow-matching noise it drew) and the logged metrics.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch

from chatumm_kit.systems.unified import ChatUMMSystem
from chatumm_kit.training.strategies import ddp


class Recorder(L.Callback):
    """Every forward output of the inner model, and the gradients right before the optimizer step."""

    def __init__(self) -> None:
        self.forwards: list[dict] = []
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.model.register_forward_hook(self._record)

    def _record(self, module, args, out) -> None:
        self.forwards.append(
            {
                "ce_sum": out.ce_sum.detach().clone(),
                "mse_sum": out.mse_sum.detach().clone(),
                "ce_count": out.ce_count,
                "mse_count": out.mse_count,
                "timesteps": out.flow.timesteps.detach().clone(),
                "noise": out.flow.noise.detach().clone(),
            }
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Called after the backward's DDP all-reduce: these are the averaged gradients the optimizer applies.
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}


def main() -> None:
    run_dir = Path(sys.argv[1])
    rank = int(os.environ["LOCAL_RANK"])
    batch = torch.load(run_dir / "batches.pt", weights_only=False)[rank]
    system = ChatUMMSystem(**torch.load(run_dir / "system.pt", weights_only=False))
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ddp(),
        max_steps=1,
        use_distributed_sampler=False,  # each rank trains on its own batch
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    trainer.fit(system, train_dataloaders=loader)
    result = {
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "forwards": recorder.forwards,
        "grads": recorder.grads,
        "weights": {n: p.detach().clone() for n, p in system.model.named_parameters()},
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    torch.save(result, run_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # interpreter teardown after a Lightning run is slow here; everything is written and flushed
