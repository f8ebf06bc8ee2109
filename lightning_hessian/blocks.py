"""Where the curvature lives: the Hessian restricted to blocks of parameters (per-block lambda_max and trace).

A block ``b`` is a set of parameters (by default those of one module). Its diagonal block
``H_bb`` acts on block vectors ``x`` as ``(H [x; 0])_b``: one full HVP with the vector zero outside
the block, read on the block. ``lambda_max`` of a block is the top eigenvalue of ``H_bb`` (Lanczos
on that operator), *not* the global top eigenvector projected on the block: it answers "how sharp
is the loss if only this block moves". Block traces come from the same Rademacher (Hutchinson)
products as the total: ``tr(H_bb) = E[v_b . (Hv)_b]``, so block traces sum exactly to the total
estimate, sample by sample.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lightning_hessian._krylov import auto_max_basis
from lightning_hessian.objective import Objective
from lightning_hessian.spectrum import lanczos

BlockSpec = Mapping[str, str | Sequence[str]] | Sequence[str] | None
ROOT = "_root"  # name of the block of parameters owned by the model itself
REST = "_rest"  # name of the block of parameters no user pattern matched


@dataclass(frozen=True)
class Block:
    """A named set of parameters and where their entries sit in the objective's flat vectors."""

    name: str
    param_names: tuple[str, ...]
    index: Tensor = field(repr=False)  # positions in the flat vector, ascending

    @property
    def num_params(self) -> int:
        """Number of scalar parameters in the block."""
        return int(self.index.numel())


def parameter_blocks(objective: Objective, blocks: BlockSpec = None) -> list[Block]:
    """Split the objective's parameters into disjoint blocks.

    Args:
        objective: whose parameters (``objective.param_names``) are split.
        blocks: ``None``: one block per module that owns parameters, named by the module's path
            (``"0"``, ``"encoder.layer1"``; parameters of the model itself go to ``"_root"``).
            A mapping ``{name: glob or [globs]}`` on parameter names, or a list of globs (each its
            own block, named by the glob). Parameters no pattern matches form a block ``"_rest"``,
            so that the blocks always cover the Hessian and block traces sum to the total.

    Raises ``ValueError`` for a block matching nothing or a parameter matched by two blocks.
    """
    names = list(objective.param_names)
    offsets = np.concatenate([[0], np.cumsum([math.prod(s) for _, s in objective.param_shapes])])
    span = {n: (int(offsets[i]), int(offsets[i + 1])) for i, n in enumerate(names)}
    groups: dict[str, list[str]] = {}
    if blocks is None:
        for n in names:
            groups.setdefault(n.rpartition(".")[0] or ROOT, []).append(n)
    else:
        if isinstance(blocks, str):
            raise TypeError(f"blocks must be None, a mapping of name to globs or a list of globs, got {blocks!r}")
        patterns: dict[str, list[str]]
        if isinstance(blocks, Mapping):
            patterns = {str(k): [v] if isinstance(v, str) else list(v) for k, v in blocks.items()}
        else:
            patterns = {str(p): [p] for p in blocks}
        if not patterns:
            raise ValueError("blocks is empty; pass None for one block per module")
        owner: dict[str, str] = {}
        for block_name, globs in patterns.items():
            if not globs or not all(isinstance(g, str) for g in globs):
                raise TypeError(f"block {block_name!r}: patterns must be glob strings, got {globs!r}")
            matched = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]
            if not matched:
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ValueError(f"block {block_name!r} ({globs}) matches no parameter; available names: {shown}")
            for n in matched:
                if n in owner:
                    raise ValueError(f"parameter {n!r} is in two blocks, {owner[n]!r} and {block_name!r}")
                owner[n] = block_name
            groups[block_name] = matched
        rest = [n for n in names if n not in owner]
        if rest:
            if REST in groups:
                raise ValueError(f"{REST!r} is reserved for the parameters no pattern matches")
            groups[REST] = rest
    device = objective.device
    out = []
    for block_name, members in groups.items():
        members = sorted(members, key=names.index)
        index = torch.cat([torch.arange(*span[n]) for n in members]).to(device)
        out.append(Block(block_name, tuple(members), index))
    return out


@dataclass(frozen=True)
class BlockStats:
    """One block's numbers.

    Attributes:
        name, param_names, num_params: the block.
        trace, trace_stderr: Hutchinson estimate of ``tr(H_bb)`` and its standard error.
        lambda_max: top eigenvalue of the diagonal block ``H_bb`` (NaN when not measured this time).
        error_bound: bound on its error (from the Ritz residual); NaN when not measured.
        converged: the bound met the tolerance.
        measured: ``lambda_max`` was computed in this call (the budget may skip blocks).
        n_hvp: products spent on this block's ``lambda_max``.
        vector: the block's top eigenvector (block coordinates), kept for warm starts.
    """

    name: str
    param_names: tuple[str, ...]
    num_params: int
    trace: float
    trace_stderr: float
    lambda_max: float
    error_bound: float
    converged: bool
    measured: bool
    n_hvp: int
    vector: Tensor | None = field(default=None, repr=False)


