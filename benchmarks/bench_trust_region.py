"""Adaptive-norm trust regions against the sphere and against Adam and SGD, on scikit-learn's digits.

The hypothesis is the paper's (Kohler, Adolphs & Lucchi): ellipsoidal trust regions (``rms``, ``adagrad``)
beat the spherical one (``uniform``) in backpropagations and final loss, and match first-order methods in
backpropagations but not in wall time. Two problems on the 1,797 digits (8x8, scaled to [0, 1]): a tanh MLP
classifier 64-64-10 (cross-entropy) and an autoencoder 64-32-8-32-64 (sigmoid hidden layers but the code,
pixelwise binary cross-entropy). Trust regions run with the paper's defaults and batch 512, their initial
radius picked from a grid (the paper's 1e-4, 5e-3 for the sphere, and larger) on the first seed; Adam and SGD
with batch 32 (the paper's choice for them) and the best learning rate of a small grid, also on the first seed;
Adam also with batch 512 (``adam-512``), the trust regions' batch, to separate the method from the batch size.

Cost axis: backprop-equivalents (gradient 1, HVP 2, forward-only loss 0.5; see ``BACKPROP_COST``) times the
batch size over the data set size, i.e. epochs' worth of backprops, so that batch 32 and batch 512 compare.
The training loss is measured on the whole data set at regular points (not counted). Prints a table and writes
``docs/images/trust_region.png``. Runs in a few minutes on two CPU cores::

    python benchmarks/bench_trust_region.py            # 3 seeds, 100 epochs' worth of backprops
    python benchmarks/bench_trust_region.py --quick    # 1 seed, 30: a smoke test
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lightning_hessian.optim import BACKPROP_COST, TrustRegion

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Problem:
    name: str
    make_model: Callable[[], nn.Module]
    loss: Callable[[nn.Module, Tensor], Tensor]  # loss of the model on the rows with these indices


def problems() -> list[Problem]:
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    x = torch.tensor(x_np / 16.0, dtype=torch.float32)
    y = torch.tensor(y_np)

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))

    def autoencoder() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 8), nn.Linear(8, 32), nn.Sigmoid(), nn.Linear(32, 64)
        )

    return [
        Problem("mlp", mlp, lambda m, idx: nn.functional.cross_entropy(m(x[idx]), y[idx])),
        Problem(
            "autoencoder", autoencoder, lambda m, idx: nn.functional.binary_cross_entropy_with_logits(m(x[idx]), x[idx])
        ),
    ]


N_SAMPLES = 1797


@dataclass
class Curve:
    cost: list[float] = field(default_factory=list)  # epochs' worth of backprop-equivalents
    seconds: list[float] = field(default_factory=list)  # optimizer wall time (loss checkpoints excluded)
    loss: list[float] = field(default_factory=list)  # full-data training loss
    accepted: int = 0
    steps: int = 0
    cg_iterations: int = 0


def run(problem: Problem, method: str, seed: int, budget: float, hyper: float, points: int = 60) -> Curve:
    """Train one model with one method until ``budget`` epochs' worth of backprop-equivalents are spent.

    ``hyper`` is the initial radius of a trust region, the learning rate of Adam or SGD."""
    torch.manual_seed(seed)
    model = problem.make_model()
    everything = torch.arange(N_SAMPLES)
    batch = 512 if method.startswith("tr-") or method.endswith("-512") else 32
    gen = torch.Generator().manual_seed(1000 + seed)
    if method.startswith("tr-"):
        opt: torch.optim.Optimizer = TrustRegion(model.parameters(), method[3:], radius=hyper, seed=seed)
    elif method.startswith("adam"):
        opt = torch.optim.Adam(model.parameters(), lr=hyper)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=hyper)
    curve = Curve()
    spent, seconds, next_point = 0.0, 0.0, 0.0

    def checkpoint() -> None:
        with torch.no_grad():
            curve.loss.append(float(problem.loss(model, everything)))
        curve.cost.append(spent)
        curve.seconds.append(seconds)

    order = torch.randperm(N_SAMPLES, generator=gen)
    position = 0
    while spent < budget:
        if spent >= next_point:
            checkpoint()
            next_point += budget / points
        if position + batch > N_SAMPLES:
            order, position = torch.randperm(N_SAMPLES, generator=gen), 0
        idx = order[position : position + batch]
        position += batch

        def closure(idx: Tensor = idx) -> Tensor:
            opt.zero_grad()
            loss = problem.loss(model, idx)
            loss.backward()
            return loss

        start = time.perf_counter()
        opt.step(closure)
        seconds += time.perf_counter() - start
        if isinstance(opt, TrustRegion):
            stats = opt.last_stats
            assert stats is not None
            spent += stats.backprops * batch / N_SAMPLES
            curve.accepted += stats.accepted
            curve.cg_iterations += stats.cg_iterations
        else:
            spent += BACKPROP_COST["gradient"] * batch / N_SAMPLES
        curve.steps += 1
    checkpoint()
    return curve


def loss_at(curve: Curve, cost: float) -> float:
    """The training loss at the last checkpoint not past ``cost``."""
    i = int(np.searchsorted(np.asarray(curve.cost), cost, side="right")) - 1
    return curve.loss[max(i, 0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, a small budget: a smoke test")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=100.0, help="epochs' worth of backprop-equivalents")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "images" / "trust_region.png")
    args = parser.parse_args()
    seeds = 1 if args.quick else args.seeds
    budget = 30.0 if args.quick else args.budget
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()}  (torch threads: {torch.get_num_threads()})")
    # The first value of each grid is the default: the paper's initial radius (DEFAULT_RADIUS), Adam's 1e-3.
    # The trust regions' initial radius is tuned like the first-order learning rates, on the first seed.
    grids = {
        "tr-rms": [1e-4, 1e-2, 1e-1],
        "tr-adagrad": [1e-4, 1e-2, 1e-1],
        "tr-uniform": [5e-3, 0.5, 5.0],
        "adam": [1e-3, 3e-3, 1e-2],
        "adam-512": [1e-3, 3e-3, 1e-2],
        "sgd": [0.1, 0.3, 1.0],
    }
    results: dict[tuple[str, str], list[Curve]] = {}
    chosen: dict[tuple[str, str], float] = {}
    at_default: dict[tuple[str, str], float] = {}
    wall = time.perf_counter()
    for problem in problems():
        for method, grid in grids.items():
            trials = {g: run(problem, method, 0, budget, g) for g in grid}
            best = min(trials, key=lambda g: trials[g].loss[-1] if math.isfinite(trials[g].loss[-1]) else math.inf)
            curves = [trials[best]] + [run(problem, method, s, budget, best) for s in range(1, seeds)]
            results[(problem.name, method)] = curves
            chosen[(problem.name, method)] = best
            at_default[(problem.name, method)] = trials[grid[0]].loss[-1]
            print(f"  done {problem.name:<12} {method:<11} ({time.perf_counter() - wall:.0f} s)", flush=True)

    header = (
        f"| problem | method (tuned) | loss at {budget / 4:g} | loss at {budget:g} (mean ± sd) | "
        "at default, seed 0 | optimizer s | steps | accepted | CG iters/step |"
    )
    print()
    print(header)
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (name, method), curves in results.items():
        quarter = np.array([loss_at(c, budget / 4) for c in curves])
        final = np.array([c.loss[-1] for c in curves])
        secs = np.mean([c.seconds[-1] for c in curves])
        steps = np.mean([c.steps for c in curves])
        knob = "radius" if method.startswith("tr-") else "lr"
        label = f"{method} ({knob} {chosen[(name, method)]:g})"
        if method.startswith("tr-"):
            acc = f"{100 * np.mean([c.accepted / c.steps for c in curves]):.0f} %"
            cg = f"{np.mean([c.cg_iterations / c.steps for c in curves]):.1f}"
        else:
            acc, cg = "", ""
        print(
            f"| {name} | {label} | {quarter.mean():.4f} | {final.mean():.4f} ± {final.std():.4f} | "
            f"{at_default[(name, method)]:.4f} | {secs:.1f} | {steps:.0f} | {acc} | {cg} |"
        )
    total = time.perf_counter() - wall
    print(f"\n{seeds} seed(s), budget {budget:g} epochs' worth of backprop-equivalents, total {total:.0f} s")
    print(f"load average at end: {os.getloadavg()}")
    plot(results, chosen, args.figure)
    print(f"figure: {args.figure}")


def plot(results: dict[tuple[str, str], list[Curve]], chosen: dict[tuple[str, str], float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({n for n, _ in results}, key=lambda n: ["mlp", "autoencoder"].index(n))
    colors = {"tr-rms": "C0", "tr-adagrad": "C2", "tr-uniform": "C3", "adam": "C1", "adam-512": "C5", "sgd": "C7"}
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 4.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for col, (attr, xlabel) in enumerate(
            [("cost", "backprop-equivalents (epochs' worth)"), ("seconds", "optimizer wall time (s, 1 thread)")]
        ):
            ax = axes[row][col]
            for (n, method), curves in results.items():
                if n != name:
                    continue
                grid = np.linspace(0, min(getattr(c, attr)[-1] for c in curves), 120)
                ys = np.array([np.interp(grid, getattr(c, attr), c.loss) for c in curves])
                knob = "radius" if method.startswith("tr-") else "lr"
                label = f"{method} ({knob} {chosen[(n, method)]:g})"
                ax.plot(grid, np.exp(np.log(ys).mean(0)), color=colors[method], label=label, lw=1.8)
                ax.fill_between(grid, ys.min(0), ys.max(0), color=colors[method], alpha=0.15, lw=0)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("training loss (all 1,797 digits)")
            ax.set_title(f"{name}: loss vs {'backprops' if col == 0 else 'wall time'}")
            ax.grid(alpha=0.3, which="both")
            if col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(
        "Trust regions (batch 512, paper defaults, tuned initial radius) vs Adam and SGD (batch 32, Adam also 512;"
        " tuned lr) on digits\nline: geometric mean over seeds, band: min-max"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
