"""The Hessian's diagonal (Hutchinson) and its share of the Hessian's absolute mass (sampled columns), per block.

- ``diag(H) = E[v * Hv]`` for Rademacher ``v`` (entrywise product): each coordinate's sample
  mean with its standard error ``std / sqrt(n)``; the variance of coordinate ``i`` is
  ``sum_{j != i} H_ij^2``, so the estimate is exact for a diagonal Hessian.
- The *diagonal share* of the adaptive-norm trust-region paper, ``sum_j |H_jj| / sum_ij |H_ij|``,
  is not a quadratic form, so Hutchinson cannot estimate it. It is estimated from sampled columns
  ``H e_j`` (one HVP each, exact): for a column, ``a_j = |H_jj|`` and ``b_j = ||H e_j||_1``, and the
  share is the ratio of their totals. Columns are drawn without replacement, stratified by
  parameter tensor (at least two per tensor, the rest in proportion to the sizes); each stratum's
  totals are scaled up by ``N_s / m_s`` and the ratio's standard error is the delta-method
  (linearised ratio estimator) one, with the finite-population correction ``1 - m_s / N_s`` (0 once
  every column of a stratum is sampled). A block's own share is the same combined ratio over its
  strata and uses its columns' full absolute mass (entries outside the block included). In
  float32 the round-off of a product adds about ``eps * N`` relative mass per column to ``b_j``:
  on very large models read small shares with that in mind.

Blocks are those of :func:`lightning_hessian.blocks.parameter_blocks`: by default one per module
(``fc1.weight`` and ``fc1.bias`` form ``"fc1"``), or named glob patterns.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lightning_hessian.blocks import BlockSpec, parameter_blocks
from lightning_hessian.objective import Objective


@dataclass(frozen=True)
class BlockDiagonal:
    """One block's part of the diagonal estimate: its trace (sum of the diagonal) with standard error."""

    name: str
    numel: int
    trace: float
    trace_stderr: float


@dataclass(frozen=True)
class DiagonalEstimate:
    """Hutchinson estimate of ``diag(H)`` with its evidence.

    Attributes:
        diagonal: estimate of each ``H_ii`` (flat, objective order, float64 on the objective's device).
        stderr: standard error of each entry.
        trace: ``sum(diagonal)`` (the Hutchinson trace of the same products) and ``trace_stderr``.
        blocks: per-block traces.
        n_samples: Rademacher products averaged (reused and new).
        n_hvp: Hessian-vector products spent here (reused ones not counted).
        seconds: wall time.
    """

    diagonal: Tensor = field(repr=False)
    stderr: Tensor = field(repr=False)
    trace: float
    trace_stderr: float
    blocks: tuple[BlockDiagonal, ...]
    n_samples: int
    n_hvp: int
    seconds: float


@dataclass(frozen=True)
class BlockShare:
    """One block's diagonal share: ``sum_{j in B} |H_jj| / sum_{j in B} ||H e_j||_1``, standard error, columns used."""

    name: str
    numel: int
    value: float
    stderr: float
    n_columns: int


@dataclass(frozen=True)
class DiagonalShare:
    """The ``diagonal_share`` ``sum_j |H_jj| / sum_ij |H_ij|`` estimated from sampled columns.

    Attributes:
        value: the share (1 for a diagonal Hessian; about ``1/N`` for a dense one with equal entries).
        stderr: its standard error (0 when every column was sampled).
        diagonal_mass, total_mass: the estimated totals ``sum |H_jj|`` and ``sum |H_ij|``.
        blocks: per-block shares.
        n_columns: columns sampled (one HVP each).
        n_hvp: Hessian-vector products spent.
        seconds: wall time.
    """

    value: float
    stderr: float
    diagonal_mass: float
    total_mass: float
    blocks: tuple[BlockShare, ...]
    n_columns: int
    n_hvp: int
    seconds: float


def _strata(objective: Objective) -> list[tuple[str, int, int]]:
    """``(parameter name, start, stop)`` of each parameter tensor in the flat vector."""
    out, offset = [], 0
    for name, shape in objective.param_shapes:
        size = math.prod(shape)
        out.append((name, offset, offset + size))
        offset += size
    return out


