"""Curvature along the gradient and along the optimizer's step, and how well the quadratic model predicts the step.

A step ``theta -> theta - eps d`` changes the loss by about ``-eps g.d + eps^2 / 2 d.H.d`` (the
Hessian debugging post's ``-eps g.g + eps^2/2 g.H.g`` for ``d = g``). The quadratic model stops
predicting a decrease at ``eps = 2 g.d / d.H.d``, the *critical learning rate* along ``d``. The
ratio of the actual change of a step of the optimizer's learning rate to the predicted one is the
trust-region ``rho`` (*model fidelity*): near 1 the quadratic model (and everything read from the
Hessian) describes the step; far from 1 the step leaves the region where it holds.

The direction ``d`` is the step per unit learning rate, so ``critical_lr`` compares directly with
the learning rate:

- ``"update"`` (default): the optimizer's next update (:func:`next_update`, momentum, bias
  corrections and weight decay included), computed from its state with the probe gradient standing
  in for the next mini-batch gradient, divided by the reference group's learning rate;
- ``"preconditioned"``: the momentum-free step ``D g / lr`` (``P^{-1} g`` for adaptive methods);
- ``"gradient"``: ``d = g`` (plain gradient descent);
- a flat tensor: any direction, taken as the step per unit ``lr``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_hessian.objective import Objective
from lightning_hessian.optimizer_geometry import (
    GeometryUnavailableError,
    OptimizerLike,
    next_update,
    read_preconditioner,
    reference_lr,
)

Direction = Literal["update", "preconditioned", "gradient"]


@dataclass(frozen=True)
class StepCurvature:
    """Curvatures along the gradient ``g`` and the step direction ``d``, and the quadratic model's fidelity.

    Attributes:
        gradient_curvature: ``g.Hg / g.g``.
        direction_curvature: ``d.Hd / d.d``.
        critical_lr: ``2 g.d / d.Hd``: the step size along ``d`` beyond which the quadratic model
            predicts no decrease (``inf`` without positive curvature along a descent direction;
            negative when ``d`` is not a descent direction).
        gradient_critical_lr: ``2 g.g / g.Hg``, the same along the gradient.
        lr: the step size of the fidelity probe (the reference group's learning rate by default).
        predicted_change: ``-lr g.d + lr^2 / 2 d.Hd``.
        actual_change: ``L(theta - lr d) - L(theta)`` on the probe set.
        model_fidelity: ``actual_change / predicted_change`` (the trust-region rho; NaN without ``lr``).
        gradient_norm, direction_norm: ``||g||``, ``||d||``.
        cosine: ``g.d / (||g|| ||d||)``.
        direction: which direction ``d`` is (``"update"``, ``"preconditioned"``, ``"gradient"``, ``"given"``).
        n_hvp, n_loss: Hessian-vector products and loss evaluations spent.
        seconds: wall time.
    """

    gradient_curvature: float
    direction_curvature: float
    critical_lr: float
    gradient_critical_lr: float
    lr: float
    predicted_change: float
    actual_change: float
    model_fidelity: float
    gradient_norm: float
    direction_norm: float
    cosine: float
    direction: str
    n_hvp: int
    n_loss: int
    seconds: float


def _critical(slope: float, curvature: float) -> float:
    """``2 slope / curvature``: where ``-eps slope + eps^2 / 2 curvature`` returns to 0."""
    if curvature > 0:
        return 2.0 * slope / curvature
    if slope > 0:
        return math.inf  # no positive curvature: the model predicts decrease at every step size
    return math.nan if slope == 0 and curvature == 0 else -math.inf


def _dot(a: Tensor, b: Tensor) -> float:
    return float(a.to(torch.float64) @ b.to(torch.float64))


def step_curvature(
    objective: Objective,
    optimizer: OptimizerLike | None = None,
    *,
    direction: Direction | Tensor = "update",
    lr: float | None = None,
    gradient: Tensor | None = None,
    loss: float | None = None,
) -> StepCurvature:
    """Curvature along the gradient and the step direction, the critical learning rate and the model fidelity.

    Costs one HVP for ``d = g``, two otherwise, plus one loss evaluation (two without ``loss``)
    for the fidelity. Never changes the model or the optimizer.

    Args:
        objective: the probe loss.
        optimizer: the optimizer(s) whose step is examined (needed for ``"update"`` and
            ``"preconditioned"``, and for the default ``lr``).
        direction: ``"update"``, ``"preconditioned"``, ``"gradient"`` or a flat tensor (see the module).
        lr: step size of the fidelity probe; default the reference group's learning rate. With
            neither ``lr`` nor ``optimizer`` the fidelity is skipped (NaN, no loss evaluated).
        gradient: the probe gradient if already computed (saves a gradient).
        loss: the probe loss at the current parameters if already computed (saves a forward pass).
    """
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if isinstance(direction, str) and direction not in ("update", "preconditioned", "gradient"):
        raise ValueError(
            f"direction must be 'update', 'preconditioned', 'gradient' or a flat tensor, got {direction!r}"
        )
    if isinstance(direction, str) and direction != "gradient" and optimizer is None:
        raise ValueError(f"direction={direction!r} needs the optimizer")
    n = objective.num_params
    for label, vec in (("gradient", gradient), ("direction", direction)):
        if isinstance(vec, Tensor) and vec.shape != (n,):
            raise ValueError(f"{label} must be a flat tensor of shape ({n},), got {tuple(vec.shape)}")
    start = time.perf_counter()
    hvp_before, loss_before = objective.n_hvp, objective.n_loss
    with objective.session():
        g = objective.grad() if gradient is None else gradient.to(objective.device, objective.dtype)
        d, label, ref_lr = _direction(objective, optimizer, direction, g)
        step = lr if lr is not None else ref_lr
        hg = objective.hvp(g)
        hd = hg if d is g else objective.hvp(d)
        gg, ghg = _dot(g, g), _dot(g, hg)
        dd, dhd, gd = _dot(d, d), _dot(d, hd), _dot(g, d)
        predicted = actual = fidelity = math.nan
        if step is not None:
            predicted = -step * gd + 0.5 * step**2 * dhd
            base = objective.loss() if loss is None else float(loss)
            actual = float(objective.losses_at((-step * d).unsqueeze(0))[0]) - base
            fidelity = actual / predicted if predicted != 0 else math.nan
    return StepCurvature(
        gradient_curvature=ghg / gg if gg > 0 else math.nan,
        direction_curvature=dhd / dd if dd > 0 else math.nan,
        critical_lr=_critical(gd, dhd),
        gradient_critical_lr=_critical(gg, ghg),
        lr=math.nan if step is None else step,
        predicted_change=predicted,
        actual_change=actual,
        model_fidelity=fidelity,
        gradient_norm=math.sqrt(gg),
        direction_norm=math.sqrt(dd),
        cosine=gd / math.sqrt(gg * dd) if gg > 0 and dd > 0 else math.nan,
        direction=label,
        n_hvp=objective.n_hvp - hvp_before,
        n_loss=objective.n_loss - loss_before,
        seconds=time.perf_counter() - start,
    )


def _direction(
    objective: Objective, optimizer: OptimizerLike | None, direction: Direction | Tensor, g: Tensor
) -> tuple[Tensor, str, float | None]:
    """``(d, label, reference lr)``: the step per unit learning rate."""
    ref_lr = None if optimizer is None else reference_lr(objective, optimizer)
    if isinstance(direction, str) and direction == "update":
        probe = next_update(objective, optimizer, g)
        if probe.status != "ok" or probe.displacement is None:
            raise GeometryUnavailableError(probe.status, probe.message)
        if not probe.reference_lr > 0:
            raise ValueError("the reference parameter group has lr=0: there is no step direction")
        return -probe.displacement / probe.reference_lr, "update", probe.reference_lr
    if isinstance(direction, Tensor):
        return direction.to(objective.device, objective.dtype), "given", ref_lr
    if direction == "gradient":
        return g, "gradient", ref_lr
    pre = read_preconditioner(objective, optimizer)
    if not pre.ok:
        raise GeometryUnavailableError(pre.status, pre.message)
    ref_lr = pre.reference.lr
    if not ref_lr > 0:
        raise ValueError("the reference parameter group has lr=0: there is no step direction")
    return pre.step_scale * g / ref_lr, "preconditioned", ref_lr
