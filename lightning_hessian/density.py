"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ), with its evidence.

For a random unit start vector ``v`` (Rademacher or Gaussian, normalised), ``m`` Lanczos steps on
the HVP operator give a tridiagonal ``T = S diag(theta) S'``. The Ritz values ``theta_j`` (nodes)
with weights ``tau_j = S[0, j]^2`` (squared *first components* of the tridiagonal's eigenvectors,
summing to one) form the Gauss quadrature rule of the measure ``sum_i (u_i.v)^2 delta(t - lambda_i)``,
whose mean over starts is the spectral density ``phi(t) = (1/N) sum_i delta(t - lambda_i)``. The rule
is exact for polynomials up to degree ``2m - 1``: the first two moments of each start are
``v'Hv`` and ``||Hv||^2``, unbiased for ``tr(H)/N`` and ``tr(H^2)/N``. Averages over starts come
with standard errors across starts; these cover the randomness of the starts, not the quadrature
error of ``m`` nodes, which shrinks like ``1/m`` in the Wasserstein distance.

Memory: with full reorthogonalisation a start holds its ``m`` Lanczos vectors (``m * N`` numbers);
when they do not fit ``basis_memory``, the plain three-term recurrence is used (three vectors),
which keeps the quadrature accurate in floating point but lets converged Ritz values repeat
("ghosts"), so outliers are then not counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from lightning_hessian._krylov import DEFAULT_BASIS_MEMORY, KrylovBasis, basis_bytes
from lightning_hessian.objective import Objective

