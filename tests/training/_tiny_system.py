"""A tiny LightningModule for the training-infrastructure tests (not collected: no ``test_`` prefix).

``TinyNet`` has what the infrastructure must handle: an embedding table, a learned ``pos_embed`` parameter, a
``layers`` ModuleList (FSDP units) whose blocks hold a LayerNorm, biased Linears, and a final chatumm ``RMSNorm``.
Odd sizes (vocab 17) make FSDP2 shards uneven. ``TinySystem`` builds the net in an idempotent ``configure_model``
and trains next-token prediction on fixed random tokens with AdamW + warm-up/cosine. With
``shard_in_configure_model`` it calls ``trainer.strategy.shard_model(self.model)`` itself, as ChatUMM's system does.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from chatumm_kit.components.layers import RMSNorm
from chatumm_kit.training.optim import OptimizerSpec
from chatumm_kit.training.schedules import CosineSchedule


class Block(nn.Module):
    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyNet(nn.Module):
    def __init__(self, *, vocab: int = 17, dim: int = 8, depth: int = 2, seq: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(seq, dim))
        self.layers = nn.ModuleList(Block(dim=dim) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos_embed[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


class TinySystem(L.LightningModule):
    def __init__(
        self,
        *,
        vocab: int = 17,
        dim: int = 8,
        depth: int = 2,
        seq: int = 5,
        num_samples: int = 24,
        batch_size: int = 4,
        lr: float = 0.05,
        weight_decay: float = 0.1,
        warmup_steps: int = 2,
        total_steps: int = 6,
        shard_in_configure_model: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: TinyNet | None = None

    def configure_model(self) -> None:
        if self.model is None:
            h = self.hparams
            self.model = TinyNet(vocab=h.vocab, dim=h.dim, depth=h.depth, seq=h.seq)
            shard = getattr(self.trainer.strategy, "shard_model", None) if self._trainer is not None else None
            if h.shard_in_configure_model and shard is not None:  # the system shards itself (else the strategy does)
                shard(self.model)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self.model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        h = self.hparams
        opt = OptimizerSpec(lr=h.lr, weight_decay=h.weight_decay, betas=(0.9, 0.95)).build(self)
        sched = CosineSchedule(warmup_steps=h.warmup_steps, total_steps=h.total_steps, min_ratio=0.1)
        return {"optimizer": opt, "lr_scheduler": sched.lightning_config(opt)}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1234)
        tokens = torch.randint(0, self.hparams.vocab, (self.hparams.num_samples, self.hparams.seq), generator=g)
        ds = torch.utils.data.TensorDataset(tokens)
        return torch.utils.data.DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=False)
