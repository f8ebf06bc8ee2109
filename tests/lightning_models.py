"""Lightning modules, data and losses for callback tests, at module level so that ddp_spawn can pickle them."""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n: int = 192, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorDataset(x, y)


def train_loader(seed: int = 0, batch_size: int = 32, n: int = 192) -> DataLoader:
    return DataLoader(
        make_data(n, seed), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def probe_loader(n: int = 128, batch_size: int = 32) -> DataLoader:
    return DataLoader(make_data(n, seed=99), batch_size=batch_size, shuffle=False)


def probe_loss(module: nn.Module, batch: Any) -> Tensor:
    """A user loss_fn: cross-entropy of the module's network on a probe batch."""
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


class BNDropoutModule(pl.LightningModule):
    """A small classifier with BatchNorm and Dropout: everything a careless probe would disturb."""

    def __init__(self, lr: float = 0.1, hidden: int = 16) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(10, hidden), nn.BatchNorm1d(hidden), nn.Tanh(), nn.Dropout(0.2), nn.Linear(hidden, 3)
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


class TanhModule(BNDropoutModule):
    """No BatchNorm or Dropout: eval and train mode give the same operator (simplest dense checks)."""

    def __init__(self, lr: float = 0.1, hidden: int = 12) -> None:
        super().__init__(lr=lr, hidden=hidden)
        self.net = nn.Sequential(
            nn.Linear(10, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 3)
        )


class HessianLossModule(TanhModule):
    """Defines hessian_loss: the callback uses it instead of training_step."""

    def hessian_loss(self, batch: Any) -> Tensor:
        return probe_loss(self, batch)


class ManualOptimModule(TanhModule):
    """Manual optimization with two optimizers: global_step advances by 2 per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_a, opt_b = self.optimizers()  # type: ignore[misc]
        for opt in (opt_a, opt_b):
            loss = probe_loss(self, batch)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        first = list(self.net[0].parameters()) + list(self.net[2].parameters())
        return [torch.optim.SGD(first, lr=0.05), torch.optim.SGD(self.net[4].parameters(), lr=0.05)]


def dense_hessian_at(module: nn.Module, loader: Any) -> Tensor:
    """The dense float64 Hessian of the sample-weighted cross-entropy probe loss (eval mode), in the
    order of ``module.named_parameters()``: the independent ground truth of the callback tests."""
    model = copy.deepcopy(module).double().eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    batches = [(x.double(), y) for x, y in loader]
    total = sum(len(b[1]) for b in batches)

    def f(flat: Tensor) -> Tensor:
        values = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        out = sum(
            len(y) * nn.functional.cross_entropy(torch.func.functional_call(model, values, (x,)), y) for x, y in batches
        )
        return out / total

    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    return torch.func.hessian(f)(theta)


def dense_spectrum_at(module: nn.Module, loader: Any) -> tuple[float, float]:
    """(lambda_max, lambda_min) of :func:`dense_hessian_at`."""
    ev = torch.linalg.eigvalsh(dense_hessian_at(module, loader))
    return float(ev[-1]), float(ev[0])


def trainer_kwargs(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    """Fast, deterministic CPU trainer settings."""
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        log_every_n_steps=1,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


def plain_probe_loss(module, batch):  # type: ignore[no-untyped-def]
    """A loss_fn as users write it in a hurry: no annotations (LightningCLI must accept it)."""
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)
