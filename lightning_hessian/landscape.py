"""Loss landscapes: plot directions (random filter-normalised, Hessian eigenvectors) and exact 1-D/2-D loss grids.

Grids are evaluated functionally through :meth:`Objective.losses_at`, one forward pass of the
probe set per point and nothing else: every point is ``theta + a d1 + b d2`` computed afresh
(no incremental drift), the grid is odd and centred so that ``(0, 0)`` is exactly the current
weights, and non-finite losses are kept as they are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_hessian.objective import Objective
from lightning_hessian.spectrum import EigenResult

Normalization = Literal["filter", "layer", "none"]


@dataclass(frozen=True)
class Surface:
    """A 2-D loss grid ``L(theta + a d1 + b d2)`` with everything needed to re-plot it.

    Attributes:
        alphas, betas: the coordinates along ``d1`` and ``d2`` (odd length, 0 exactly in the middle).
        losses: the objective on the grid, shape ``(len(betas), len(alphas))`` (row = beta);
            non-finite values are kept.
        val_losses: the same on a validation objective, or ``None``.
        kind: ``"random"``, ``"hessian"`` or ``"custom"``.
        center_loss: the loss at ``(0, 0)``, i.e. at the current weights.
        d1_norm, d2_norm: Euclidean norms of the directions (coordinate scale: a step of 1 along
            ``alpha`` moves the weights by ``d1_norm``).
        labels: axis descriptions (e.g. ``"v_max (lambda=3.2)"``).
        eigenvalues: for Hessian planes, ``(lambda_max, lambda_min)`` of the two directions.
        n_loss: loss evaluations spent; seconds: wall time.
    """

    alphas: np.ndarray
    betas: np.ndarray
    losses: np.ndarray
    val_losses: np.ndarray | None
    kind: str
    center_loss: float
    d1_norm: float
    d2_norm: float
    labels: tuple[str, str]
    eigenvalues: tuple[float, float] | None = None
    n_loss: int = 0
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The numeric content, for ``np.savez``."""
        out = {"alphas": self.alphas, "betas": self.betas, "losses": self.losses}
        if self.val_losses is not None:
            out["val_losses"] = self.val_losses
        return out


@dataclass(frozen=True)
class Line:
    """A 1-D loss cut ``L(theta + t d)``: ``ts`` (odd length, 0 in the middle), ``losses``, ``val_losses``."""

    ts: np.ndarray
    losses: np.ndarray
    val_losses: np.ndarray | None
    label: str
    d_norm: float


def centred_coordinates(span: float, resolution: int) -> np.ndarray:
    """``resolution`` (odd) equidistant coordinates on ``[-span, span]``, symmetric, exactly 0 in the middle."""
    if not isinstance(resolution, int) or resolution < 3 or resolution % 2 == 0:
        raise ValueError(f"resolution must be an odd integer >= 3 (so that 0 is on the grid), got {resolution!r}")
    if not (math.isfinite(span) and span > 0):
        raise ValueError(f"span must be a positive finite number, got {span!r}")
    half = resolution // 2
    return span * np.arange(-half, half + 1, dtype=np.float64) / half


def random_direction(
    objective: Objective,
    seed: int = 0,
    normalization: Normalization = "filter",
    ignore_bias_and_norm: bool = True,
) -> Tensor:
    """A Gaussian direction scaled like the weights (Li et al., 2018), as a flat vector.

    ``"filter"``: each output filter / neuron (slice along dim 0) of a weight tensor is rescaled
    to the norm of the same slice of the weights; ``"layer"``: each tensor as a whole; ``"none"``:
    plain Gaussian. With ``ignore_bias_and_norm`` (default, Li et al.'s ``biasbn``) the
    directions of 1-D parameters (biases, normalisation scales and shifts) are zero. The
    generator is private and seeded: the same seed gives the same plane in every frame.
    """
    if normalization not in ("filter", "layer", "none"):
        raise ValueError(f"normalization must be 'filter', 'layer' or 'none', got {normalization!r}")
    gen = torch.Generator().manual_seed(seed)
    theta = objective.parameters()
    d = torch.randn(theta.numel(), generator=gen, dtype=torch.float64).to(theta.device, theta.dtype)
    for w, piece in zip(objective.split(theta), objective.split(d)):
        if w.dim() <= 1 and ignore_bias_and_norm:
            piece.zero_()
        elif normalization == "filter" and w.dim() > 1:
            w_norm = w.reshape(w.shape[0], -1).norm(dim=1)
            d_norm = piece.reshape(piece.shape[0], -1).norm(dim=1).clamp_min(1e-30)
            piece.mul_((w_norm / d_norm).view(-1, *([1] * (w.dim() - 1))))
        elif normalization in ("filter", "layer"):
            piece.mul_(w.norm() / piece.norm().clamp_min(1e-30))
    return d