def _rademacher(n: int, gen: torch.Generator, like: Tensor) -> Tensor:
    bits = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8)
    return (bits.to(torch.float64) * 2 - 1).to(device=like.device, dtype=like.dtype)


def hessian_diagonal(
    objective: Objective,
    n: int = 30,
    seed: int = 0,
    *,
    blocks: BlockSpec = None,
    products: Iterable[tuple[Tensor, Tensor]] = (),
) -> DiagonalEstimate:
    """Hutchinson estimate of the Hessian's diagonal, ``mean(v * Hv)`` over Rademacher ``v``, with standard errors.

    Args:
        objective: the operator.
        n: number of samples in total; ``products`` count towards it, new HVPs fill the rest.
        seed: seeds the private generator of the new probes.
        blocks: how per-block traces are grouped (:func:`~lightning_hessian.blocks.parameter_blocks`;
            ``None``: one block per module).
        products: ``(v, Hv)`` pairs already computed with Rademacher ``v`` (e.g. by a plain
            Hutchinson trace at the same step), reused at no cost.
    """
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2 (a standard error needs two samples), got {n!r}")
    start = time.perf_counter()
    before = objective.n_hvp
    dim, device = objective.num_params, objective.device
    groups = parameter_blocks(objective, blocks)
    index = [b.index.to(device) for b in groups]
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    total_sq = torch.zeros(dim, dtype=torch.float64, device=device)
    block_samples: list[list[float]] = []
    count = 0

    def add(v: Tensor, hv: Tensor) -> None:
        x = v.to(torch.float64) * hv.to(torch.float64)
        total.add_(x)
        total_sq.add_(x * x)
        block_samples.append([float(x[i].sum()) for i in index])

    for v, hv in products:
        if v.shape != (dim,) or hv.shape != (dim,):
            raise ValueError(f"products must be pairs of flat vectors of shape ({dim},)")
        if not bool((v.abs() == 1).all()):
            raise ValueError("products must come from Rademacher vectors (entries +-1)")
        if count < n:
            add(v, hv)
            count += 1
    gen = torch.Generator().manual_seed(seed)
    like = objective.parameters()
    with objective.session():
        while count < n:
            v = _rademacher(dim, gen, like)
            add(v, objective.hvp(v))
            count += 1
    mean = total / count
    var = (total_sq - count * mean * mean).clamp(min=0.0) / (count - 1)
    samples = np.asarray(block_samples)  # (count, n_blocks)
    sums = samples.sum(axis=1)
    block_err = samples.std(axis=0, ddof=1) / math.sqrt(count)
    return DiagonalEstimate(
        diagonal=mean,
        stderr=(var / count).sqrt(),
        trace=float(sums.mean()),
        trace_stderr=float(sums.std(ddof=1) / math.sqrt(count)),
        blocks=tuple(
            BlockDiagonal(group.name, group.num_params, float(samples[:, b].mean()), float(block_err[b]))
            for b, group in enumerate(groups)
        ),
        n_samples=count,
        n_hvp=objective.n_hvp - before,
        seconds=time.perf_counter() - start,
    )


def _allocate(sizes: list[int], budget: int) -> list[int]:
    """Columns per block: ``min(2, N_B)`` each, the rest in proportion to ``N_B`` (largest remainder), <= ``N_B``."""
    alloc = [min(2, s) for s in sizes]
    left = budget - sum(alloc)
    while left > 0:
        room = [s - a for s, a in zip(sizes, alloc)]
        open_total = sum(s for s, r in zip(sizes, room) if r > 0)
        if open_total == 0:
            break
        quotas = [left * s / open_total if r > 0 else 0.0 for s, r in zip(sizes, room)]
        extra = [min(int(q), r) for q, r in zip(quotas, room)]
        if sum(extra) == 0:  # hand out single columns by largest remainder
            order = sorted(range(len(sizes)), key=lambda b: quotas[b] - int(quotas[b]), reverse=True)
            for b in order:
                if left and room[b] > 0:
                    extra[b] += 1
                    left -= 1
        else:
            left -= sum(extra)
        alloc = [a + e for a, e in zip(alloc, extra)]
    return alloc


