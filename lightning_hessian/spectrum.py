"""Extremal Hessian eigenpairs: Lanczos on HVPs with a Ritz-residual stop, warm starts, and an ARPACK reference.

One Krylov space gives both ends of the spectrum. Lanczos keeps full reorthogonalisation with
its basis on the model's device; the small projected problem is solved by
``scipy.linalg.eigh_tridiagonal`` (``scipy.linalg.eigh`` after a thick restart). A Ritz value
is reported as converged only when the error bound from its residual ``||H y - theta y||`` meets
the tolerance:

- top values: ``bound <= tol * |theta|`` (relative accuracy);
- the bottom value: ``bound <= tol_min * (theta_max - theta_min)``, i.e. relative to the norm of
  the shifted operator ``H - lambda_max I`` of Böttcher & Wheeler's Appendix B, whose
  largest-magnitude eigenvalue ``lambda_min - lambda_max`` is what is resolved there. Its own
  tolerance defaults to 1e-3 of the width: the bottom sits at the edge of a dense bulk, where
  each further digit costs many products (``benchmarks/bench_curvature.py`` prints the table);

where ``bound = r``, the Ritz residual itself: some eigenvalue of ``H`` lies within ``r`` of
``theta`` (the residual theorem), whatever the rest of the spectrum, so the bound is certified.
The actual error is usually far smaller (about ``r^2 / gap``), but that refinement (Kahan-Parlett-
Jiang) needs the gap to the *true* rest of the spectrum, and the gap between Ritz values can
overestimate it: an eigenvalue the Krylov space has not yet seen may sit inside it (a planted
spectrum with a cluster at the top showed it), so it is neither reported nor used to stop. A
bound certifies that *an* eigenvalue lies that close; that it is the extreme one rests on
Lanczos finding the ends of the spectrum first (the largest Ritz value is always a lower bound
on ``lambda_max`` and the smallest an upper bound on ``lambda_min``).
Residuals and bounds are reported with every value.

Krylov spaces are shift-invariant, so Lanczos on ``H - lambda_max I`` has the same Ritz vectors as
on ``H``: when the basis is full before the bottom has converged, the run is thick-restarted
keeping the Ritz vectors of both ends, which is how the bottom end is refined within the budget.

Memory: the basis holds ``max_basis + 1`` parameter-sized vectors. By default ``max_basis`` is
chosen from a memory bound (:func:`~lightning_hessian._krylov.auto_max_basis`: 100 vectors when
they fit 2 GiB, else as many as fit, never fewer than 30), and the basis can live in host
memory or in a 16-bit format with every projection accumulated in float64
(:class:`~lightning_hessian._krylov.KrylovBasis`); ``EigenResult.basis_bytes`` states it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
from torch import Tensor

from lightning_hessian._krylov import DEFAULT_BASIS_MEMORY, KrylovBasis, KrylovSpace, auto_max_basis
from lightning_hessian.objective import Objective

MIN_BOTTOM_PRODUCTS = 20  # products before lambda_min may be declared converged
Which = Literal["both", "top"]
Solver = Literal["lanczos", "arpack"]
MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class EigenResult:
    """Extremal eigenpairs with their evidence.

    Attributes:
        lambda_max: largest eigenvalue.
        lambda_min: most negative eigenvalue (smallest positive one when H is positive definite);
            NaN when ``which="top"``.
        eigenvalues: the top-k eigenvalues, descending.
        eigenvectors: unit eigenvectors of ``eigenvalues``, shape ``(k, N)``, on the model's device.
        vector_min: unit eigenvector of ``lambda_min`` (``None`` when ``which="top"``).
        residuals: ``||H y - theta y||`` for each top value.
        residual_min: the same for ``lambda_min``.
        error_bounds: certified bounds on the error of each top value: the residual (an eigenvalue lies that close).
        error_bound_min: the same for ``lambda_min``.
        converged_max: every top value met the tolerance.
        converged_min: ``lambda_min`` met the tolerance (False when not computed).
        n_hvp: Hessian-vector products spent in total.
        n_hvp_top: products spent when the top values had converged (``None`` if they never did).
        ritz_values: every Ritz value of the final Krylov space, ascending (a coarse spectrum picture).
        solver, tol, seconds: how it was obtained.
        tol_min: the tolerance of ``lambda_min`` (relative to the spectral width).
        max_basis, basis_bytes: Lanczos vectors held at most, and the memory they took.
    """

    lambda_max: float
    lambda_min: float
    eigenvalues: tuple[float, ...]
    eigenvectors: Tensor = field(repr=False)
    vector_min: Tensor | None = field(repr=False)
    residuals: tuple[float, ...]
    residual_min: float
    error_bounds: tuple[float, ...]
    error_bound_min: float
    converged_max: bool
    converged_min: bool
    n_hvp: int
    n_hvp_top: int | None
    ritz_values: tuple[float, ...] = field(repr=False)
    solver: str
    tol: float
    seconds: float
    tol_min: float = float("nan")
    max_basis: int = 0
    basis_bytes: int = 0

    @property
    def converged(self) -> bool:
        """All requested values converged (the bottom counts only when it was requested)."""
        return self.converged_max and (self.vector_min is None or self.converged_min)

    @property
    def negative_ratio(self) -> float:
        """``|lambda_min| / lambda_max`` for a negative ``lambda_min`` (the saddle signal), else 0."""
        if self.vector_min is None or not self.lambda_max > 0:
            return float("nan")
        return max(0.0, -self.lambda_min) / self.lambda_max


@dataclass
class _LanczosOutcome:
    ritz: np.ndarray  # ascending Ritz values of the final projected matrix
    top_values: np.ndarray
    top_vectors: Tensor
    top_residuals: np.ndarray
    top_bounds: np.ndarray
    min_value: float
    min_vector: Tensor | None
    min_residual: float
    min_bound: float
    converged_top: bool
    converged_min: bool
    n_matvec: int
    n_matvec_top: int | None
    basis_bytes: int = 0
    krylov: KrylovSpace | None = None


def extremal_eigenpairs(
    objective: Objective,
    k: int = 1,
    tol: float = 1e-4,
    max_hvp: int = 200,
    init: EigenResult | Tensor | None = None,
    seed: int = 0,
    *,
    which: Which = "both",
    solver: Solver = "lanczos",
    max_basis: int | None = None,
    tol_min: float = 1e-3,
    basis_memory: float = DEFAULT_BASIS_MEMORY,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    guide: Tensor | None = None,
    krylov_out: list[KrylovSpace] | None = None,
) -> EigenResult:
    """Largest ``k`` eigenvalues and the most negative eigenvalue of the objective's Hessian.

    Args:
        objective: the operator (its ``hvp`` is all that is used).
        k: number of largest eigenvalues (with vectors) to converge.
        tol: residual tolerance of the top values, relative to ``|lambda|``.
        max_hvp: hard budget of Hessian-vector products; unconverged values say so.
        init: a previous :class:`EigenResult` (warm start from its vectors) or a start vector.
        seed: seeds the random start vector; results are deterministic for a given seed.
        which: ``"both"`` ends, or ``"top"`` only (cheaper when the saddle signal is not wanted).
        solver: ``"lanczos"`` (ours) or ``"arpack"`` (``scipy.sparse.linalg.eigsh`` reference).
        max_basis: most Lanczos vectors held at once (memory ``(max_basis + 1) * N`` numbers); thick
            restart beyond. ``None``: from ``basis_memory`` (:func:`~lightning_hessian._krylov.auto_max_basis`).
        tol_min: residual tolerance of ``lambda_min``, relative to the spectral width
            ``lambda_max - lambda_min``. The default 1e-3 resolves the curve and the sign a monitor
            needs (a negative Ritz value certifies negative curvature); 1e-4 is the strict value.
            ``lambda_min`` is never declared converged before ``MIN_BOTTOM_PRODUCTS`` (20) products.
        basis_memory: bytes the basis may take when ``max_basis`` is ``None`` (default 2 GiB).
        basis_dtype, basis_device: storage of the basis (default: the parameters' dtype and device);
            e.g. ``basis_device="cpu"`` for host memory, ``torch.bfloat16`` / ``torch.float16`` for
            half the memory (accuracy then limited to about that format's precision times ||H||).
        guide: a direction expected to overlap the top eigenvectors, such as the loss gradient
            early in training: added as a unit vector to the start (the warm vectors or a random
            vector), so it pays only when the overlap is large (see
            :class:`~lightning_hessian.instruments.Eigenvalues`' ``gradient_start``).
        krylov_out: if given, receives the run's final :class:`~lightning_hessian._krylov.KrylovSpace`
            (its basis and ``V'HV``), for a trace estimate at the same step to deflate for free
            (:func:`~lightning_hessian.trace.hutchinson_trace`'s ``deflate``). It holds the basis's
            memory for as long as it is kept (``EigenResult.basis_bytes``). Lanczos only.
    """
    n = objective.num_params
    itemsize = torch.empty((), dtype=basis_dtype or objective.dtype).element_size()
    if max_basis is None:
        max_basis = min(auto_max_basis(n, itemsize, basis_memory, minimum=k + 6), max(n, k + 6))
    _check_args(k, tol, max_hvp, which, solver, max_basis)
    if not tol_min > 0:
        raise ValueError(f"tol_min must be positive, got {tol_min!r}")
    if k >= n:
        raise ValueError(f"k={k} must be smaller than the number of parameters ({n})")
    start = time.perf_counter()
    before = objective.n_hvp
    v0, warm = _start_vector(init, n, which, seed, objective.device, objective.dtype)
    if guide is not None:
        v0, guided = _guided(v0, guide, n)
        warm = warm or guided
    with objective.session():
        if solver == "arpack":
            outcome = _arpack(
                objective.hvp, n, v0, k=k, tol=tol, tol_min=tol_min, max_matvec=max_hvp, want_bottom=which == "both"
            )
        else:
            run = functools.partial(
                lanczos,
                objective.hvp,
                v0,
                k=k,
                tol=tol,
                tol_min=tol_min,
                max_matvec=max_hvp,
                max_basis=max_basis,
                want_bottom=which == "both",
                warm=warm,
                seed=seed,
                basis_dtype=basis_dtype,
                basis_device=basis_device,
                keep_basis=krylov_out is not None,
            )
            # hvp="auto" checks symmetry itself, on random vectors: Lanczos's own vectors see only
            # a 1/sqrt(N) share of an asymmetry, too little to catch a wrong double backward.
            outcome = run()
            if krylov_out is not None and outcome.krylov is not None:
                krylov_out.append(outcome.krylov)
    return EigenResult(
        lambda_max=float(outcome.top_values[0]),
        lambda_min=outcome.min_value,
        eigenvalues=tuple(float(x) for x in outcome.top_values),
        eigenvectors=outcome.top_vectors,
        vector_min=outcome.min_vector,
        residuals=tuple(float(x) for x in outcome.top_residuals),
        residual_min=outcome.min_residual,
        error_bounds=tuple(float(x) for x in outcome.top_bounds),
        error_bound_min=outcome.min_bound,
        converged_max=outcome.converged_top,
        converged_min=outcome.converged_min,
        n_hvp=objective.n_hvp - before,
        n_hvp_top=outcome.n_matvec_top,
        ritz_values=tuple(float(x) for x in outcome.ritz),
        solver=solver,
        tol=tol,
        seconds=time.perf_counter() - start,
        tol_min=tol_min,
        max_basis=max_basis,
        basis_bytes=outcome.basis_bytes,
    )


def _check_args(k: int, tol: float, max_hvp: int, which: str, solver: str, max_basis: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if not isinstance(max_hvp, int) or max_hvp < k + 1:
        raise ValueError(f"max_hvp must be an integer of at least k + 1 = {k + 1}, got {max_hvp!r}")
    if which not in ("both", "top"):
        raise ValueError(f"which must be 'both' or 'top', got {which!r}")
    if solver not in ("lanczos", "arpack"):
        raise ValueError(f"solver must be 'lanczos' or 'arpack', got {solver!r}")
    if not isinstance(max_basis, int) or max_basis < k + 6:
        raise ValueError(f"max_basis must be an integer of at least k + 6 = {k + 6}, got {max_basis!r}")


def _random_vector(n: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _start_vector(
    init: EigenResult | Tensor | None, n: int, which: str, seed: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, bool]:
    """The Lanczos start vector and whether it is a warm start."""
    if init is None:
        v = _random_vector(n, seed, device, dtype)
        return v / v.norm(), False
    if isinstance(init, EigenResult):
        parts = list(init.eigenvectors)
        if which == "both" and init.vector_min is not None:
            parts.append(init.vector_min)
        v = torch.stack([p.to(device=device, dtype=dtype) for p in parts]).sum(0)
    else:
        v = init.to(device=device, dtype=dtype).reshape(-1)
    if v.numel() != n:
        raise ValueError(f"init has {v.numel()} entries but the objective has {n} parameters")
    norm = v.norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        raise ValueError("init must be a finite, non-zero vector")
    return v / norm, True


def _guided(v0: Tensor, guide: Tensor, n: int) -> tuple[Tensor, bool]:
    """The unit start ``v0`` plus the unit ``guide``, and whether the guide was used (not when zero or not finite)."""
    g = guide.to(device=v0.device, dtype=v0.dtype).reshape(-1)
    if g.numel() != n:
        raise ValueError(f"guide has {g.numel()} entries but the objective has {n} parameters")
    norm = g.norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return v0, False
    v = v0 + g / norm
    norm = v.norm()
    return (v / norm, True) if float(norm) > 0 else (v0, False)


class AsymmetricOperatorError(RuntimeError):
    """Lanczos saw ``v0'H v1 != v1'H v0``: the operator is not symmetric."""


@dataclass
class _Assessment:
    theta: np.ndarray
    s: np.ndarray
    residuals: np.ndarray
    bounds: np.ndarray
    top_idx: np.ndarray
    top_ok: bool
    bottom_ok: bool


def _assess(
    theta: np.ndarray,
    s: np.ndarray,
    beta: float,
    k: int,
    tol: float,
    want_bottom: bool,
    eps: float,
    tol_min: float | None = None,
    bottom_allowed: bool = True,
) -> _Assessment:
    """Residuals, error bounds and the convergence verdict of the current Ritz pairs."""
    m = len(theta)
    radius = max(abs(theta[0]), abs(theta[-1]), 1e-30)
    res = _residuals(beta, s, eps * radius)
    err = res  # the certified bound (module docstring): no Ritz-gap refinement
    top_idx = np.arange(m - 1, max(m - 1 - k, -1), -1)
    top_ok = len(top_idx) == k and bool(np.all(err[top_idx] <= tol * np.maximum(np.abs(theta[top_idx]), 1e-3 * radius)))
    width = max(theta[-1] - theta[0], eps * radius)
    bottom_tol = tol if tol_min is None else tol_min
    bottom_ok = (not want_bottom) or (bottom_allowed and m > k and bool(err[0] <= bottom_tol * width))
    return _Assessment(theta, s, res, err, top_idx, top_ok, bottom_ok)


def lanczos(
    matvec: MatVec,
    v0: Tensor,
    *,
    k: int = 1,
    tol: float = 1e-4,
    max_matvec: int = 200,
    max_basis: int = 100,
    want_bottom: bool = True,
    warm: bool = False,
    seed: int = 0,
    symmetry_check: Callable[[float, float], bool] | None = None,
    tol_min: float | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    keep_basis: bool = False,
) -> _LanczosOutcome:
    """Lanczos with full reorthogonalisation and thick restart on any symmetric ``matvec``.

    Stops as soon as the error bounds of the top ``k`` Ritz values (and of the bottom one, if
    wanted) meet the tolerance, or when ``max_matvec`` products are spent. The bound of a Ritz
    value is its residual ``r``, which certifies an eigenvalue within ``r`` (no Ritz-gap
    refinement: Ritz gaps can hide an unseen eigenvalue). ``warm`` marks a start vector that is
    not random (a breakdown then injects a random direction before stopping). ``symmetry_check(a, b)`` receives
    ``v1'H v0`` and ``v0'H v1`` after the second product; returning False raises
    :class:`AsymmetricOperatorError`. ``tol_min`` is the bottom value's tolerance (default ``tol``);
    ``basis_dtype``/``basis_device`` say where the basis is stored (:class:`KrylovBasis`);
    ``keep_basis`` returns it with ``V'HV`` as the outcome's ``krylov`` (:class:`KrylovSpace`).
    """
    n = v0.numel()
    dtype, device = v0.dtype, v0.device
    cap = min(max_basis, n)
    basis = KrylovBasis(cap + 1, n, dtype=dtype, device=device, storage_dtype=basis_dtype, storage_device=basis_device)
    proj = np.zeros((cap + 1, cap + 1))  # projected matrix V^T H V (tridiagonal, or arrowhead after restart)
    basis.set(0, v0 / v0.norm())
    m = 0  # vectors in the basis whose product has been taken
    restarted = False
    injected = not warm
    n_mv = 0
    n_mv_top: int | None = None
    eps = float(torch.finfo(dtype).eps)  # breakdown is judged in the work precision, residuals in the basis's
    while True:
        w = matvec(basis.get(m))
        n_mv += 1
        first_coeff = 0.0
        for sweep in range(2):  # classical Gram-Schmidt, twice: full reorthogonalisation
            coeffs = basis.dot(m + 1, w)
            if sweep == 0 and m == 1:
                first_coeff = float(coeffs[0])
            w = basis.subtract(m + 1, coeffs, w)
            proj[m, m] += float(coeffs[m])
        beta = float(w.norm())
        m += 1
        if symmetry_check is not None and m == 2 and not restarted and not symmetry_check(proj[0, 1], first_coeff):
            raise AsymmetricOperatorError(f"v1'Hv0 = {proj[0, 1]:.4g} but v0'Hv1 = {first_coeff:.4g}")
        theta, s = _eig_projected(proj[:m, :m], restarted)
        # The bottom is never declared converged from fewer than MIN_BOTTOM_PRODUCTS products: in a
        # smaller Krylov space a well-isolated Ritz value may have converged to the second-lowest
        # eigenvalue before the lowest one has shown up (seen at tol_min=1e-3 after 7 products).
        allowed = n_mv >= min(MIN_BOTTOM_PRODUCTS, n)
        state = _assess(theta, s, beta, k, tol, want_bottom, basis.eps, tol_min, allowed)
        if state.top_ok and n_mv_top is None:
            n_mv_top = n_mv
        breakdown = beta <= 100 * eps * max(abs(theta[0]), abs(theta[-1]), 1e-30)
        if state.top_ok and state.bottom_ok and not (breakdown and not injected):
            break
        if n_mv >= max_matvec or m >= n:
            break
        if breakdown:
            # Invariant subspace: continue with a fresh random direction (coupling 0).
            w = _random_vector(n, seed + 7919 + n_mv, device, dtype)
            for _ in range(2):
                w = basis.subtract(m, basis.dot(m, w), w)
            beta_next, injected = 0.0, True
            if float(w.norm()) <= eps:
                break
            w = w / w.norm()
        else:
            beta_next = beta
            w = w / beta
        if m >= cap:
            m = _thick_restart(basis, proj, theta, s, beta_next, w, k, want_bottom)
            restarted = True
            continue
        basis.set(m, w)
        proj[m - 1, m] = proj[m, m - 1] = beta_next
    vectors = state.s.T  # rows: coefficients of the Ritz vectors in the basis
    top_idx = state.top_idx
    top_vectors = _normalise_rows(basis.combine(torch.as_tensor(vectors[top_idx]), m))
    min_vector = None
    min_value, min_res, min_bound = float("nan"), float("nan"), float("nan")
    if want_bottom:
        min_vector = _normalise_rows(basis.combine(torch.as_tensor(vectors[:1]), m))[0]
        min_value, min_res, min_bound = float(theta[0]), float(state.residuals[0]), float(state.bounds[0])
    return _LanczosOutcome(
        ritz=state.theta,
        top_values=state.theta[top_idx],
        top_vectors=top_vectors,
        top_residuals=state.residuals[top_idx],
        top_bounds=state.bounds[top_idx],
        min_value=min_value,
        min_vector=min_vector,
        min_residual=min_res,
        min_bound=min_bound,
        converged_top=state.top_ok,
        converged_min=want_bottom and state.bottom_ok,
        n_matvec=n_mv,
        n_matvec_top=n_mv_top,
        basis_bytes=basis.nbytes,
        krylov=KrylovSpace(basis, m, proj, beta) if keep_basis else None,
    )


def _residuals(beta: float, s: np.ndarray, floor: float) -> np.ndarray:
    """Ritz residuals ``beta * |last component|``, floored at the precision of a product (``eps * ||H||``).

    In exact arithmetic the estimate keeps shrinking; in floating point the true residual cannot
    go below the rounding error of an HVP, so smaller numbers would overstate the accuracy.
    """
    return np.maximum(beta * np.abs(s[-1, :]), floor)  # type: ignore[no-any-return]


def _eig_projected(t: np.ndarray, restarted: bool) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the projected matrix: tridiagonal solver unless a restart made it arrowhead."""
    if restarted:
        return scipy.linalg.eigh(t)  # type: ignore[no-any-return]
    return scipy.linalg.eigh_tridiagonal(np.diag(t).copy(), np.diag(t, 1).copy())  # type: ignore[no-any-return]


def _thick_restart(
    basis: KrylovBasis,
    proj: np.ndarray,
    theta: np.ndarray,
    s: np.ndarray,
    beta: float,
    next_vector: Tensor,
    k: int,
    want_bottom: bool,
) -> int:
    """Keep the wanted Ritz vectors of both ends, couple them to the next Lanczos vector; return the new size."""
    m = len(theta)
    keep_top = list(range(m - 1, max(m - 1 - (k + 3), -1), -1))
    # At least two fresh Lanczos vectors between restarts: a small basis keeps fewer bottom vectors.
    keep_bottom = list(range(min(4, max(1, m - 2 - len(keep_top))))) if want_bottom else []
    keep = sorted(set(keep_top) | set(keep_bottom))
    p = len(keep)
    basis.restart(torch.as_tensor(s[:, keep].T.copy()), m)  # in place: no p extra vectors
    basis.set(p, next_vector)
    proj[:] = 0.0
    proj[np.arange(p), np.arange(p)] = theta[keep]
    coupling = beta * s[-1, keep]
    proj[:p, p] = coupling
    proj[p, :p] = coupling
    return p


def _normalise_rows(x: Tensor) -> Tensor:
    out: Tensor = x / x.norm(dim=1, keepdim=True)
    return out


class _BudgetExhausted(Exception):
    pass


def _arpack(
    matvec: MatVec, n: int, v0: Tensor, *, k: int, tol: float, tol_min: float, max_matvec: int, want_bottom: bool
) -> _LanczosOutcome:
    """Reference: ``scipy.sparse.linalg.eigsh`` (which='LA', then which='SA') on a LinearOperator of HVPs."""
    dtype, device = v0.dtype, v0.device
    count = 0

    def mv(x: np.ndarray) -> np.ndarray:
        nonlocal count
        if count >= max_matvec:
            raise _BudgetExhausted
        count += 1
        t = torch.as_tensor(np.asarray(x).reshape(-1), dtype=dtype, device=device)
        return matvec(t).detach().to(torch.float64).cpu().numpy()

    op = scipy.sparse.linalg.LinearOperator((n, n), matvec=mv, dtype=np.float64)  # type: ignore[call-arg]
    start = v0.detach().to(torch.float64).cpu().numpy()

    def solve(which: str, kk: int, tol: float) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            vals, vecs = scipy.sparse.linalg.eigsh(op, k=kk, which=which, tol=tol, v0=start)
        except (_BudgetExhausted, scipy.sparse.linalg.ArpackNoConvergence):
            return None
        return vals, vecs

    top = solve("LA", k, tol)
    n_top = count if top is not None else None
    bottom = solve("SA", 1, tol_min) if want_bottom else None
    if top is None:
        vals, vecs = np.full(k, np.nan), np.full((n, k), np.nan)
    else:
        order = np.argsort(top[0])[::-1]
        vals, vecs = top[0][order], top[1][:, order]
    top_vectors = torch.as_tensor(vecs.T.copy(), dtype=dtype, device=device)
    min_value, min_vector, converged_min = float("nan"), None, False
    if want_bottom and bottom is not None:
        min_value = float(bottom[0][0])
        min_vector = torch.as_tensor(bottom[1][:, 0].copy(), dtype=dtype, device=device)
        converged_min = True
    return _LanczosOutcome(
        ritz=np.sort(np.concatenate([vals, [min_value]])) if want_bottom else np.sort(vals),
        top_values=vals,
        top_vectors=top_vectors,
        top_residuals=np.full(k, np.nan),  # ARPACK does not report them; not recomputed to keep counts comparable
        top_bounds=np.full(k, np.nan),
        min_value=min_value,
        min_vector=min_vector,
        min_residual=float("nan"),
        min_bound=float("nan"),
        converged_top=top is not None,
        converged_min=converged_min,
        n_matvec=count,
        n_matvec_top=n_top,
    )