def hessian_directions(eigen: EigenResult, previous: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Unit eigenvectors of ``lambda_max`` and ``lambda_min``, signs aligned with ``previous``.

    An eigenvector's sign is arbitrary; flipping it to agree with the last frame's direction
    keeps an animation from mirroring between frames.
    """
    if eigen.vector_min is None:
        raise ValueError("Hessian directions need lambda_min: call extremal_eigenpairs with which='both'")
    d1, d2 = eigen.eigenvectors[0].clone(), eigen.vector_min.clone()
    if previous is not None:
        for d, p in ((d1, previous[0]), (d2, previous[1])):
            if p.shape == d.shape and float(d @ p.to(d)) < 0:
                d.neg_()
    return d1, d2


def orthogonalize(d1: Tensor, d2: Tensor) -> Tensor:
    """``d2`` minus its component along ``d1``, rescaled to its original norm."""
    norm = d2.norm()
    out: Tensor = d2 - (d2 @ d1) / (d1 @ d1) * d1
    scaled: Tensor = out * (norm / out.norm().clamp_min(1e-30))
    return scaled


def curvature_span(
    eigenvalue: float, loss: float, rise: float = 1.0, limits: tuple[float, float] = (1e-3, 1e3)
) -> float:
    """Half-width along a unit eigenvector where the quadratic model rises by ``rise * |loss|``.

    ``0.5 |lambda| t^2 = rise |L|`` gives ``t = sqrt(2 rise |L| / |lambda|)``, clipped to ``limits``:
    a sharp direction gets a narrow axis, a flat one a wide axis.
    """
    scale = max(abs(loss), 1e-8) * rise
    t = math.sqrt(2.0 * scale / max(abs(eigenvalue), 1e-12))
    return float(min(max(t, limits[0]), limits[1]))


def _plane_points(theta: Tensor, d1: Tensor, d2: Tensor, alphas: np.ndarray, betas: np.ndarray) -> Iterator[Tensor]:
    """``theta + a d1 + b d2`` for every grid point, row by row, each formed afresh in two passes."""
    for b in betas:
        for a in alphas:
            yield torch.add(theta, d1, alpha=float(a)).add_(d2, alpha=float(b))


Progress = Callable[[int], object]


def _counted(points: Iterator[Tensor], progress: Progress | None) -> Iterator[Tensor]:
    """``points``, reporting each one to ``progress`` as it is consumed (grids are streamed)."""
    for point in points:
        yield point
        if progress is not None:
            progress(1)


def loss_surface(
    objective: Objective,
    d1: Tensor,
    d2: Tensor,
    span: float | tuple[float, float] = 1.0,
    resolution: int = 21,
    *,
    val_objective: Objective | None = None,
    kind: str = "custom",
    labels: tuple[str, str] = ("d1", "d2"),
    eigenvalues: tuple[float, float] | None = None,
    progress: Progress | None = None,
) -> Surface:
    """The loss on the plane ``theta + a d1 + b d2`` for ``a, b`` on an exact centred grid.

    Args:
        objective: the (train) probe objective.
        d1, d2: flat directions (not normalised here; the plot's coordinate scale is theirs).
        span: half-width of the grid in ``a`` and ``b`` (one number, or one per axis).
        resolution: odd number of points per axis (the current weights sit exactly in the middle).
        val_objective: an objective on validation data over the same parameters, evaluated on the
            same plane.
        kind, labels, eigenvalues: metadata carried into the plot.
        progress: called with 1 after each evaluated point (a progress bar's ``update``).
    """
    sx, sy = (span, span) if isinstance(span, (int, float)) else span
    alphas, betas = centred_coordinates(float(sx), resolution), centred_coordinates(float(sy), resolution)
    for name, d in (("d1", d1), ("d2", d2)):
        if d.shape != (objective.num_params,):
            raise ValueError(f"{name} must have shape ({objective.num_params},), got {tuple(d.shape)}")
    start = time.perf_counter()
    before = objective.n_loss
    shape = (len(betas), len(alphas))
    theta = objective.parameters()
    points = _counted(_plane_points(theta, d1, d2, alphas, betas), progress)
    losses = objective.losses_at(points, absolute=True).numpy().reshape(shape)
    val = None
    if val_objective is not None:
        if val_objective.num_params != objective.num_params:
            raise ValueError("val_objective must select the same parameters as objective")
        points = _counted(_plane_points(theta, d1, d2, alphas, betas), progress)
        val = val_objective.losses_at(points, absolute=True).numpy().reshape(shape)
    mid = resolution // 2
    return Surface(
        alphas=alphas,
        betas=betas,
        losses=losses,
        val_losses=val,
        kind=kind,
        center_loss=float(losses[mid, mid]),
        d1_norm=float(d1.norm()),
        d2_norm=float(d2.norm()),
        labels=labels,
        eigenvalues=eigenvalues,
        n_loss=objective.n_loss - before,
        seconds=time.perf_counter() - start,
    )


def loss_line(
    objective: Objective,
    d: Tensor,
    span: float = 1.0,
    resolution: int = 41,
    *,
    val_objective: Objective | None = None,
    label: str = "d",
    progress: Progress | None = None,
) -> Line:
    """The loss along ``theta + t d`` for ``t`` on an exact centred grid (a 1-D cut)."""
    ts = centred_coordinates(float(span), resolution)
    theta = objective.parameters()

    def points() -> Iterator[Tensor]:
        return _counted((torch.add(theta, d, alpha=float(t)) for t in ts), progress)

    losses = objective.losses_at(points(), absolute=True).numpy()
    val = None if val_objective is None else val_objective.losses_at(points(), absolute=True).numpy()
    return Line(ts=ts, losses=losses, val_losses=val, label=label, d_norm=float(d.norm()))
