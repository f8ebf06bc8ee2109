"""Trust-region subproblem solvers on Hessian-vector products: Steihaug-Toint CG and a negative-curvature search.

Both minimise the quadratic model m(s) = g.s + s.Hs/2 subject to ||s||_M <= radius, where
||s||_M = sqrt(sum_i M_i s_i^2) for a positive diagonal M (``None`` means M = I, the sphere). They touch
H only through ``hvp(v) -> Hv`` on flat vectors, so any HVP engine fits, and they report how many
products they used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Hvp = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SubproblemResult:
    """An approximate minimiser of the trust-region model and how it was found.

    ``predicted_decrease`` is m(0) - m(step) = -(g.step + step.H.step/2), computed from the products
    already taken (no extra HVP). ``boundary`` says the step ends on the trust-region boundary,
    ``negative_curvature`` that a direction with d.H.d <= 0 was met (the step then follows it to the
    boundary). ``residual_norm`` is ||g + H step|| (Euclidean) for interior steps, ``nan`` otherwise.
    """

    step: Tensor
    predicted_decrease: float
    iterations: int
    n_hvp: int
    boundary: bool
    negative_curvature: bool
    residual_norm: float
    step_norm: float


def m_norm(vector: Tensor, metric: Tensor | None) -> float:
    """||v||_M = sqrt(v.Mv) for a diagonal M given as a vector (``None``: the Euclidean norm)."""
    if metric is None:
        return float(torch.linalg.vector_norm(vector))
    return math.sqrt(max(float(torch.dot(vector * metric, vector)), 0.0))


def _m_dot(a: Tensor, b: Tensor, metric: Tensor | None) -> float:
    return float(torch.dot(a, b if metric is None else metric * b))


def boundary_step_length(step: Tensor, direction: Tensor, radius: float, metric: Tensor | None) -> float:
    """The tau >= 0 with ||step + tau * direction||_M = radius, for a ``step`` inside the region.

    Solves the quadratic a tau^2 + b tau + c = 0 (c <= 0) with the cancellation-free root formula.
    """
    a = _m_dot(direction, direction, metric)
    if a <= 0.0:
        raise ValueError("the direction is zero in the M-norm: there is no boundary point along it")
    b = 2.0 * _m_dot(step, direction, metric)
    c = min(_m_dot(step, step, metric) - radius * radius, 0.0)
    root = math.sqrt(max(b * b - 4.0 * a * c, 0.0))
    if b >= 0.0:
        return 0.0 if root + b == 0.0 else (-2.0 * c) / (b + root)
    return (-b + root) / (2.0 * a)


def steihaug_cg(
    grad: Tensor,
    hvp: Hvp,
    radius: float,
    metric: Tensor | None = None,
    *,
    krylov_tol: float = 0.1,
    max_iters: int = 50,
) -> SubproblemResult:
    """Preconditioned Steihaug-Toint truncated CG for min g.s + s.Hs/2 subject to ||s||_M <= radius.

    The preconditioner is M itself, so the M-norms of the CG iterates grow monotonically and the first
    one to leave the region, or the first direction with non-positive curvature, is followed to the
    boundary. Interior iterations stop when ||r|| <= min(sqrt(||g||), krylov_tol) * ||g|| (the
    paper's rule: stricter as the gradient vanishes) or after ``max_iters`` products.
    """
    if radius <= 0.0 or not math.isfinite(radius):
        raise ValueError(f"radius must be a positive finite number, got {radius}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be at least 1, got {max_iters}")
    step = torch.zeros_like(grad)
    h_step = torch.zeros_like(grad)  # H @ step, kept to price the model without another product
    residual = grad.clone()
    g_norm = float(torch.linalg.vector_norm(grad))
    if g_norm == 0.0:
        return SubproblemResult(step, 0.0, 0, 0, False, False, 0.0, 0.0)
    tol = min(math.sqrt(g_norm), krylov_tol) * g_norm
    z = residual if metric is None else residual / metric
    direction = -z
    rz = float(torch.dot(residual, z))
    n_hvp = 0
    iterations = 0
    for k in range(max_iters):
        iterations = k + 1
        h_dir = hvp(direction)
        n_hvp += 1
        curvature = float(torch.dot(direction, h_dir))
        if curvature <= 0.0:
            tau = boundary_step_length(step, direction, radius, metric)
            return _finish(grad, step + tau * direction, h_step + tau * h_dir, k + 1, n_hvp, True, True, metric)
        alpha = rz / curvature
        trial = step + alpha * direction
        if m_norm(trial, metric) >= radius:
            tau = boundary_step_length(step, direction, radius, metric)
            return _finish(grad, step + tau * direction, h_step + tau * h_dir, k + 1, n_hvp, True, False, metric)
        step = trial
        h_step = h_step + alpha * h_dir
        residual = residual + alpha * h_dir
        r_norm = float(torch.linalg.vector_norm(residual))
        if r_norm <= tol:
            break
        z = residual if metric is None else residual / metric
        rz_next = float(torch.dot(residual, z))
        direction = -z + (rz_next / rz) * direction
        rz = rz_next
    r_norm = float(torch.linalg.vector_norm(residual))
    return _finish(grad, step, h_step, iterations, n_hvp, False, False, metric, r_norm)


def _finish(
    grad: Tensor,
    step: Tensor,
    h_step: Tensor,
    iterations: int,
    n_hvp: int,
    boundary: bool,
    negative: bool,
    metric: Tensor | None,
    residual_norm: float = math.nan,
) -> SubproblemResult:
    decrease = -(float(torch.dot(grad, step)) + 0.5 * float(torch.dot(step, h_step)))
    return SubproblemResult(step, decrease, iterations, n_hvp, boundary, negative, residual_norm, m_norm(step, metric))


def negative_curvature_step(
    grad: Tensor,
    hvp: Hvp,
    radius: float,
    metric: Tensor | None = None,
    *,
    steps: int = 10,
    generator: torch.Generator | None = None,
) -> SubproblemResult:
    """A boundary step along the most negative curvature Lanczos finds (a zero step if it finds none).

    Used where the gradient (nearly) vanishes and CG has nothing to work with, e.g. exactly on a saddle.
    Lanczos with full reorthogonalisation runs on M^{-1/2} H M^{-1/2} from a random start (drawn from
    ``generator``, never the global RNG); the Ritz vector of the smallest Ritz value, mapped back and
    scaled to ||s||_M = radius, is the step, signed so that g.s <= 0. A negative Ritz value proves
    negative curvature, so a non-zero step always has a positive predicted decrease.
    """
    nothing = SubproblemResult(torch.zeros_like(grad), 0.0, 0, 0, False, False, math.nan, 0.0)
    if steps < 1:
        return nothing
    scale = None if metric is None else metric.rsqrt()
    start = torch.randn(grad.shape, generator=generator, dtype=torch.float64, device="cpu")
    q = (start / torch.linalg.vector_norm(start)).to(device=grad.device, dtype=grad.dtype)
    basis: list[Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    n_hvp = 0
    for _ in range(min(steps, grad.numel())):
        basis.append(q)
        w = hvp(q if scale is None else q * scale)
        n_hvp += 1
        if scale is not None:
            w = w * scale
        alpha = float(torch.dot(q, w))
        alphas.append(alpha)
        for b in basis:  # full reorthogonalisation, twice is enough
            w = w - torch.dot(b, w) * b
        for b in basis:
            w = w - torch.dot(b, w) * b
        beta = float(torch.linalg.vector_norm(w))
        if beta <= 1e-10 * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        q = w / beta
    k = len(alphas)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(tri)
    theta = float(values[0])
    if theta >= 0.0:
        return SubproblemResult(nothing.step, 0.0, k, n_hvp, False, False, math.nan, 0.0)
    coeffs = vectors[:, 0].to(device=grad.device, dtype=grad.dtype)
    u = torch.stack(basis, dim=1) @ coeffs
    u = u / torch.linalg.vector_norm(u)
    step = radius * (u if scale is None else u * scale)
    g_dot = float(torch.dot(grad, step))
    if g_dot > 0.0:
        step, g_dot = -step, -g_dot
    decrease = -(g_dot + 0.5 * theta * radius * radius)
    return SubproblemResult(step, decrease, k, n_hvp, True, True, math.nan, m_norm(step, metric))


__all__ = ["SubproblemResult", "boundary_step_length", "m_norm", "negative_curvature_step", "steihaug_cg"]
