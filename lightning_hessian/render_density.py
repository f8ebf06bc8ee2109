"""Figures of whole spectra: one density, the density over training, and per-block bars (drawing only).

Everything here draws data it is given (results, or the files of
:mod:`lightning_hessian.spectra_files`) and never computes a Hessian product. Figures are plain
:class:`matplotlib.figure.Figure` objects on an Agg canvas (no ``pyplot``).

* :func:`density_figure`: the Gaussian-broadened SLQ density of one measurement on a log
  scale, ``lambda_min`` and ``lambda_max`` marked (the measured values when given, otherwise the
  extreme Ritz values, which lie inside the spectrum), the nodes as a rug, the negative mass and
  the outliers in the title.
* :func:`density_evolution_figure`: step on the horizontal axis, eigenvalue on the vertical one
  (``asinh`` scale by default: linear near zero, logarithmic for the outliers), the log density
  as colour. Each column is broadened in the axis coordinate, so the colour is the fraction of
  eigenvalues per unit of axis length: what the eye reads.
* :func:`blocks_figure`: per-block ``lambda_max`` and trace (with its standard error) as bars.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from lightning_hessian._files import atomic_write
from lightning_hessian.blocks import BlockSpectrum
from lightning_hessian.density import DensityEstimate
from lightning_hessian.spectra_files import DensityRecord, list_blocks, list_densities, load_blocks, load_density

AxisScale = Literal["asinh", "linear"]
CMAP = "magma"
MIN_COLOR = "#4c72b0"
MAX_COLOR = "#c44e52"


def _new_figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _record(item: DensityRecord | DensityEstimate | tuple[int, DensityEstimate]) -> DensityRecord:
    if isinstance(item, DensityRecord):
        return item
    if isinstance(item, DensityEstimate):
        return DensityRecord(step=0, estimate=item)
    step, estimate = item
    return DensityRecord(step=int(step), estimate=estimate)


def _ends(rec: DensityRecord) -> tuple[float, float, bool]:
    """lambda_min, lambda_max to mark, and whether they are measured (else the extreme Ritz values)."""
    est = rec.estimate
    measured = rec.lambda_min is not None and rec.lambda_max is not None
    lo = rec.lambda_min if rec.lambda_min is not None else est.lambda_min_ritz
    hi = rec.lambda_max if rec.lambda_max is not None else est.lambda_max_ritz
    return float(lo), float(hi), measured


def _summary(est: DensityEstimate) -> str:
    lo, hi = est.negative_mass_bounds
    text = (
        f"negative mass {est.negative_mass:.3f} ± {est.negative_mass_stderr:.3f} (quadrature bracket {lo:.2f}-{hi:.2f})"
    )
    if est.n_outliers is not None:
        text += f";  {est.n_outliers} outlier{'s' if est.n_outliers != 1 else ''} above the bulk"
    return text


def density_figure(
    item: DensityRecord | DensityEstimate | tuple[int, DensityEstimate],
    *,
    lambda_min: float | None = None,
    lambda_max: float | None = None,
    sigma: float | None = None,
    n_grid: int = 1200,
    decades: float = 7.0,
    title: str | None = None,
) -> Figure:
    """The broadened density of one measurement on a log scale, with lambda_min and lambda_max marked.

    ``lambda_min``/``lambda_max`` override those stored with the record (for example from the
    :class:`~lightning_hessian.spectrum.EigenResult` of the same step). The density axis shows
    ``decades`` decades below the peak.
    """
    rec = _record(item)
    if lambda_min is not None or lambda_max is not None:
        rec = DensityRecord(
            rec.step,
            rec.estimate,
            lambda_min if lambda_min is not None else rec.lambda_min,
            lambda_max if lambda_max is not None else rec.lambda_max,
            rec.meta,
        )
    est = rec.estimate
    lo, hi, measured = _ends(rec)
    sigma = est.default_sigma() if sigma is None else sigma
    pad = 0.04 * (hi - lo) + 4 * sigma
    grid = np.linspace(min(lo, est.lambda_min_ritz) - pad, max(hi, est.lambda_max_ritz) + pad, n_grid)
    _, phi = est.density(grid, sigma=sigma)
    floor = float(phi.max()) * 10.0**-decades
    fig = _new_figure((8.0, 4.2))
    ax = fig.add_subplot()
    ax.fill_between(grid, np.maximum(phi, floor), floor, color="#555555", alpha=0.35, linewidth=0)
    ax.plot(grid, np.maximum(phi, floor), color="black", linewidth=1.2, label="SLQ density")
    ax.set_yscale("log")
    ax.set_ylim(floor, float(phi.max()) * 3)
    if grid[0] < 0:
        ax.axvspan(grid[0], 0.0, color=MIN_COLOR, alpha=0.06, linewidth=0)
    ax.axvline(0.0, color="grey", linewidth=0.8)
    nodes, _ = est.pooled()
    ax.plot(nodes, np.full(nodes.shape, floor * 1.6), "|", color="#333333", markersize=7, alpha=0.6, label="nodes")
    which = "" if measured else " (Ritz)"
    ax.axvline(lo, color=MIN_COLOR, linestyle="--", linewidth=1.5, label=f"λ_min{which} = {lo:.4g}")
    ax.axvline(hi, color=MAX_COLOR, linestyle="--", linewidth=1.5, label=f"λ_max{which} = {hi:.4g}")
    if est.n_outliers and math.isfinite(est.bulk_edge):
        ax.axvline(est.bulk_edge, color="#dd8452", linestyle=":", linewidth=1.2, label=f"bulk edge {est.bulk_edge:.3g}")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    head = title or f"Hessian spectral density, step {rec.step}"
    cost = f"N = {est.num_params:,}, {est.n_starts} starts x {est.n_steps} steps = {est.n_hvp} HVPs"
    cost += f", broadening sigma = {sigma:.2g}"
    ax.set_title(f"{head}\n{_summary(est)}\n{cost}", fontsize=9)
    return fig


def _linear_width(records: Sequence[DensityRecord]) -> float:
    biggest = max(max(abs(_ends(r)[0]), abs(_ends(r)[1])) for r in records)
    return max(0.01 * biggest, 1e-12)


def _asinh_ticks(low: float, high: float, width: float) -> list[float]:
    """0 and the powers of ten beyond 1.5 linear widths on each side (readable labels on an asinh axis)."""
    ticks = [0.0] if low <= 0 <= high else []
    for sign, end in ((1.0, high), (-1.0, -low)):
        if end <= 0:
            continue
        k = math.ceil(math.log10(1.5 * width))
        while 10.0**k <= end:
            ticks.append(sign * 10.0**k)
            k += 1
    return sorted(ticks)


def density_evolution_figure(
    items: Sequence[DensityRecord | DensityEstimate | tuple[int, DensityEstimate]],
    *,
    yscale: AxisScale = "asinh",
    linear_width: float | None = None,
    n_grid: int = 400,
    decades: float = 5.0,
    sigma_fraction: float = 0.01,
    title: str | None = None,
) -> Figure:
    """The density over training: step horizontally, eigenvalue vertically, log density as colour.

    Args:
        items: measurements (records from files, ``(step, estimate)`` pairs or estimates).
        yscale: ``"asinh"`` (linear within ``linear_width`` of zero, logarithmic beyond: the bulk
            and the outliers on one axis) or ``"linear"``.
        linear_width: the asinh scale's linear range (default: 1 % of the largest |eigenvalue| marked).
        n_grid: eigenvalue grid points.
        decades: colour range below the largest density.
        sigma_fraction: broadening, as a fraction of the vertical axis range (in axis coordinates).
    """
    if not items:
        raise ValueError("density_evolution_figure needs at least one measurement")
    if yscale not in ("asinh", "linear"):
        raise ValueError(f"yscale must be 'asinh' or 'linear', got {yscale!r}")
    records = sorted((_record(i) for i in items), key=lambda r: r.step)
    width = _linear_width(records) if linear_width is None else float(linear_width)

    def to_axis(y: np.ndarray) -> np.ndarray:
        return np.arcsinh(y / width) if yscale == "asinh" else y  # type: ignore[no-any-return]

    lows = [min(_ends(r)[0], r.estimate.lambda_min_ritz) for r in records]
    highs = [max(_ends(r)[1], r.estimate.lambda_max_ritz) for r in records]
    u_lo, u_hi = float(to_axis(np.array(min(lows)))), float(to_axis(np.array(max(highs))))
    span = max(u_hi - u_lo, 1e-12)
    u_lo, u_hi = u_lo - 0.03 * span, u_hi + 0.03 * span
    u = np.linspace(u_lo, u_hi, n_grid)
    y = np.sinh(u) * width if yscale == "asinh" else u
    sigma_u = sigma_fraction * span
    columns = []
    for r in records:
        nodes, weights = r.estimate.pooled()
        z = (u[:, None] - to_axis(nodes)[None, :]) / sigma_u
        columns.append(np.exp(-0.5 * z**2) @ weights / (sigma_u * math.sqrt(2 * math.pi)))
    dens = np.array(columns).T  # (n_grid, n_steps)
    top = float(dens.max())
    logd = np.log10(np.maximum(dens, top * 10.0**-decades))
    steps = np.array([r.step for r in records], dtype=np.float64)
    if len(steps) == 1:
        x_edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
    else:
        mid = (steps[1:] + steps[:-1]) / 2
        x_edges = np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])
    du = u[1] - u[0]
    y_edges = np.concatenate([u - du / 2, [u[-1] + du / 2]])
    y_edges = np.sinh(y_edges) * width if yscale == "asinh" else y_edges
    fig = _new_figure((9.0, 5.0))
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(
        x_edges, y_edges, logd, cmap=CMAP, shading="flat", vmin=float(logd.min()), vmax=float(logd.max())
    )
    if yscale == "asinh":
        ax.set_yscale("asinh", linear_width=width)
        ax.set_yticks(_asinh_ticks(float(y[0]), float(y[-1]), width))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(float(y[0]), float(y[-1]))
    lo_marks = np.array([_ends(r)[0] for r in records])
    hi_marks = np.array([_ends(r)[1] for r in records])
    measured = all(_ends(r)[2] for r in records)
    which = "" if measured else " (Ritz)"
    ax.plot(steps, hi_marks, "o-", color="#8fd3ff", markersize=3, linewidth=1.2, label=f"λ_max{which}")
    ax.plot(steps, lo_marks, "o-", color="#7CFC00", markersize=3, linewidth=1.2, label=f"λ_min{which}")
    ax.axhline(0.0, color="white", linewidth=0.6, alpha=0.7)
    ax.set_xlim(float(x_edges[0]), float(x_edges[-1]))
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue" + (f" (asinh scale, linear within ±{width:.2g})" if yscale == "asinh" else ""))
    bar = fig.colorbar(mesh, ax=ax, pad=0.01)
    bar.set_label("log10 density per unit of axis")
    ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
    neg = ", ".join(f"{r.estimate.negative_mass:.2f}" for r in records[-3:])
    ax.set_title(
        (title or "Hessian spectral density over training") + f"\nnegative mass at the last steps: {neg}", fontsize=10
    )
    return fig


def _block_rows(result: BlockSpectrum | dict[str, Any]) -> list[dict[str, Any]]:
    if isinstance(result, BlockSpectrum):
        return [
            {
                "name": b.name,
                "num_params": b.num_params,
                "trace": b.trace,
                "trace_stderr": b.trace_stderr,
                "lambda_max": b.lambda_max if b.measured else None,
            }
            for b in result.blocks
        ]
    return list(result["blocks"])


def blocks_figure(result: BlockSpectrum | dict[str, Any], step: int | None = None, title: str | None = None) -> Figure:
    """Per-block ``lambda_max`` (of the diagonal block H_bb) and trace with its standard error, as bars."""
    rows = _block_rows(result)
    if not rows:
        raise ValueError("blocks_figure needs at least one block")
    step = step if step is not None else (result.get("step") if isinstance(result, dict) else None)
    names = [f"{r['name']}  ({r['num_params']:,})" for r in rows]
    pos = np.arange(len(rows))[::-1]
    lam = np.array([np.nan if r["lambda_max"] is None else float(r["lambda_max"]) for r in rows])
    tr = np.array([np.nan if r["trace"] is None else float(r["trace"]) for r in rows])
    err = np.array([0.0 if r["trace_stderr"] is None else float(r["trace_stderr"]) for r in rows])
    fig = _new_figure((10.0, 1.2 + 0.38 * len(rows)))
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    sharpest = int(np.nanargmax(lam)) if np.isfinite(lam).any() else -1
    colors = [MAX_COLOR if i == sharpest else "#8c8c8c" for i in range(len(rows))]
    ax1.barh(pos, np.nan_to_num(lam), color=colors)
    for p, value in zip(pos, lam):
        ax1.text(0, p, "  not measured" if np.isnan(value) else f" {value:.3g}", va="center", fontsize=8)
    ax1.set_yticks(pos, names, fontsize=8)
    ax1.set_xlabel("λ_max of the diagonal block H_bb")
    ax1.axvline(0, color="black", linewidth=0.6)
    ax2.barh(pos, np.nan_to_num(tr), xerr=err, color="#4c72b0", ecolor="black", capsize=2)
    ax2.axvline(0, color="black", linewidth=0.6)
    ax2.set_xlabel("trace of H_bb (± standard error)")
    total = float(np.nansum(tr))
    head = title or "Curvature per block" + (f", step {step}" if step is not None else "")
    fig.suptitle(f"{head}   (sum of block traces {total:.4g})", fontsize=10)
    return fig


def save_figure(fig: Figure, path: Path | str, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG atomically; return the path."""
    return atomic_write(Path(path), lambda fh: fig.savefig(fh, format="png", dpi=dpi))


def render_spectra(directory: Path | str, out: Path | str | None = None, *, yscale: AxisScale = "asinh") -> list[Path]:
    """Re-render the saved spectra of ``directory`` (what ``python -m lightning_hessian render`` calls).

    Writes ``density_<step>.png`` per density file, ``density_evolution.png`` over all of them,
    and ``blocks_<step>.png`` per block-spectrum file, into ``out`` (default: ``directory``).
    Returns the written paths; raises ``FileNotFoundError`` when there is nothing to render.
    """
    directory = Path(directory)
    target = Path(out) if out is not None else directory
    densities = [load_density(p) for p in list_densities(directory)]
    block_files = list_blocks(directory)
    if not densities and not block_files:
        raise FileNotFoundError(f"no density (step_*.npz) or block (blocks_*.json) files in {directory}")
    written = []
    for rec in densities:
        written.append(save_figure(density_figure(rec), target / f"density_{rec.step:09d}.png"))
    if densities:
        written.append(
            save_figure(density_evolution_figure(densities, yscale=yscale), target / "density_evolution.png")
        )
    for path in block_files:
        data = load_blocks(path)
        written.append(save_figure(blocks_figure(data), target / f"blocks_{int(data['step']):09d}.png"))
    return written
