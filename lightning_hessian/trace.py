"""Hessian trace estimates: Hutchinson and Hutch++ from HVPs, and the HVP-free slope fit of Böttcher & Wheeler.

Every estimator returns a :class:`TraceEstimate` carrying its standard error and cost. Probe
vectors are generated and consumed one at a time from a private generator seeded by ``seed``
(Hutch++ holds only its low-rank sketch), so memory does not grow with the number of probes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lightning_hessian._krylov import KrylovSpace
from lightning_hessian.objective import Objective

TraceMethod = Literal["hutch++", "hutchinson"]
#: with ``deflate``, probes are drawn from ``seed`` plus this: a Lanczos run seeded with the same
#: integer draws from the same generator stream, and the probes must not depend on the space
DEFLATED_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its evidence.

    Attributes:
        value: the estimate of tr(H).
        stderr: its standard error (for Hutch++: of the stochastic residual part, given the sketch).
        n_hvp: Hessian-vector products spent (0 for the slope fit).
        n_loss: loss evaluations (one forward pass of the probe set each) spent.
        n_samples: random probes or directions averaged.
        trace_sq: estimate of tr(H^2) = ||H||_F^2 from the same products (NaN for the slope fit).
        trace_sq_stderr: its standard error.
        method: ``"hutch++"``, ``"hutchinson"`` or ``"slope_fit"``.
        radius: the slope fit's half-width along unit directions (NaN for HVP methods).
        seconds: wall time.
        n_sketch: Hutch++'s sketch vectors (0 for Hutchinson, or when a Krylov space replaced it).
        n_deflated: vectors of the free Krylov space deflated (``deflate``), 0 without one.
    """

    value: float
    stderr: float
    n_hvp: int
    n_loss: int
    n_samples: int
    trace_sq: float
    trace_sq_stderr: float
    method: str
    radius: float
    seconds: float
    n_sketch: int = 0
    n_deflated: int = 0

    def mean_curvature(self, num_params: int) -> float:
        """tr(H) / N: the expected curvature of a random direction (what a random plane shows)."""
        return self.value / num_params


def _mean_stderr(samples: list[float]) -> tuple[float, float]:
    arr = np.asarray(samples, dtype=np.float64)
    if arr.size < 2:
        return float(arr.mean()) if arr.size else float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size))


def _rademacher(n: int, gen: torch.Generator, like: Tensor) -> Tensor:
    bits = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8)
    return (bits.to(torch.float64) * 2 - 1).to(device=like.device, dtype=like.dtype)


