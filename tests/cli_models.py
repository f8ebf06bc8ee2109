"""Data modules (and a ``lightning.pytorch`` module) for the LightningCLI tests, importable by class path."""

from __future__ import annotations

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from lightning_models import train_loader


class CliDataModule(pl.LightningDataModule):
    """``lightning_models.train_loader`` as a ``pytorch_lightning`` datamodule."""

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        return train_loader(seed=self.seed, batch_size=self.batch_size)
