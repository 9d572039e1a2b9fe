"""One rank of the 2-process LoRA runs started by ``test_lora_parity.py``: one optimizer step under DDP, then one
under FSDP2 (``ModelParallelStrategy``), each from the same initial weights and adapter.

Usage: ``python _lora_parity_worker.py RUN_DIR`` with torchrun-style environment variables. ``RUN_DIR`` holds
``system.pt`` (``ChatUMMSystem`` keyword arguments, adapter included, ``init_from`` a shared file) and ``batches.pt``
(one ``PackedBatch`` per rank). Writes ``RUN_DIR/<strategy>_rank<r>.pt``: the adapter weights at the start, the
gradients the optimizer sees (after the all-reduce / reduce-scatter, gathered to full tensors) and the weights
after the step. The adapter's random initialisation draws from ``torch.manual_seed(0)`` right before the model is
built, as the test's single process does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from chatumm_kit.systems.unified import ChatUMMSystem
from chatumm_kit.training.strategies import ddp, fsdp2


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {n: full(p) for n, p in pl_module.model.named_parameters() if p.requires_grad}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: full(p.grad) for n, p in pl_module.model.named_parameters() if p.grad is not None}


class SeededSystem(ChatUMMSystem):
    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(0)  # the adapter's random init: the same draw on every rank and in the test
        super().configure_model()


def run(name: str, strategy, run_dir: Path, rank: int) -> None:
    batch = torch.load(run_dir / "batches.pt", weights_only=False)[rank]
    system = SeededSystem(**torch.load(run_dir / "system.pt", weights_only=False))
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=1,
        use_distributed_sampler=False,
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
        "start": recorder.start,
        "grads": recorder.grads,
        "weights": {n: full(p) for n, p in system.model.named_parameters() if p.requires_grad},
        "trainable": sorted(n for n, p in system.model.named_parameters() if p.requires_grad),
        "sharded": any(isinstance(p, DTensor) for p in system.model.parameters()),
    }
    torch.save(result, run_dir / f"{name}_rank{rank}.pt")


def main() -> None:
    run_dir = Path(sys.argv[1])
    rank = int(os.environ["LOCAL_RANK"])
    run("ddp", ddp(), run_dir, rank)
    run("fsdp2", fsdp2(mixed_precision=None, activation_checkpointing=False), run_dir, rank)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