def hutchinson_trace(
    objective: Objective,
    n: int = 99,
    method: TraceMethod = "hutch++",
    seed: int = 0,
    *,
    products_out: list[tuple[Tensor, Tensor]] | None = None,
    deflate: KrylovSpace | None = None,
    sketch: int | None = None,
) -> TraceEstimate:
    """Estimate tr(H) (and tr(H^2)) with ``n`` Hessian-vector products.

    Args:
        objective: the operator.
        n: HVP budget. Hutch++ spends a third on a low-rank sketch, a third on its exact trace and
            a third on Rademacher probes of the deflated remainder; it needs ``n >= 3``.
        method: ``"hutch++"`` (default: far lower variance when a few eigenvalues dominate, as they
            do in neural nets) or ``"hutchinson"`` (plain Rademacher probes).
        seed: seeds the private generator of the probes.
        products_out: if given, receives the ``(v, Hv)`` pairs whose ``v`` is a plain Rademacher
            vector (Hutch++'s sketch, every probe of plain Hutchinson), for a Hessian-diagonal
            estimate at the same step to reuse (they cost two parameter-sized vectors each).
        deflate: the Krylov space of a Lanczos run at the same parameters
            (:func:`~lightning_hessian.spectrum.extremal_eigenpairs`' ``krylov_out``). Its part of
            tr(H) and tr(H^2) is exact and free (``tr(V'HV)``, ``||HV||_F^2``); the sketch and
            the probes work on the rest, ``(I - VV') H (I - VV')``. Unbiased for any space that
            does not depend on the probes; its variance is lower the more of the top of the
            spectrum the space holds (``benchmarks/bench_curvature.py --trace-reuse-only``).
        sketch: Hutch++'s sketch size (products spent twice: on the sketch and on its exact
            trace). Default ``n // 3``; with ``deflate``, 0 when the space has at least ``n // 3``
            vectors: a Krylov space that large already holds the top a random sketch would find
            (measured: the sketch then cost accuracy, 0.52 against 0.26 of Hutch++'s error alone on
            the benchmark CNN), and a smaller one is topped up by the sketch (0.64 against 1.41).
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")
    minimum = 3 if method == "hutch++" else 2
    if not isinstance(n, int) or n < minimum:
        raise ValueError(f"n must be an integer >= {minimum} for method={method!r}, got {n!r}")
    free = deflate.dim if deflate is not None else 0
    if deflate is not None and deflate.basis.n != objective.num_params:
        raise ValueError(
            f"deflate holds vectors of {deflate.basis.n} entries "
            f"but the objective has {objective.num_params} parameters"
        )
    if sketch is None:
        sketch = 0 if method == "hutchinson" or (deflate is not None and free >= n // 3) else n // 3
    if not isinstance(sketch, int) or isinstance(sketch, bool) or sketch < 0 or 2 * sketch > n:
        raise ValueError(f"sketch must be an integer in [0, n // 2 = {n // 2}], got {sketch!r}")
    if method == "hutchinson" and sketch:
        raise ValueError("sketch is Hutch++'s: method='hutchinson' takes no sketch")
    if method == "hutch++" and sketch == 0 and deflate is None:
        raise ValueError("Hutch++ needs sketch >= 1 without a deflation space (or use method='hutchinson')")
    with objective.session():
        return _hutchinson(objective, n, method, seed, products_out, deflate, sketch)


def _hutchinson(
    objective: Objective,
    n: int,
    method: str,
    seed: int,
    products_out: list[tuple[Tensor, Tensor]] | None = None,
    deflate: KrylovSpace | None = None,
    sketch: int = 0,
) -> TraceEstimate:
    start = time.perf_counter()
    before = objective.n_hvp
    gen = torch.Generator().manual_seed(seed if deflate is None else seed + DEFLATED_SEED_OFFSET)
    dim = objective.num_params
    like = objective.parameters()
    free = deflate.dim if deflate is not None else 0
    low_rank_trace = deflate.trace() if deflate is not None else 0.0
    low_rank_sq = deflate.trace_sq() if deflate is not None else 0.0

    def outside(v: Tensor) -> Tensor:  # the part of v outside the free Krylov space
        return v if deflate is None else deflate.project_out(v)

    basis: Tensor | None = None
    n_probe = n
    m = min(sketch, dim - free)
    if m > 0:
        columns = []
        for _ in range(m):
            v = _rademacher(dim, gen, like)
            hv = objective.hvp(v)
            columns.append(outside(hv))
            if products_out is not None:
                products_out.append((v, hv))
        basis, _ = torch.linalg.qr(torch.stack(columns, dim=1))  # (dim, m), orthonormal columns spanning H S
        for j in range(basis.shape[1]):
            hq = objective.hvp(basis[:, j])
            low_rank_trace += float(basis[:, j] @ hq)
            low_rank_sq += float(hq @ hq)
        n_probe = n - 2 * m
    quad, sq = [], []
    for _ in range(n_probe):
        v = outside(_rademacher(dim, gen, like))
        if basis is not None:
            v = v - basis @ (basis.T @ v)
        hv = objective.hvp(v)
        if products_out is not None and basis is None and deflate is None:
            products_out.append((v, hv))
        quad.append(float(v @ hv))
        sq.append(float(hv @ hv))
    q_mean, q_err = _mean_stderr(quad) if quad else (0.0, 0.0)
    s_mean, s_err = _mean_stderr(sq) if sq else (0.0, 0.0)
    return TraceEstimate(
        value=low_rank_trace + q_mean,
        stderr=q_err,
        n_hvp=objective.n_hvp - before,
        n_loss=0,
        n_samples=len(quad),
        trace_sq=low_rank_sq + s_mean,
        trace_sq_stderr=s_err,
        method=method,
        radius=float("nan"),
        seconds=time.perf_counter() - start,
        n_sketch=m,
        n_deflated=free,
    )


def _unit_directions(dim: int, count: int, gen: torch.Generator, like: Tensor) -> Iterator[tuple[Tensor, float]]:
    """Gaussian directions as (unit vector, squared norm), drawn one at a time."""
    for _ in range(count):
        d = torch.randn(dim, generator=gen, dtype=torch.float64)
        sq = float(d @ d)
        yield (d / math.sqrt(sq)).to(device=like.device, dtype=like.dtype), sq


def choose_slope_fit_radius(objective: Objective, seed: int = 0, n_pilot: int = 2) -> tuple[float, int]:
    """Pick the half-width ``r`` (distance along unit directions) for the slope fit; return ``(r, n_loss)``.

    Second differences ``(L(r) + L(-r) - 2 L(0)) / r^2`` are taken on a ladder of radii along a
    few pilot directions: at small ``r`` float round-off dominates (error ~ eps |L| / r^2), at
    large ``r`` higher-order terms do. The radius whose estimate agrees best with its neighbour
    on the ladder sits on the plateau between the two.
    """
    radii = np.logspace(-3, 1, 13)
    like = objective.parameters()
    gen = torch.Generator().manual_seed(seed + 104729)
    center = objective.loss()
    used = 1
    curves = []
    for u, _ in _unit_directions(like.numel(), n_pilot, gen, like):
        points = [s * r * u for r in radii for s in (1.0, -1.0)]
        values = objective.losses_at(points).numpy().reshape(len(radii), 2)
        used += len(points)
        curves.append((values.sum(axis=1) - 2 * center) / radii**2)
    curv = np.asarray(curves)
    scale = np.maximum(np.abs(curv[:, :-1]), np.abs(curv[:, 1:]))
    rel = np.abs(np.diff(curv, axis=1)) / np.maximum(scale, 1e-30)
    rel = np.where(np.isfinite(rel), rel, np.inf)
    best = int(np.argmin(np.median(rel, axis=0)))
    return float(math.sqrt(radii[best] * radii[best + 1])), used


def slope_fit_trace(
    objective: Objective,
    n_directions: int = 50,
    radius: float | None = None,
    n_points: int = 5,
    seed: int = 0,
) -> TraceEstimate:
    """Estimate tr(H) from quadratic fits of the loss along Gaussian directions, with forward passes only.

    For ``delta ~ N(0, I)``, ``g(a) = L(theta + a delta)`` has ``g''(0) = delta' H delta``, whose mean
    is tr(H). Each direction is sampled at ``n_points`` equidistant points of ``[-r, r]`` along its unit
    vector (the centre value is shared), a quadratic is fitted by least squares, and its curvature is
    rescaled by ``||delta||^2``. Works for models without double backward. On ReLU / max-pool nets
    it measures the finite-scale curvature along the line, kinks included, which can differ from
    the autograd Hessian (10 % on one ReLU CNN, 100 % on another with max-pooling in our
    benchmark): report it as its own quantity, and trust it as "the trace" on smooth nets only.

    Args:
        objective: the operator (only ``loss`` and ``losses_at`` are used).
        n_directions: number of Gaussian directions averaged.
        radius: half-width of the fit along unit directions; ``None`` chooses it
            (:func:`choose_slope_fit_radius`, about 50 extra forward passes).
        n_points: odd number >= 3 of points per direction, centre included.
        seed: seeds the private generator of the directions.
    """
    if not isinstance(n_directions, int) or n_directions < 2:
        raise ValueError(f"n_directions must be an integer >= 2, got {n_directions!r}")
    if not isinstance(n_points, int) or n_points < 3 or n_points % 2 == 0:
        raise ValueError(f"n_points must be an odd integer >= 3 (the centre is one of them), got {n_points!r}")
    if radius is not None and not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a positive finite number or None, got {radius!r}")
    with objective.session():
        return _slope_fit(objective, n_directions, radius, n_points, seed)


def _slope_fit(
    objective: Objective, n_directions: int, radius: float | None, n_points: int, seed: int
) -> TraceEstimate:
    start = time.perf_counter()
    before = objective.n_loss
    if radius is None:
        radius, _ = choose_slope_fit_radius(objective, seed=seed)
    center = objective.loss()
    offsets = np.linspace(-radius, radius, n_points)
    off_centre = np.array([a for i, a in enumerate(offsets) if i != n_points // 2])
    design = np.stack([np.ones_like(offsets), offsets, offsets**2], axis=1)
    fit = np.linalg.pinv(design)[2]  # least-squares coefficient of a^2
    like = objective.parameters()
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for u, sq in _unit_directions(like.numel(), n_directions, gen, like):
        values = objective.losses_at([float(a) * u for a in off_centre]).numpy()
        full = np.insert(values, n_points // 2, center)
        samples.append(2.0 * float(fit @ full) * sq)
    value, stderr = _mean_stderr(samples)
    return TraceEstimate(
        value=value,
        stderr=stderr,
        n_hvp=0,
        n_loss=objective.n_loss - before,
        n_samples=n_directions,
        trace_sq=float("nan"),
        trace_sq_stderr=float("nan"),
        method="slope_fit",
        radius=float(radius),
        seconds=time.perf_counter() - start,
    )