Distribution = Literal["rademacher", "gaussian"]
MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class DensityEstimate:
    """Stochastic Lanczos quadrature of the Hessian spectrum: nodes and weights per start, and what they give.

    Attributes:
        nodes: per start, the ascending Ritz values (quadrature nodes).
        weights: per start, the quadrature weights (squared first components; each sums to 1).
        residuals: per start, the Ritz residuals ``beta_m |S[m-1, j]|`` of the nodes.
        num_params: N, the dimension of the Hessian.
        negative_mass: fraction of the spectral mass below zero, the index of a saddle over N: per
            start, the weight of the negative nodes with the two nodes on either side of zero
            counted by half (see :func:`negative_mass_bracket`); the mean over starts.
        negative_mass_stderr: its standard error across starts (NaN with one start).
        negative_mass_bounds: the mean over starts of the Chebyshev-Markov-Stieltjes bracket of each
            start's mass below zero: how finely ``n_steps`` nodes resolve the sign near zero.
        n_outliers: eigenvalues above the bulk (median over starts; see :func:`count_outliers`);
            ``None`` without reorthogonalisation.
        bulk_edge: upper edge of the bulk (median over starts; NaN when nothing is resolved).
        n_hvp: Hessian-vector products spent.
        n_steps: Lanczos steps per start (a start stops early on an invariant subspace).
        distribution: ``"rademacher"`` or ``"gaussian"`` start vectors.
        reorthogonalized: full reorthogonalisation (else the three-term recurrence).
        seed: seed of the start vectors.
        basis_bytes: memory held by the Lanczos vectors of one start.
        seconds: wall time.
    """

    nodes: tuple[np.ndarray, ...] = field(repr=False)
    weights: tuple[np.ndarray, ...] = field(repr=False)
    residuals: tuple[np.ndarray, ...] = field(repr=False)
    num_params: int
    negative_mass: float
    negative_mass_stderr: float
    negative_mass_bounds: tuple[float, float]
    n_outliers: int | None
    bulk_edge: float
    n_hvp: int
    n_steps: int
    distribution: str
    reorthogonalized: bool
    seed: int
    basis_bytes: int
    seconds: float

    @property
    def n_starts(self) -> int:
        """Number of random starts averaged."""
        return len(self.nodes)

    @property
    def lambda_min_ritz(self) -> float:
        """Smallest node: an upper bound on lambda_min (Ritz values lie inside the spectrum)."""
        return float(min(x[0] for x in self.nodes))

    @property
    def lambda_max_ritz(self) -> float:
        """Largest node: a lower bound on lambda_max."""
        return float(max(x[-1] for x in self.nodes))

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All nodes and weights as one discrete measure (weights divided by the number of starts), ascending."""
        nodes = np.concatenate(self.nodes)
        weights = np.concatenate(self.weights) / self.n_starts
        order = np.argsort(nodes, kind="stable")
        return nodes[order], weights[order]

    def moment(self, power: int) -> tuple[float, float]:
        """Estimate of ``tr(H^power) / N`` and its standard error across starts."""
        if not isinstance(power, int) or power < 0:
            raise ValueError(f"power must be a non-negative integer, got {power!r}")
        return _mean_stderr([float(np.sum(w * x**power)) for x, w in zip(self.nodes, self.weights)])

    def mass_below(self, threshold: float) -> tuple[float, float]:
        """Fraction of the spectrum below ``threshold`` and its standard error across starts."""
        return _mean_stderr([float(np.sum(w[x < threshold])) for x, w in zip(self.nodes, self.weights)])

    def cdf(self, points: np.ndarray) -> np.ndarray:
        """The estimated cumulative distribution of the eigenvalues at ``points``."""
        nodes, weights = self.pooled()
        cum = np.concatenate([[0.0], np.cumsum(weights)])
        return cum[np.searchsorted(nodes, np.asarray(points, dtype=np.float64), side="right")]  # type: ignore[no-any-return]

    def default_sigma(self) -> float:
        """Broadening used by :meth:`density` by default: 1 % of the node range (at least 1e-12)."""
        return max(0.01 * (self.lambda_max_ritz - self.lambda_min_ritz), 1e-12)

    def density(
        self, grid: np.ndarray | None = None, sigma: float | None = None, n_grid: int = 512
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian-broadened density on ``grid``: ``(grid, phi)`` with ``phi`` integrating to about 1.

        ``sigma`` defaults to :meth:`default_sigma`; the default grid spans the nodes plus ``4 sigma``.
        """
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
        if grid is None:
            if not (isinstance(n_grid, int) and n_grid >= 2):
                raise ValueError(f"n_grid must be an integer >= 2, got {n_grid!r}")
            grid = np.linspace(self.lambda_min_ritz - 4 * sigma, self.lambda_max_ritz + 4 * sigma, n_grid)
        grid = np.asarray(grid, dtype=np.float64)
        nodes, weights = self.pooled()
        z = (grid[:, None] - nodes[None, :]) / sigma
        phi = np.exp(-0.5 * z**2) @ weights / (sigma * math.sqrt(2 * math.pi))
        return grid, phi

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (nodes, weights, residuals padded with NaN to ``(n_starts, steps)``) for saving."""
        width = max(len(x) for x in self.nodes)

        def pad(parts: tuple[np.ndarray, ...]) -> np.ndarray:
            out = np.full((len(parts), width), np.nan)
            for i, p in enumerate(parts):
                out[i, : len(p)] = p
            return out

        return {"nodes": pad(self.nodes), "weights": pad(self.weights), "residuals": pad(self.residuals)}

    def scalars(self) -> dict[str, float | int | str | bool | None]:
        """The scalar fields (what goes into a file's metadata)."""
        return {
            "num_params": self.num_params,
            "negative_mass": self.negative_mass,
            "negative_mass_stderr": self.negative_mass_stderr,
            "negative_mass_lower": self.negative_mass_bounds[0],
            "negative_mass_upper": self.negative_mass_bounds[1],
            "n_outliers": self.n_outliers,
            "bulk_edge": self.bulk_edge,
            "n_hvp": self.n_hvp,
            "n_steps": self.n_steps,
            "distribution": self.distribution,
            "reorthogonalized": self.reorthogonalized,
            "seed": self.seed,
            "basis_bytes": self.basis_bytes,
            "seconds": self.seconds,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], scalars: dict[str, object]) -> DensityEstimate:
        """Inverse of :meth:`to_arrays` plus :meth:`scalars` (missing scalars become NaN / 0)."""

        def unpad(a: np.ndarray) -> tuple[np.ndarray, ...]:
            return tuple(row[np.isfinite(row)].astype(np.float64) for row in np.atleast_2d(a))

        def num(key: str, default: float = float("nan")) -> float:
            value = scalars.get(key)
            return default if value is None else float(value)  # type: ignore[arg-type]

        return cls(
            nodes=unpad(arrays["nodes"]),
            weights=unpad(arrays["weights"]),
            residuals=unpad(arrays["residuals"]),
            num_params=int(num("num_params", 0)),
            negative_mass=num("negative_mass"),
            negative_mass_stderr=num("negative_mass_stderr"),
            negative_mass_bounds=(num("negative_mass_lower"), num("negative_mass_upper")),
            n_outliers=None if scalars.get("n_outliers") is None else int(num("n_outliers")),
            bulk_edge=num("bulk_edge"),
            n_hvp=int(num("n_hvp", 0)),
            n_steps=int(num("n_steps", 0)),
            distribution=str(scalars.get("distribution", "rademacher")),
            reorthogonalized=bool(scalars.get("reorthogonalized", True)),
            seed=int(num("seed", 0)),
            basis_bytes=int(num("basis_bytes", 0)),
            seconds=num("seconds"),
        )


