"""Böttcher & Wheeler's function-approximation study: Hessian planes vs random planes during training.

The setup of the paper's Appendix D: f(x) = log(sin(10 x) + 2) + sin(x) on [-1, 1], 50 training
points drawn uniformly, 1,000 test points, fully connected ReLU nets 1 -> 100 -> (2 or 10 layers of
100 -> 100) -> 1 (20,501 and 101,301 parameters), MSE loss, plain SGD with learning rate 0.1.
Both nets train with ``HessianMonitor`` taking landscape snapshots on a random (filter-normalised)
plane and on the plane of the lambda_max / lambda_min eigenvectors, with the test set evaluated on
the same planes. At the end it compares, for each net, the lowest training and test loss found on
the Hessian plane with the lowest on the random plane, next to the paper's numbers, and writes the
animated GIF of the landscapes (log colour scale, as the README figure).

The default is the fast run: both nets train the full 3,000 steps, but the Hessian and the
landscape are measured only at steps 1000, 2000 and 3000 (the last snapshot, the one the table
reports, is taken at the same weights). ``--full`` measures every 300 steps, 10 frames per net, as the README run.

Run:   python examples/function_approximation.py [--full] [--logdir runs] [--figure out.png]
Then:  tensorboard --logdir runs       (IMAGES: landscape/planes, landscape/animation)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianMonitor
from lightning_hessian.instruments import Eigenvalues, Landscape, Trace
from lightning_hessian.render import figure_to_rgb, snapshot_figure

PAPER = {2: {"train": 0.09, "test": 0.01}, 10: {"train": 0.26, "test": 0.06}}  # fraction lower on the Hessian plane


def target(x: Tensor) -> Tensor:
    return torch.log(torch.sin(10 * x) + 2) + torch.sin(x)


class ReluNet(pl.LightningModule):
    """1 -> 100 -> ``depth`` x (100 -> 100) -> 1 with ReLU, MSE, SGD(lr=0.1)."""

    def __init__(self, depth: int, lr: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(1, 100), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Linear(100, 100), nn.ReLU()]
        layers.append(nn.Linear(100, 1))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def hessian_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.hessian_loss(batch)
        self.log("train/mse", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    gen = torch.Generator().manual_seed(seed)
    x_train = torch.rand(50, 1, generator=gen) * 2 - 1
    x_test = torch.rand(1000, 1, generator=gen) * 2 - 1
    return TensorDataset(x_train, target(x_train)), TensorDataset(x_test, target(x_test))


def run(depth: int, steps: int, frames: int, logdir: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    train, test = data()
    train_loader = DataLoader(train, batch_size=50)  # full batch, as in the paper
    every = max(steps // frames, 1)
    monitor = HessianMonitor(
        instruments=[
            Eigenvalues(lambda_min=True, lambda_min_every=1, max_hvp=300),
            Trace(),
            Landscape(
                resolution=21,
                val_dataloader=DataLoader(test, batch_size=1000),
                log_scale=True,  # the losses span decades: the README figure's scale
                every_n_steps=every,
            ),
        ],
        every_n_steps=every,
        every_n_epochs=None,
        at_fit_start=False,  # the frames are at steps every, 2 every, ..., steps
        at_fit_end=False,
        budget=None,  # measure at exactly those steps, whatever they cost
        probe_dataloader=DataLoader(train, batch_size=50),
    )
    model = ReluNet(depth)
    n_params = sum(p.numel() for p in model.parameters())
    logger = TensorBoardLogger(logdir, name=f"function_approximation_{depth}_layers")
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        callbacks=[monitor],
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=50,
    )
    trainer.fit(model, train_loader)
    snap = monitor.last_snapshot
    assert snap is not None
    s = snap.scalars
    out = {
        "depth": depth,
        "params": n_params,
        "step": snap.step,
        "center_train": s["center_loss"],
        "random_train": s["random_min_loss"],
        "hessian_train": s["hessian_min_loss"],
        "random_test": s["random_val_min_loss"],
        "hessian_test": s["hessian_val_min_loss"],
        "lambda_max": snap.planes["hessian"].eigenvalues[0],  # type: ignore[index]
        "lambda_min": snap.planes["hessian"].eigenvalues[1],  # type: ignore[index]
        "hessian_shows_saddle": s["hessian_shows_saddle"],
        "random_shows_saddle": s["random_shows_saddle"],
        "log_dir": logger.log_dir,
        "snapshot": snap,
    }
    return out


def save_figure(snapshot: Any, path: Path) -> None:
    """The last frame on its own (its own extents and log colour scale), as the README figure."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(figure_to_rgb(snapshot_figure(snapshot, log_scale=True))).save(path)
    print(f"figure: {path}")


def lower(a: float, b: float) -> float:
    """How much lower ``a`` is than ``b``, as a fraction of ``b``."""
    return (b - a) / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="10 frames per net (every 300 steps) instead of 3")
    parser.add_argument("--steps", type=int, default=3000, help="SGD steps per net (default 3000, as the paper)")
    parser.add_argument("--frames", type=int, default=None, help="snapshots per net (default 3, or 10 with --full)")
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--figure", type=Path, default=None, help="save the first net's last frame here (PNG)")
    args = parser.parse_args()
    frames = args.frames or (10 if args.full else 3)
    # Nets of 100 units gain nothing from more threads; on a shared machine torch's default
    # threads spin-wait for each other and made this run 7-20 times slower (measured on 2 busy cores).
    torch.set_num_threads(1)
    results = [run(depth, args.steps, frames, args.logdir) for depth in args.depths]
    print(f"\nLowest losses on each plane at the last snapshot (after {args.steps} SGD steps):")
    print(
        f"{'net':>10} {'params':>8} {'centre':>9} {'random':>9} {'Hessian':>9} {'lower':>7} {'paper':>6}"
        f" | {'test rnd':>9} {'test Hes':>9} {'lower':>7} {'paper':>6} | saddle shown (random, Hessian)"
    )
    for r in results:
        depth = int(r["depth"])
        paper = PAPER.get(depth, {"train": float("nan"), "test": float("nan")})
        print(
            f"{depth:>3} layers {int(r['params']):>8} {r['center_train']:>9.3e} {r['random_train']:>9.3e} "
            f"{r['hessian_train']:>9.3e} {lower(r['hessian_train'], r['random_train']):>7.1%} {paper['train']:>6.0%}"
            f" | {r['random_test']:>9.3e} {r['hessian_test']:>9.3e} "
            f"{lower(r['hessian_test'], r['random_test']):>7.1%} {paper['test']:>6.0%} | "
            f"{bool(r['random_shows_saddle'])}, {bool(r['hessian_shows_saddle'])}   "
            f"(lambda_max {r['lambda_max']:.3g}, lambda_min {r['lambda_min']:.3g})"
        )
    for r in results:
        directory = Path(str(r["log_dir"])) / "landscape" / "hessian"
        print(
            f"{int(r['depth'])} layers: frames and animation in {directory} "
            f"(re-render: python -m lightning_hessian render {directory} --log-scale)"
        )
    if args.figure is not None:
        save_figure(results[0]["snapshot"], args.figure)


if __name__ == "__main__":
    main()