@dataclass(frozen=True)
class BlockSpectrum:
    """Per-block lambda_max and traces, with the total trace from the same products.

    Attributes:
        blocks: one :class:`BlockStats` per block, in block order.
        trace, trace_stderr: the total Hutchinson estimate (equal to the sum of block traces).
        n_samples: Rademacher probes of the trace.
        n_hvp: products spent in total; ``n_hvp_trace`` on the traces.
        next_block: index of the block a budget-limited follow-up call starts at (rotation).
        tol: tolerance of the block eigenvalues (relative).
        seconds: wall time.
    """

    blocks: tuple[BlockStats, ...]
    trace: float
    trace_stderr: float
    n_samples: int
    n_hvp: int
    n_hvp_trace: int
    next_block: int
    tol: float
    seconds: float

    def __getitem__(self, name: str) -> BlockStats:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no block {name!r}; blocks: {[b.name for b in self.blocks]}")

    @property
    def names(self) -> tuple[str, ...]:
        """Block names, in order."""
        return tuple(b.name for b in self.blocks)

    def metrics(self) -> dict[str, float]:
        """``block/<name>/trace`` for every block and ``block/<name>/lambda_max`` for the measured ones."""
        out: dict[str, float] = {}
        for b in self.blocks:
            if b.measured:
                out[f"block/{b.name}/lambda_max"] = b.lambda_max
            out[f"block/{b.name}/trace"] = b.trace
        return out


def _mean_stderr(samples: np.ndarray) -> tuple[float, float]:
    if samples.size < 2:
        return (float(samples.mean()) if samples.size else float("nan")), float("nan")
    return float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(samples.size))


