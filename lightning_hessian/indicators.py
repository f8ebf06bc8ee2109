"""Indicators that say which landscape picture to believe: projected curvature, saddle flags, grid minima.

From Böttcher & Wheeler: a random plane's expected curvature is tr(H) (times the direction
norms), so a saddle can look like a minimum; the 2x2 projected Hessian of a plane, from two
HVPs, says what the plane really shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from lightning_hessian.landscape import Surface
from lightning_hessian.objective import Objective


@dataclass(frozen=True)
class PlaneCurvature:
    """The Hessian projected on a plane: ``[[d1'Hd1, d1'Hd2], [d2'Hd1, d2'Hd2]]`` and its eigenvalues.

    ``principal`` (ascending) are the curvatures of ``L(a, b)`` at the centre in the plot's own
    coordinates; ``shows_saddle`` is true when they have opposite signs.
    """

    matrix: np.ndarray
    principal: tuple[float, float]

    @property
    def shows_saddle(self) -> bool:
        return self.principal[0] < 0 < self.principal[1]


def plane_curvature(objective: Objective, d1: Tensor, d2: Tensor) -> PlaneCurvature:
    """Project the Hessian on the plane spanned by ``d1, d2`` with two HVPs."""
    with objective.session():
        h1, h2 = objective.hvp(d1), objective.hvp(d2)
    a, b = float(d1 @ h1), float(d2 @ h2)
    c = 0.5 * (float(d1 @ h2) + float(d2 @ h1))
    matrix = np.array([[a, c], [c, b]])
    mean, radius = 0.5 * (a + b), math.hypot(0.5 * (a - b), c)
    return PlaneCurvature(matrix=matrix, principal=(mean - radius, mean + radius))


def saddle_visibility(trace: float, trace_sq: float) -> float:
    """Probability that a random Gaussian 2-D plane shows a saddle: ``exp(-tr^2 / (4 tr(H^2))) / sqrt(2)``.

    Böttcher & Wheeler's large-N estimate: with tr H = 0 it is 1/sqrt(2); it falls quickly as the
    positive mean curvature starts to dominate, and then random-direction plots hide saddles.
    Rescaling either direction (normalisation) does not change which planes show a saddle.
    """
    if not (math.isfinite(trace) and math.isfinite(trace_sq)) or trace_sq <= 0:
        return float("nan")
    return math.exp(-(trace**2) / (4.0 * trace_sq)) / math.sqrt(2.0)


@dataclass(frozen=True)
class GridMinimum:
    """The lowest finite point of a grid: coordinates, loss, depth below the centre and distance from it.

    ``offset`` is in the plot's coordinates; ``distance`` in parameter space (uses the direction
    norms). A minimum away from the centre is where a step along the plane would lower the loss.
    """

    alpha: float
    beta: float
    loss: float
    depth: float
    offset: float
    distance: float


def grid_minimum(surface: Surface, values: np.ndarray | None = None) -> GridMinimum:
    """Lowest finite value of ``values`` (default: the train losses) on the surface."""
    grid = surface.losses if values is None else values
    finite = np.isfinite(grid)
    if not finite.any():
        nan = float("nan")
        return GridMinimum(nan, nan, nan, nan, nan, nan)
    flat = np.where(finite, grid, np.inf)
    i, j = np.unravel_index(int(np.argmin(flat)), grid.shape)
    alpha, beta = float(surface.alphas[j]), float(surface.betas[i])
    mid = len(surface.alphas) // 2, len(surface.betas) // 2
    center = float(grid[mid[1], mid[0]])
    return GridMinimum(
        alpha=alpha,
        beta=beta,
        loss=float(grid[i, j]),
        depth=center - float(grid[i, j]),
        offset=math.hypot(alpha, beta),
        distance=math.hypot(alpha * surface.d1_norm, beta * surface.d2_norm),
    )


def grid_curvatures(surface: Surface) -> tuple[float, float]:
    """Second differences of the grid at the centre along ``alpha`` and ``beta`` (curvature per unit coordinate)."""
    mid_b, mid_a = len(surface.betas) // 2, len(surface.alphas) // 2
    ha, hb = surface.alphas[1] - surface.alphas[0], surface.betas[1] - surface.betas[0]
    row, col = surface.losses[mid_b], surface.losses[:, mid_a]
    return (
        float((row[mid_a + 1] - 2 * row[mid_a] + row[mid_a - 1]) / ha**2),
        float((col[mid_b + 1] - 2 * col[mid_b] + col[mid_b - 1]) / hb**2),
    )
