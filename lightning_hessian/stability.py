"""The optimizer's stability edge: the top eigenvalue of the preconditioned Hessian against the optimizer's threshold.

Lanczos (:func:`lightning_hessian.spectrum.lanczos`) runs on the dimensionless operator

    A = (D/k)^{1/2} H (D/k)^{1/2},   D = lr_eff / P,   k = the group's stability constant,

per coordinate (see :mod:`lightning_hessian.optimizer_geometry`). Its top eigenvalue is the
*stability ratio*: at or above 1 the optimizer sits at its edge of stability (Cohen et al. 2021
for gradient descent, 2022 for Adam). Because ``D`` carries each group's learning rate and ``k``
its momentum rule, one ratio covers parameter groups with different learning rates, momenta and
even several optimizers. For reading in familiar units the ratio is expressed in the reference
group's (the one with the most selected parameters): ``threshold = k_ref / lr_ref`` (2/lr, 38/lr
for Adam at beta1 = 0.9) and ``value = ratio * threshold``, which is exactly
``lambda_max(P^{-1/2} H P^{-1/2})`` (``lambda_max(H)`` for SGD) when all groups share one rule
and learning rate. Coordinates no optimizer moves have ``D = 0`` and drop out.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_hessian.objective import Objective
from lightning_hessian.optimizer_geometry import (
    GeometryUnavailableError,
    OptimizerLike,
    Preconditioner,
    read_preconditioner,
)
from lightning_hessian.spectrum import lanczos


@dataclass(frozen=True)
class PreconditionedSharpness:
    """The preconditioned sharpness, the optimizer's threshold, and the evidence.

    Attributes:
        value: ``preconditioned_lambda_max``: ``ratio * threshold`` (``lambda_max(P^{-1/2} H P^{-1/2})``
            with one group; ``lambda_max(H)`` for SGD).
        threshold: ``stability_threshold``: ``k_ref / lr_ref`` of the reference group.
        ratio: ``stability_ratio``: the top eigenvalue of ``(D/k)^{1/2} H (D/k)^{1/2}`` (edge at 1).
        residual: Lanczos residual ``||A y - ratio y||``, in the units of ``value``.
        error_bound: certified bound on the error of ``value`` (the Lanczos residual), in its units.
        converged: the bound met ``tol * |value|``.
        n_hvp: Hessian-vector products spent.
        vector: the top Ritz vector of ``A`` (start the next measurement from it).
        reference_lr, reference_constant: ``lr_ref`` and ``k_ref``.
        rule: the reference group's update rule (``"adam"``, ``"sgd"``, ...).
        mixed: groups differ in ``lr`` or ``k`` (then ``value`` is in the reference group's units).
        seconds: wall time.
    """

    value: float
    threshold: float
    ratio: float
    residual: float
    error_bound: float
    converged: bool
    n_hvp: int
    vector: Tensor = field(repr=False)
    reference_lr: float
    reference_constant: float
    rule: str
    mixed: bool
    seconds: float


def preconditioned_sharpness(
    objective: Objective,
    optimizer: OptimizerLike | Preconditioner,
    *,
    tol: float = 1e-3,
    max_hvp: int = 100,
    init: PreconditionedSharpness | Tensor | None = None,
    seed: int = 0,
    max_basis: int = 60,
) -> PreconditionedSharpness:
    """Top eigenvalue of the optimizer-preconditioned Hessian, its threshold and their ratio.

    Args:
        objective: the loss whose Hessian ``H`` is analysed.
        optimizer: the optimizer(s) training the objective's parameters (their state is read, never
            changed), or a :class:`Preconditioner` already read at this step.
        tol: relative tolerance on the top eigenvalue (Ritz error bound).
        max_hvp: hard budget of Hessian-vector products; an unconverged value says so.
        init: the previous measurement (warm start from its vector) or a start vector.
        seed: seeds the random start vector when there is no ``init``.
        max_basis: most Lanczos vectors held at once.

    Raises :class:`GeometryUnavailableError` when the geometry cannot be read (its ``status``:
    ``"unsupported"``, ``"no_state"``, ``"degenerate"``); check :func:`read_preconditioner` first
    to skip quietly.
    """
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if not isinstance(max_hvp, int) or max_hvp < 2:
        raise ValueError(f"max_hvp must be an integer >= 2, got {max_hvp!r}")
    pre = optimizer if isinstance(optimizer, Preconditioner) else read_preconditioner(objective, optimizer)
    if not pre.ok:
        raise GeometryUnavailableError(pre.status, pre.message)
    start = time.perf_counter()
    ref = pre.reference
    threshold = ref.threshold
    root = pre.stability_scale.sqrt()
    if not bool((root > 0).any()) or not threshold < float("inf"):
        raise GeometryUnavailableError(
            "degenerate", "no analysed parameter moves (learning rate 0, or no optimizer state for any of them)"
        )
    v0 = _start(init, root, seed)

    def matvec(v: Tensor) -> Tensor:
        return root * objective.hvp(root * v)

    before = objective.n_hvp
    run = functools.partial(
        lanczos, matvec, v0, k=1, tol=tol, max_matvec=max_hvp, max_basis=max_basis, want_bottom=False,
        warm=init is not None, seed=seed,
    )  # fmt: skip
    with objective.session():
        outcome = run()  # hvp="auto" verifies symmetry on its own (the scaled operator is symmetric iff H is)
    ratio = float(outcome.top_values[0])
    residual, bound = float(outcome.top_residuals[0]), float(outcome.top_bounds[0])
    mixed = len({(g.lr, g.threshold_constant) for g in pre.groups}) > 1
    return PreconditionedSharpness(
        value=ratio * threshold,
        threshold=threshold,
        ratio=ratio,
        residual=residual * threshold,
        error_bound=bound * threshold,
        converged=bool(outcome.converged_top),
        n_hvp=objective.n_hvp - before,
        vector=outcome.top_vectors[0],
        reference_lr=ref.lr,
        reference_constant=ref.threshold_constant,
        rule=ref.rule,
        mixed=mixed,
        seconds=time.perf_counter() - start,
    )


def _start(init: PreconditionedSharpness | Tensor | None, root: Tensor, seed: int) -> Tensor:
    """The Lanczos start vector: the previous Ritz vector, a given vector, or seeded Gaussian noise."""
    n = root.numel()
    if init is None:
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(device=root.device, dtype=root.dtype)
    else:
        v = (init.vector if isinstance(init, PreconditionedSharpness) else init).reshape(-1)
        v = v.to(device=root.device, dtype=root.dtype)
        if v.numel() != n:
            raise ValueError(f"init has {v.numel()} entries but the objective has {n} parameters")
    v = v * (root > 0).to(v.dtype)  # coordinates no optimizer moves are not part of the operator's range
    norm = v.norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        raise ValueError("init must be a finite vector with support on the parameters the optimizer moves")
    out: Tensor = v / norm
    return out