def diagonal_share(
    objective: Objective,
    n_columns: int = 64,
    seed: int = 0,
    *,
    blocks: BlockSpec = None,
) -> DiagonalShare:
    """Estimate ``sum_j |H_jj| / sum_ij |H_ij|`` (and per block) from ``n_columns`` sampled Hessian columns.

    Columns are stratified by parameter tensor whatever ``blocks`` is: biases and weights differ
    in how diagonal their columns are, and a few bias columns missed by a simple random sample
    would bias the estimate beyond its standard error.

    Args:
        objective: the operator.
        n_columns: HVP budget, one per column; at least two per parameter tensor (all of a tensor
            with fewer entries); capped at the number of parameters (then the result is exact).
        seed: seeds the column sampling.
        blocks: how the per-block shares are grouped (:func:`~lightning_hessian.blocks.parameter_blocks`;
            ``None``: one block per module).
    """
    strata = _strata(objective)
    reported = parameter_blocks(objective, blocks)
    sizes = [stop - first for _, first, stop in strata]
    need = sum(min(2, s) for s in sizes)
    if not isinstance(n_columns, int) or n_columns < need:
        raise ValueError(
            f"n_columns must be an integer of at least {need} (two columns for each of {len(sizes)} parameter "
            f"tensors); got {n_columns!r}. Pass more columns, or select fewer parameters with params="
        )
    start = time.perf_counter()
    before = objective.n_hvp
    alloc = _allocate(sizes, min(n_columns, sum(sizes)))
    rng = random.Random(seed)
    unit = torch.zeros(objective.num_params, dtype=objective.dtype, device=objective.device)
    samples: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}  # stratum -> (size, |H_jj|, ||H e_j||_1)
    with objective.session():
        for (name, first, _), size, m in zip(strata, sizes, alloc):
            diag, mass = [], []
            for j in sorted(rng.sample(range(size), m)):
                unit[first + j] = 1.0
                column = objective.hvp(unit).to(torch.float64)
                unit[first + j] = 0.0
                diag.append(abs(float(column[first + j])))
                mass.append(float(column.abs().sum()))
            samples[name] = (size, np.asarray(diag), np.asarray(mass))
    value, stderr, diag_total, mass_total = _stratified_ratio(list(samples.values()))
    block_results = []
    for group in reported:
        members = [samples[name] for name in group.param_names]
        own, own_err, _, _ = _stratified_ratio(members)
        used = sum(len(m[1]) for m in members)
        block_results.append(BlockShare(group.name, group.num_params, own, own_err, used))
    return DiagonalShare(
        value=value,
        stderr=stderr,
        diagonal_mass=diag_total,
        total_mass=mass_total,
        blocks=tuple(block_results),
        n_columns=sum(alloc),
        n_hvp=objective.n_hvp - before,
        seconds=time.perf_counter() - start,
    )


def _stratified_ratio(strata: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[float, float, float, float]:
    """Combined ratio estimate over strata ``(N_s, a, b)``: ``(ratio, stderr, total of a, total of b)``.

    Totals are ``sum_s N_s mean(a_s)``; the variance of the ratio is the delta-method
    ``sum_s N_s^2 (1 - m_s / N_s) var(a_s - R b_s) / m_s / T_b^2``.
    """
    total_a = sum(n * float(a.mean()) for n, a, _ in strata)
    total_b = sum(n * float(b.mean()) for n, _, b in strata)
    if not total_b > 0:
        return math.nan, math.nan, total_a, total_b
    ratio = total_a / total_b
    var = 0.0
    for n, a, b in strata:
        fpc = 1.0 - len(a) / n  # 0 when the stratum is sampled in full: no sampling error
        if fpc > 0:
            var += n**2 * fpc * _residual_var(a, b, ratio) / len(a)
    return ratio, math.sqrt(var) / total_b, total_a, total_b


def _residual_var(a: np.ndarray, b: np.ndarray, ratio: float) -> float:
    """Sample variance of the linearised ratio residuals ``a - ratio * b`` (NaN with fewer than two columns)."""
    if len(a) < 2 or not math.isfinite(ratio):
        return math.nan
    return float(np.var(a - ratio * b, ddof=1))