def _mean_stderr(samples: list[float]) -> tuple[float, float]:
    arr = np.asarray(samples, dtype=np.float64)
    if arr.size < 2:
        return float(arr.mean()), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size))


def start_vector(n: int, distribution: Distribution, gen: torch.Generator) -> Tensor:
    """A random start vector (float64, CPU): Rademacher signs or standard Gaussian entries."""
    if distribution == "rademacher":
        return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    return torch.randn(n, generator=gen, dtype=torch.float64)


def lanczos_quadrature(
    matvec: MatVec,
    v0: Tensor,
    steps: int,
    basis: KrylovBasis | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``steps`` Lanczos steps from ``v0``; return ``(nodes, weights, residuals, products)``.

    With a ``basis`` the Lanczos vectors are fully reorthogonalised against it (classical
    Gram-Schmidt twice); with ``None`` the three-term recurrence runs on three vectors. A start
    stops early when the Krylov space becomes invariant (the rule is then exact for this start).
    """
    dtype = v0.dtype
    eps = float(torch.finfo(dtype).eps)  # breakdown is judged in the work precision
    q = v0 / v0.norm()
    q_prev: Tensor | None = None
    alphas: list[float] = []
    betas: list[float] = []
    beta_last = 0.0
    scale = 0.0
    n_mv = 0
    if basis is not None:
        basis.set(0, q)
    for j in range(steps):
        w = matvec(basis.get(j) if basis is not None else q)
        n_mv += 1
        if basis is not None:
            alpha = 0.0
            for _ in range(2):
                coeffs = basis.dot(j + 1, w)
                alpha += float(coeffs[j])
                w = basis.subtract(j + 1, coeffs, w)
        else:
            alpha = float(q @ w)
            w = w - alpha * q
            if q_prev is not None:
                w = w - betas[-1] * q_prev
        alphas.append(alpha)
        beta = float(w.norm())
        scale = max(scale, abs(alpha) + beta + (betas[-1] if betas else 0.0))
        if j == steps - 1 or beta <= 100 * eps * max(scale, 1e-30):
            beta_last = beta
            break
        betas.append(beta)
        if basis is not None:
            basis.set(j + 1, w / beta)
        else:
            q_prev, q = q, w / beta
    a = np.asarray(alphas)
    if len(a) == 1:
        theta, s = a.copy(), np.ones((1, 1))
    else:
        theta, s = scipy.linalg.eigh_tridiagonal(a, np.asarray(betas))
    weights = s[0, :] ** 2
    residuals = beta_last * np.abs(s[-1, :])
    return theta, weights / weights.sum(), residuals, n_mv


def negative_mass_bracket(nodes: np.ndarray, weights: np.ndarray) -> tuple[float, float, float]:
    """One start's mass below zero: ``(estimate, lower, upper)``.

    Gauss quadrature brackets the distribution function of the start's measure at every point
    between two nodes (Chebyshev-Markov-Stieltjes): at zero, between the weight of the negative
    nodes less the last negative one and that weight plus the first non-negative one. The
    estimate is the midpoint, i.e. the two nodes next to zero count by half, which is far less
    erratic than the sharp count when many eigenvalues sit near zero.
    """
    j = int(np.searchsorted(nodes, 0.0))  # nodes[:j] < 0 <= nodes[j:]
    below = float(np.sum(weights[:j]))
    lower = below - (float(weights[j - 1]) if j > 0 else 0.0)
    upper = below + (float(weights[j]) if j < len(nodes) else 0.0)
    return 0.5 * (lower + upper), lower, upper


def count_outliers(nodes: np.ndarray, residuals: np.ndarray, tol: float) -> tuple[int, float]:
    """Outliers above the bulk in one start's quadrature: ``(count, bulk_edge)``.

    A node is *resolved* when its residual is at most ``tol`` times the node range: Lanczos has
    converged it to an individual eigenvalue, which happens to eigenvalues isolated from the
    rest, never inside a dense bulk. Take the resolved nodes above the largest unresolved node
    (which bounds the dense bulk) and the largest gap among them and down to that node: the
    outliers are the resolved nodes above that gap, and the bulk edge is the node just below it.
    Count 0 (edge NaN) when no node above the bulk is resolved. Needs a reorthogonalised basis:
    the three-term recurrence repeats converged values and leaves half-formed copies in between.
    """
    width = max(float(nodes[-1] - nodes[0]), 1e-300)
    resolved = residuals <= tol * width
    unresolved = np.flatnonzero(~resolved)
    first = int(unresolved[-1]) + 1 if unresolved.size else 0
    above = nodes[first:]
    if above.size == 0:
        return 0, float("nan")
    values = np.concatenate([[nodes[first - 1]], above]) if first > 0 else above
    if values.size < 2:
        return 0, float("nan")
    cut = int(np.argmax(np.diff(values)))  # the largest gap lies between values[cut] and values[cut + 1]
    return int(values.size - cut - 1), float(values[cut])


def spectral_density(
    objective: Objective,
    max_hvp: int = 160,
    n_starts: int = 4,
    *,
    distribution: Distribution = "rademacher",
    seed: int = 0,
    outlier_tol: float = 1e-4,
    reorthogonalize: bool | None = None,
    basis_memory: float = DEFAULT_BASIS_MEMORY,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
) -> DensityEstimate:
    """Stochastic Lanczos quadrature of the objective's Hessian spectrum with ``max_hvp`` products.

    Args:
        objective: the operator (only ``hvp`` is used).
        max_hvp: HVP budget, split evenly: ``max_hvp // n_starts`` Lanczos steps per start (at most N).
        n_starts: random start vectors averaged (at least 2 for standard errors).
        distribution: ``"rademacher"`` (default) or ``"gaussian"`` entries, from a private generator.
        seed: seeds the start vectors.
        outlier_tol: a node counts as resolved (an individual eigenvalue) when its Ritz residual is
            at most ``outlier_tol`` times the node range; outliers are the resolved nodes above the
            bulk, cut at their largest gap (:func:`count_outliers`). The count is the median over starts.
        reorthogonalize: full reorthogonalisation (``None``: when one start's vectors fit ``basis_memory``).
        basis_memory: bytes the Lanczos vectors of one start may take (with ``reorthogonalize=None``).
        basis_dtype, basis_device: where and how the Lanczos vectors are stored
            (:class:`~lightning_hessian._krylov.KrylovBasis`); default: the parameters' dtype and device.
    """
    if not isinstance(n_starts, int) or n_starts < 1:
        raise ValueError(f"n_starts must be a positive integer, got {n_starts!r}")
    if not isinstance(max_hvp, int) or max_hvp < 2 * n_starts:
        raise ValueError(f"max_hvp must be an integer of at least 2 * n_starts = {2 * n_starts}, got {max_hvp!r}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    if not (isinstance(outlier_tol, float | int) and 0 < outlier_tol < 1):
        raise ValueError(f"outlier_tol must be in (0, 1), got {outlier_tol!r}")
    if not (math.isfinite(basis_memory) and basis_memory > 0):
        raise ValueError(f"basis_memory must be a positive number of bytes, got {basis_memory!r}")
    start = time.perf_counter()
    n = objective.num_params
    steps = min(max_hvp // n_starts, n)
    dtype, device = objective.dtype, objective.device
    itemsize = torch.empty((), dtype=basis_dtype or dtype).element_size()
    if reorthogonalize is None:
        reorthogonalize = basis_bytes(steps, n, itemsize) - n * itemsize <= basis_memory
    basis = (
        KrylovBasis(steps, n, dtype=dtype, device=device, storage_dtype=basis_dtype, storage_device=basis_device)
        if reorthogonalize
        else None
    )
    gen = torch.Generator().manual_seed(seed)
    before = objective.n_hvp
    nodes, weights, residuals = [], [], []
    with objective.session():
        for _ in range(n_starts):
            v0 = start_vector(n, distribution, gen).to(device=device, dtype=dtype)
            theta, tau, res, _ = lanczos_quadrature(objective.hvp, v0, steps, basis)
            nodes.append(theta)
            weights.append(tau)
            residuals.append(res)
    brackets = np.array([negative_mass_bracket(x, w) for x, w in zip(nodes, weights)])
    negative_mass, negative_mass_stderr = _mean_stderr(list(brackets[:, 0]))
    n_outliers: int | None = None
    bulk_edge = float("nan")
    if reorthogonalize:
        counted = [count_outliers(x, r, outlier_tol) for x, r in zip(nodes, residuals)]
        n_outliers = int(np.floor(np.median([c for c, _ in counted])))
        edges = np.array([e for _, e in counted])
        bulk_edge = float(np.nanmedian(edges)) if np.isfinite(edges).any() else float("nan")
    return DensityEstimate(
        nodes=tuple(nodes),
        weights=tuple(weights),
        residuals=tuple(residuals),
        num_params=n,
        negative_mass=negative_mass,
        negative_mass_stderr=negative_mass_stderr,
        negative_mass_bounds=(float(brackets[:, 1].mean()), float(brackets[:, 2].mean())),
        n_outliers=n_outliers,
        bulk_edge=bulk_edge,
        n_hvp=objective.n_hvp - before,
        n_steps=steps,
        distribution=distribution,
        reorthogonalized=bool(reorthogonalize),
        seed=seed,
        basis_bytes=basis.nbytes if basis is not None else 0,
        seconds=time.perf_counter() - start,
    )
