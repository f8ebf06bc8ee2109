"""Edge of stability: gradient descent holds lambda_max at 2/lr, Adam the preconditioned lambda_max at 38/lr.

A tanh MLP (64 -> 32 -> 32 -> 10, 3,498 parameters) fits 500 scikit-learn digits (shipped with
scikit-learn, no download) with the squared loss, once with full-batch gradient descent (lr 0.1)
and once with full-batch Adam (lr 1e-3, betas 0.9 / 0.999). Every ``--every`` steps it measures,
with the package's math functions and no callback:

- gradient descent: lambda_max(H) (:func:`preconditioned_sharpness` with SGD is exactly that) against
  its stability threshold 2/lr (Cohen et al. 2021);
- Adam: the preconditioned sharpness lambda_max(P^{-1/2} H P^{-1/2}), P = (1 - beta1^t)(sqrt(v_hat) + eps)
  read from the optimizer's state, against (2 + 2 beta1) / ((1 - beta1) lr) = 38/lr (Cohen et al.
  2022), and, for contrast, the raw lambda_max(H): lr * lambda_max(H) stays far below 2 for Adam,
  so it says nothing about Adam's stability;
- at the end of each run, the step curvature along the optimizer's next update (critical lr and
  the quadratic model's fidelity).

Both sharpnesses rise (progressive sharpening) until they meet their threshold and then stay there.
Lanczos is warm-started from the previous measurement, so a measurement costs a handful of HVPs.
It prints a table of the measured ratios and writes the figure (default
``docs/images/edge_of_stability.png``). About 30-60 s on 2 CPU cores.

Run:   python examples/edge_of_stability.py [--figure out.png] [--every 25]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from lightning_hessian import EigenResult, Objective, extremal_eigenpairs
from lightning_hessian.stability import PreconditionedSharpness, preconditioned_sharpness
from lightning_hessian.step_curvature import StepCurvature, step_curvature


def squared_loss(model: nn.Module, batch: Any) -> Tensor:
    """Half the squared error against one-hot targets, summed over classes, mean over samples."""
    x, targets = batch
    return 0.5 * ((model(x) - targets) ** 2).sum(dim=1).mean()


def digits(n: int = 500) -> tuple[Tensor, Tensor]:
    x, y = load_digits(return_X_y=True)
    inputs = torch.tensor(x[:n] / 16.0, dtype=torch.float32)
    return inputs, nn.functional.one_hot(torch.tensor(y[:n]), 10).float()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))


@dataclass
class Run:
    """The curves of one training run."""

    name: str
    lr: float
    threshold: float = float("nan")
    steps: list[int] = field(default_factory=list)
    sharpness: list[float] = field(default_factory=list)  # the quantity compared with the threshold
    raw_lambda_max: list[float] = field(default_factory=list)  # lambda_max(H) (Adam only)
    loss: list[float] = field(default_factory=list)
    hvps: int = 0
    final_step: StepCurvature | None = None

    @property
    def ratios(self) -> np.ndarray:
        return np.asarray(self.sharpness) / self.threshold


def train(name: str, optimizer_cls: type[torch.optim.Optimizer], lr: float, steps: int, every: int) -> Run:
    model = mlp()
    batch = digits()
    optimizer = optimizer_cls(model.parameters(), lr=lr)
    objective = Objective(model, squared_loss, [batch])
    run = Run(name, lr)
    previous: PreconditionedSharpness | None = None
    previous_raw: EigenResult | None = None
    adaptive = optimizer_cls is not torch.optim.SGD
    for step in range(steps + 1):
        if (step % every == 0 and step > 0) or (step == 0 and not adaptive):  # Adam has no preconditioner at step 0
            previous = preconditioned_sharpness(objective, optimizer, init=previous, tol=1e-3, max_hvp=80)
            run.threshold = previous.threshold
            run.steps.append(step)
            run.sharpness.append(previous.value)
            run.loss.append(objective.loss())
            run.hvps += previous.n_hvp
            if adaptive:
                previous_raw = extremal_eigenpairs(objective, which="top", tol=1e-3, max_hvp=80, init=previous_raw)
                run.raw_lambda_max.append(previous_raw.lambda_max)
                run.hvps += previous_raw.n_hvp
        if step == steps:
            run.final_step = step_curvature(objective, optimizer)
            break
        optimizer.zero_grad()
        squared_loss(model, batch).backward()
        optimizer.step()
    return run


def table(runs: list[Run]) -> str:
    """Markdown table: where each run first reaches its threshold and the ratio from then on."""
    lines = [
        "| run | threshold | ratio at first measurement | first step at >= 0.95 | ratio afterwards: min / median / max"
        " | lr * lambda_max(H) at the end | critical lr / lr at the end | model fidelity at the end | HVPs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        ratios = run.ratios
        reached = np.flatnonzero(ratios >= 0.95)
        after = ratios[reached[0] :] if reached.size else np.array([np.nan])
        first = f"{run.steps[reached[0]]}" if reached.size else "never"
        end = run.final_step
        crit = f"{end.critical_lr / run.lr:.2f}" if end is not None else "-"
        fidelity = f"{end.model_fidelity:.2f}" if end is not None else "-"
        raw = run.raw_lambda_max[-1] if run.raw_lambda_max else run.sharpness[-1]
        lines.append(
            f"| {run.name} | {run.threshold:.6g} | {ratios[0]:.2f} | {first} | "
            f"{np.min(after):.3f} / {np.median(after):.3f} / {np.max(after):.3f} | {run.lr * raw:.3g} | {crit} | "
            f"{fidelity} | {run.hvps} |"
        )
    return "\n".join(lines)


def figure(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    labels = {
        "gradient descent": (r"$\lambda_{\max}(H)$", r"$2/\eta$"),
        "Adam": (r"$\lambda_{\max}(P^{-1/2} H P^{-1/2})$", r"$38/\eta$"),
    }
    for ax, run in zip(axes, runs):
        sharp_label, threshold_label = labels[run.name]
        ax.plot(run.steps, run.sharpness, color="tab:blue", lw=1.8, label=sharp_label)
        ax.axhline(run.threshold, color="black", ls="--", lw=1.2, label=f"{threshold_label} = {run.threshold:.4g}")
        ax.set_title(f"full-batch {run.name}, $\\eta$ = {run.lr:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("sharpness")
        loss_ax = ax.twinx()
        loss_ax.plot(run.steps, run.loss, color="tab:orange", lw=1, alpha=0.7)
        loss_ax.set_ylabel("training loss", color="tab:orange")
        loss_ax.set_yscale("log")
        ax.legend(loc="lower right", fontsize=9)
    fig.suptitle("Sharpness meets the optimizer's stability threshold (tanh MLP on 500 digits, squared loss)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", type=Path, default=Path("docs/images/edge_of_stability.png"))
    parser.add_argument("--every", type=int, default=25, help="measure every this many steps")
    parser.add_argument("--gd-steps", type=int, default=3000)
    parser.add_argument("--adam-steps", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny model: one thread is as fast and kinder to a shared machine
    start = time.perf_counter()
    runs = [
        train("gradient descent", torch.optim.SGD, 0.1, args.gd_steps, args.every),
        train("Adam", torch.optim.Adam, 1e-3, args.adam_steps, args.every),
    ]
    print(table(runs))
    figure(runs, args.figure)
    print(f"\nfigure: {args.figure}   ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
