"""Curvature of a small classifier without Lightning: the functional API on any nn.Module.

Trains a small tanh MLP on scikit-learn's handwritten digits for a few epochs, then measures
the extremal Hessian eigenvalues (the saddle signal included), the Hutch++ trace and the
HVP-free slope-fit trace on a fixed probe set, and prints each number with its evidence.

Run:  python examples/functional_api.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from lightning_hessian import Objective, extremal_eigenpairs, hutchinson_trace, slope_fit_trace


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    probe = [(x[:256], y[:256]), (x[256:512], y[256:512])]
    objective = Objective(model, cross_entropy, probe)
    print(f"{objective.num_params} parameters, probe set of 512 digits, HVP engine {objective.hvp_engine!r}")
    previous = None
    for epoch in range(4):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            cross_entropy(model, (x[i : i + 64], y[i : i + 64])).backward()
            opt.step()
        eig = extremal_eigenpairs(objective, init=previous)  # warm start from the last measurement
        previous = eig
        print(
            f"epoch {epoch}: loss {objective.loss():.4f}  lambda_max {eig.lambda_max:.5g} "
            f"(residual {eig.residuals[0]:.1e})  lambda_min {eig.lambda_min:.5g} "
            f"(residual {eig.residual_min:.1e})  negative ratio {eig.negative_ratio:.3f}  "
            f"converged {eig.converged}  {eig.n_hvp} HVPs"
        )
    trace = hutchinson_trace(objective, n=99)
    slope = slope_fit_trace(objective, n_directions=50)
    print(
        f"Hutch++ trace {trace.value:.4f} +- {trace.stderr:.4f} ({trace.n_hvp} HVPs); "
        f"mean curvature {trace.mean_curvature(objective.num_params):.3e}; tr(H^2) {trace.trace_sq:.4f}"
    )
    print(
        f"slope-fit trace {slope.value:.4f} +- {slope.stderr:.4f} ({slope.n_loss} forward passes, "
        f"radius {slope.radius:.3g}, no HVP)"
    )
    stability = 2.0 / 0.2
    print(
        f"SGD with lr 0.2 is stable on a quadratic while lambda_max < {stability:.1f}: "
        f"{'yes' if previous.lambda_max < stability else 'no'}"
    )


if __name__ == "__main__":
    main()
