"""``lightning.pytorch`` twins of ``lightning_models.TanhModule`` and ``cli_models.CliDataModule``.

A separate module so that importing it (and failing without the ``lightning`` package) is the
unified tests' business alone.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_models import train_loader


class UnifiedTanhModule(L.LightningModule):
    """The network and optimizer of ``lightning_models.TanhModule`` on ``lightning.pytorch``."""

    def __init__(self, lr: float = 0.1, hidden: int = 12) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(10, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 3)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class UnifiedDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        return train_loader(seed=self.seed, batch_size=self.batch_size)
