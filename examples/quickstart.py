"""Quickstart: watch the Hessian while a small classifier trains, in TensorBoard.

Trains an MLP with BatchNorm and dropout on scikit-learn's handwritten digits (shipped with
scikit-learn, no download) with ``HessianMonitor``. Every 25 optimizer steps it measures the
largest and the most negative Hessian eigenvalue and the Hessian trace on a fixed probe set of
held-out digits; every 4 epochs it takes a loss-landscape snapshot (a random plane and the plane
of the two extreme eigenvectors, validation loss on the same planes), and at the end it writes
the animation of all snapshots. About 20 seconds on a 2-core CPU.

Run:   python examples/quickstart.py [--epochs 20] [--logdir runs]
Then:  tensorboard --logdir runs   (CUSTOM SCALARS: the Hessian charts; IMAGES: the landscapes)
"""

from __future__ import annotations

import argparse
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianMonitor
from lightning_hessian.instruments import Eigenvalues, Landscape, Trace


class DigitsClassifier(pl.LightningModule):
    """64 -> 128 -> 64 -> 10 MLP with BatchNorm and dropout, trained with SGD and momentum."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/accuracy", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def digits_loaders(seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train, validation and probe loaders; the probe set is 256 fixed held-out digits."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:1400], perm[1400:]
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=32, shuffle=True, generator=gen)
    val_loader = DataLoader(TensorDataset(x[val], y[val]), batch_size=128)
    probe_loader = DataLoader(TensorDataset(x[val[:256]], y[val[:256]]), batch_size=128)
    return train_loader, val_loader, probe_loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--logdir", default="runs")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a tiny model: 1 is as fast, and immune to busy cores)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pl.seed_everything(0, verbose=False)
    train_loader, val_loader, probe_loader = digits_loaders()
    monitor = HessianMonitor(
        instruments=[
            Eigenvalues(lambda_min_every=1),  # lambda_max and lambda_min every time
            Trace(),  # Hutch++ trace with its standard error, deflating the Lanczos run of the same step
            Landscape(every_n_epochs=4, val_dataloader=val_loader),  # random and Hessian planes
        ],
        every_n_steps=25,
        probe_dataloader=probe_loader,
        # A toy model: a training step takes about a millisecond, so the default 5 % budget would allow
        # only a few measurements. On a real model keep the default (budget=0.05) and let it choose.
        budget=None,
    )
    logger = TensorBoardLogger(args.logdir, name="quickstart")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[monitor],
        logger=logger,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsClassifier(), train_loader, val_loader)

    print(f"\n{len(monitor.history)} Hessian measurements; the last ones:")
    print(f"{'step':>6} {'lambda_max':>11} {'lambda_min':>11} {'neg.ratio':>9} {'trace':>9} {'HVPs':>5} {'sec':>6}")
    for h in [h for h in monitor.history if "trace" in h][-5:]:
        print(
            f"{int(h['step']):>6} {h['lambda_max']:>11.4f} {h['lambda_min']:>11.4f} {h['negative_ratio']:>9.4f} "
            f"{h['trace']:>9.2f} {int(h['hvp_count']):>5} {h['seconds']:>6.3f}"
        )
    snap = monitor.last_snapshot
    if snap is not None:
        s = snap.scalars
        print(
            f"\nLandscape at step {snap.step}: the Hessian plane shows a saddle: {bool(s['hessian_shows_saddle'])}, "
            f"the random plane: {bool(s['random_shows_saddle'])}; lowest loss on the Hessian plane "
            f"{s['hessian_min_loss']:.4f}, on the random plane {s['random_min_loss']:.4f} "
            f"(centre {s['center_loss']:.4f})"
        )
    print(f"\nTensorBoard logs, measurements (hessian/*.jsonl) and landscapes (landscape/) are in {logger.log_dir}")
    print(f"Open them with:  tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