def block_traces(blocks: Sequence[Block], pairs: Iterable[tuple[Tensor, Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-block quadratic forms ``v_b . (Hv)_b`` of probe/product pairs: ``(samples, totals)``.

    ``samples[i, b]`` is block ``b``'s form for probe ``i``; ``totals[i] = v . Hv``. Any plain
    Hutchinson products (Rademacher or Gaussian ``v``, never deflated ones) can be reused here.
    """
    rows, totals = [], []
    for v, hv in pairs:
        prod = (v * hv).to(torch.float64)
        rows.append([float(prod[b.index].sum()) for b in blocks])
        totals.append(float(prod.sum()))
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(blocks)), np.asarray(totals, dtype=np.float64)


def block_spectrum(
    objective: Objective,
    blocks: BlockSpec | Sequence[Block] = None,
    *,
    n_trace: int = 30,
    tol: float = 1e-3,
    max_hvp_per_block: int = 20,
    max_hvp: int | None = None,
    only: Sequence[str] | None = None,
    init: BlockSpectrum | None = None,
    seed: int = 0,
) -> BlockSpectrum:
    """Per-block ``lambda_max`` of the diagonal blocks ``H_bb`` and per-block traces.

    Cost: ``n_trace`` HVPs for all traces together (the total and every block from the same
    products), plus at most ``max_hvp_per_block`` per block whose ``lambda_max`` is measured.

    Args:
        objective: the operator.
        blocks: a block specification (see :func:`parameter_blocks`) or blocks already built.
        n_trace: Rademacher probes for the traces (0 skips the traces).
        tol: residual tolerance of each block's ``lambda_max``, relative to its value (a monitor's
            accuracy; the Ritz value is a lower bound on the block's top eigenvalue).
        max_hvp_per_block: budget of one block's Lanczos run.
        max_hvp: total budget for the blocks' ``lambda_max`` (``None``: no limit beyond the per-block
            one). Blocks are taken in order from ``init.next_block``, so repeated budget-limited
            calls rotate over the blocks; skipped blocks say ``measured=False``.
        only: names of the blocks whose ``lambda_max`` is measured (default: all).
        init: the previous result: warm starts from each block's eigenvector, and the rotation.
        seed: seeds the trace probes and cold start vectors.
    """
    if not isinstance(n_trace, int) or n_trace < 0:
        raise ValueError(f"n_trace must be a non-negative integer, got {n_trace!r}")
    if not (isinstance(tol, float | int) and 0 < tol < 1):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    if not isinstance(max_hvp_per_block, int) or max_hvp_per_block < 2:
        raise ValueError(f"max_hvp_per_block must be an integer >= 2, got {max_hvp_per_block!r}")
    if max_hvp is not None and (not isinstance(max_hvp, int) or max_hvp < 0):
        raise ValueError(f"max_hvp must be None or a non-negative integer, got {max_hvp!r}")
    start = time.perf_counter()
    built = _as_blocks(objective, blocks)
    names = [b.name for b in built]
    if only is not None:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"only names unknown blocks {unknown}; blocks: {names}")
    n = objective.num_params
    before = objective.n_hvp
    gen = torch.Generator().manual_seed(seed)
    device, dtype = objective.device, objective.dtype
    previous = {b.name: b for b in init.blocks} if init is not None else {}
    with objective.session():
        pairs = []
        for _ in range(n_trace):
            bits = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8)
            v = (bits.to(torch.float64) * 2 - 1).to(device=device, dtype=dtype)
            pairs.append((v, objective.hvp(v)))
        samples, totals = block_traces(built, pairs)
        del pairs
        n_hvp_trace = objective.n_hvp - before
        wanted = [i for i, b in enumerate(built) if only is None or b.name in only]
        first = init.next_block % len(built) if init is not None and init.names == tuple(names) else 0
        order = sorted(wanted, key=lambda i: (i - first) % len(built))
        spent = 0
        eig: dict[int, tuple[float, float, bool, int, Tensor]] = {}
        next_block = first
        for i in order:
            if max_hvp is not None and spent + min(max_hvp_per_block, built[i].num_params + 1) > max_hvp:
                break
            eig[i] = _block_lambda_max(objective, built[i], previous.get(built[i].name), tol, max_hvp_per_block, seed)
            spent += eig[i][3]
            next_block = (i + 1) % len(built)
    stats = []
    for i, b in enumerate(built):
        tr, tr_err = _mean_stderr(samples[:, i])
        prev = previous.get(b.name)
        if i in eig:
            value, bound, ok, used, vec = eig[i]
            stats.append(BlockStats(b.name, b.param_names, b.num_params, tr, tr_err, value, bound, ok, True, used, vec))
        else:
            vec_prev = prev.vector if prev is not None else None
            nan = float("nan")
            stats.append(
                BlockStats(b.name, b.param_names, b.num_params, tr, tr_err, nan, nan, False, False, 0, vec_prev)
            )
    total, total_err = _mean_stderr(totals)
    return BlockSpectrum(
        blocks=tuple(stats),
        trace=total,
        trace_stderr=total_err,
        n_samples=n_trace,
        n_hvp=objective.n_hvp - before,
        n_hvp_trace=n_hvp_trace,
        next_block=next_block,
        tol=float(tol),
        seconds=time.perf_counter() - start,
    )


def _as_blocks(objective: Objective, blocks: BlockSpec | Sequence[Block]) -> list[Block]:
    if blocks is not None and not isinstance(blocks, str | Mapping):
        items = list(blocks)
        if items and all(isinstance(b, Block) for b in items):
            return [b for b in items if isinstance(b, Block)]
        return parameter_blocks(objective, [str(b) for b in items])
    return parameter_blocks(objective, blocks)


def _block_lambda_max(
    objective: Objective, block: Block, previous: BlockStats | None, tol: float, budget: int, seed: int
) -> tuple[float, float, bool, int, Tensor]:
    """Lanczos (top end only) on ``x -> (H [x; 0])_b``; returns value, error bound, converged, HVPs, vector."""
    n, nb = objective.num_params, block.num_params
    device, dtype = objective.device, objective.dtype
    index = block.index

    def matvec(x: Tensor) -> Tensor:
        full = torch.zeros(n, device=device, dtype=dtype)
        full[index] = x
        return objective.hvp(full)[index]

    warm = previous is not None and previous.vector is not None and previous.vector.numel() == nb
    if warm:
        assert previous is not None and previous.vector is not None
        v0 = previous.vector.to(device=device, dtype=dtype)
    else:
        gen = torch.Generator().manual_seed(seed + 7919 * (1 + int(index[0])))
        v0 = torch.randn(nb, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    if nb == 1:
        value = float(matvec(torch.ones(1, device=device, dtype=dtype))[0])
        return value, 0.0, True, 1, torch.ones(1, device=device, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    out = lanczos(
        matvec,
        v0,
        k=1,
        tol=tol,
        max_matvec=budget,
        max_basis=min(auto_max_basis(nb, itemsize), max(nb, 7)),
        want_bottom=False,
        warm=warm,
        seed=seed,
    )
    return float(out.top_values[0]), float(out.top_bounds[0]), bool(out.converged_top), out.n_matvec, out.top_vectors[0]
