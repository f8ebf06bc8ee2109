"""HessianMonitor logging to Weights & Biases offline: no account and no network needed.

Trains a small tanh MLP on scikit-learn's handwritten digits for three epochs with a
:class:`lightning_hessian.HessianMonitor` that measures lambda_max, lambda_min and the Hutch++
trace on a fixed probe set every 20 optimizer steps, and logs them (at ``trainer.global_step``)
to an offline W&B run under ``runs/wandb/``. Upload it later with ``wandb sync``.

Run:  python examples/wandb_offline.py
"""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")  # before wandb is imported; set WANDB_MODE=online to upload
os.environ.setdefault("WANDB_SILENT", "true")

import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.loggers import WandbLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianMonitor
from lightning_hessian.instruments import Eigenvalues, Trace


def cross_entropy(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The probe loss, loss_fn(pl_module, batch): module-level so that it pickles and reloads."""
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


class DigitsMLP(pl.LightningModule):
    def __init__(self, lr: float = 0.2) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = cross_entropy(self, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main() -> None:
    pl.seed_everything(0, verbose=False)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train = DataLoader(TensorDataset(x[256:], y[256:]), batch_size=64, shuffle=True)
    probe = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=256)  # held out, fixed: comparable curves

    logger = WandbLogger(offline=True, project="lightning-hessian-demo", save_dir="runs")
    monitor = HessianMonitor(
        instruments=[Eigenvalues(lambda_min_every=1), Trace()],
        every_n_steps=20,
        every_n_epochs=None,
        budget=None,  # a toy model: see examples/quickstart.py
        probe_dataloader=probe,
        loss_fn=cross_entropy,
    )
    trainer = pl.Trainer(
        max_epochs=3,
        logger=logger,
        callbacks=[monitor],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsMLP(), train)

    for row in monitor.history:
        print(
            f"step {int(row['step']):3d}: lambda_max {row['lambda_max']:8.4f}  lambda_min {row['lambda_min']:8.4f}  "
            f"trace {row['trace']:8.3f} +- {row['trace_stderr']:.3f}"
        )
    run_dir = os.path.dirname(logger.experiment.dir)  # runs/wandb/offline-run-<time>-<id>
    wandb.finish()
    print(f"\nOffline W&B run: {run_dir}")
    print(f"Upload it with:  wandb sync {run_dir}")
    print("(or inspect it locally with:  wandb leet inspect --summary " + run_dir + ")")


if __name__ == "__main__":
    main()
