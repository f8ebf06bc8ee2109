"""Figures and animations of landscape snapshots: rendering never computes, computing never renders.

Everything here only draws data it is given (:class:`~lightning_hessian.snapshots.Snapshot`
files written during training) and never evaluates a loss, so a run can be re-plotted at any
time with another colour scale, clip value or number of levels. Matplotlib is used without
``pyplot``: every figure is a plain :class:`matplotlib.figure.Figure` on its own Agg canvas, so
nothing is registered in pyplot's global figure list, no GUI backend is touched and figures are
freed as soon as they are no longer referenced.

Honesty rules of the pictures:

* one colour scale per animation (:func:`color_limits` over all frames), drawn as one colour bar;
* non-finite losses (NaN, inf) are masked, never interpolated or replaced: the cells around them
  stay light grey, the points are marked ``x`` and counted in the panel title;
* the log scale is ``log10(loss)`` of the loss itself (no shift by a per-run minimum, no offset),
  so the same loss has the same colour in every frame and every run; losses ``<= 0`` have no
  logarithm and are masked and counted like non-finite values;
* values above a ``clip`` are drawn in the top colour and the colour bar gets an arrow;
* colour bands have round edges: the range is only ever widened to the next round value, so
  every finite value within the limits gets its true band;
* the current weights sit at ``(0, 0)`` (white ``+``), the lowest grid point is a red star.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, overload

import numpy as np
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.contour import QuadContourSet
from matplotlib.figure import Figure, FigureBase
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator
from PIL import Image

from lightning_hessian._files import atomic_write
from lightning_hessian.indicators import grid_minimum
from lightning_hessian.landscape import Line, Surface
from lightning_hessian.snapshots import Snapshot, list_snapshots, load_snapshot

__all__ = [
    "NoSnapshotsError",
    "color_limits",
    "figure_size",
    "figure_to_rgb",
    "gif_bytes",
    "render_run",
    "snapshot_dirs",
    "snapshot_figure",
    "write_gif",
]

CMAP = "viridis"
BAD_COLOR = "#d4d4d4"
"""Face colour of the plane axes: what shows through where contourf has nothing to fill (masked cells)."""
ANIMATION_NAME = "animation.gif"
_PLANE_ORDER = ("random", "hessian")
_ALPHA, _BETA = "\N{GREEK SMALL LETTER ALPHA}", "\N{GREEK SMALL LETTER BETA}"
_PLANE_TITLES = {"random": "random plane", "hessian": "Hessian plane", "custom": "custom plane"}


class NoSnapshotsError(FileNotFoundError):
    """No ``step_*.npz`` snapshot was found where one was expected."""


# --------------------------------------------------------------------------------------------
# colour scale


def _plane_values(surface: Surface, include_val: bool) -> list[np.ndarray]:
    grids = [np.asarray(surface.losses, dtype=np.float64)]
    if include_val and surface.val_losses is not None:
        grids.append(np.asarray(surface.val_losses, dtype=np.float64))
    return grids


def _usable(values: np.ndarray, log_scale: bool) -> np.ndarray:
    """Mask of the values that can be coloured: finite, and positive on a log scale."""
    ok: np.ndarray = np.isfinite(values)
    if log_scale:
        ok &= values > 0
    return ok


def color_limits(
    surfaces: Iterable[Surface],
    log_scale: bool = False,
    clip: float | None = None,
    *,
    include_val: bool = False,
) -> tuple[float, float]:
    """One colour range ``(low, high)`` over many surfaces (frames), for a fixed scale in an animation.

    Only finite losses count. With ``log_scale`` the range is that of ``log10(loss)`` over the
    positive finite losses (the loss itself, never shifted: losses ``<= 0`` are left out and later
    masked), so the limits are in decades. ``clip`` (in loss units on both scales) caps the top;
    ``include_val`` also counts the validation grids. Raises ``ValueError`` when there is nothing
    to scale or when ``clip`` is not above the lowest value.
    """
    low, high = math.inf, -math.inf
    for surface in surfaces:
        for grid in _plane_values(surface, include_val):
            ok = _usable(grid, log_scale)
            if ok.any():
                low, high = min(low, float(grid[ok].min())), max(high, float(grid[ok].max()))
    if not math.isfinite(low):
        raise ValueError("no finite" + (" positive" if log_scale else "") + " loss to set a colour range from")
    if log_scale:
        low, high = math.log10(low), math.log10(high)
    if clip is not None:
        if not math.isfinite(clip) or (log_scale and clip <= 0):
            raise ValueError(f"clip must be a finite{' positive' if log_scale else ''} loss, got {clip!r}")
        top = math.log10(clip) if log_scale else float(clip)
        if top <= low:
            raise ValueError(f"clip={clip!r} is not above the lowest loss on the scale")
        high = min(high, top)
    return float(low), float(high)


def _line_limits(lines: Iterable[Line], log_scale: bool) -> tuple[float, float] | None:
    """The y-range (in loss units) of many 1-D cuts, for fixed axes in an animation."""
    low, high = math.inf, -math.inf
    for line in lines:
        for values in (line.losses, line.val_losses):
            if values is None:
                continue
            v = np.asarray(values, dtype=np.float64)
            ok = _usable(v, log_scale)
            if ok.any():
                low, high = min(low, float(v[ok].min())), max(high, float(v[ok].max()))
    if not math.isfinite(low):
        return None
    return low, high


# --------------------------------------------------------------------------------------------
# one figure


_LOG_SERIES = (
    (1.0,),
    (1.0, 3.0),
    (1.0, 2.0, 5.0),
    (1.0, 1.5, 2.0, 3.0, 5.0, 7.0),
    (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0),
)


def _round_edges(low: float, high: float, levels: int) -> np.ndarray:
    """At most ``levels`` equal bands with round edges covering ``[low, high]`` (rounded outwards)."""
    edges = np.asarray(MaxNLocator(nbins=levels, steps=[1, 2, 2.5, 3, 4, 5, 10]).tick_values(low, high), dtype=float)
    tol = 1e-9 * (high - low)
    below, above = edges[edges <= low + tol], edges[edges >= high - tol]
    first = below.max() if len(below) else edges[0]
    last = above.min() if len(above) else edges[-1]
    return np.asarray(edges[(edges >= first) & (edges <= last)], dtype=np.float64)


def _log_edges(low: float, high: float, levels: int) -> np.ndarray:
    """Round band edges in loss units covering ``[10**low, 10**high]``: the finest 1-2-5-like series per
    decade with at most ``levels`` bands, or equal round steps when the range is under a decade or so."""
    best: np.ndarray | None = None
    for series in _LOG_SERIES:
        grid = np.array([m * 10.0**k for k in range(math.floor(low) - 1, math.ceil(high) + 2) for m in series])
        lo_edge = grid[grid <= 10.0**low * (1 + 1e-12)].max()
        hi_edge = grid[grid >= 10.0**high * (1 - 1e-12)].min()
        edges = grid[(grid >= lo_edge) & (grid <= hi_edge)]
        if len(edges) - 1 <= levels:
            best = edges
    if best is None or len(best) - 1 < max(2, levels // 2):
        linear = _round_edges(10.0**low, 10.0**high, levels)
        if linear[0] <= 0:
            linear[0] = 10.0**low
        if best is None or len(linear) > len(best):
            best = linear
    return best


@dataclass(frozen=True)
class _Scale:
    """The colour mapping of one figure: band edges, norm, and the transform it implies."""

    edges: np.ndarray
    log: bool

    @classmethod
    def make(cls, limits: tuple[float, float], log_scale: bool, levels: int) -> _Scale:
        """At most ``levels`` bands with round edges (in loss units, or in decades on a log scale)
        covering ``limits``: the range is only ever rounded outwards."""
        low, high = float(limits[0]), float(limits[1])
        if not (math.isfinite(low) and math.isfinite(high)) or high < low:
            raise ValueError(f"colour limits must be finite with low <= high, got {limits!r}")
        if high - low <= 1e-9 * max(abs(low), abs(high), 1.0):  # a flat grid: open up a sliver
            pad = 0.05 if log_scale else 1e-3 * max(abs(low), 1.0)
            low, high = low - pad, high + pad
        if log_scale:
            return cls(edges=_log_edges(low, high, levels), log=True)
        return cls(edges=_round_edges(low, high, levels), log=False)

    @property
    def norm(self) -> Normalize:
        lo, hi = float(self.edges[0]), float(self.edges[-1])
        return LogNorm(vmin=lo, vmax=hi) if self.log else Normalize(vmin=lo, vmax=hi)

    def ticks(self) -> np.ndarray:
        """Round colour-bar ticks inside the edges: about 8 equal steps, or 1-2-5 (or 1) per decade on a log scale."""
        lo, hi = float(self.edges[0]), float(self.edges[-1])
        if self.log and hi / lo >= 10:
            mant = self.edges / 10.0 ** np.floor(np.log10(self.edges) + 1e-9)
            ticks = self.edges
            for keep in ((1.0, 2.0, 5.0), (1.0,)):
                ticks = np.asarray(
                    self.edges[np.isclose(mant[:, None], np.array(keep)[None, :], rtol=1e-6).any(axis=1)]
                )
                if len(ticks) <= 12:
                    break
            return ticks
        ticks = np.asarray(MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi), dtype=float)
        tol = 1e-9 * (hi - lo)
        return ticks[(ticks >= lo - tol) & (ticks <= hi + tol)]

    def extend(self, values: Iterable[np.ndarray]) -> str:
        """Which ends of the colour bar the data overflow (with a relative tolerance for rounding)."""
        lo, hi = float(self.edges[0]), float(self.edges[-1])
        tol = 1e-9 * max(abs(lo), abs(hi), 1e-300)
        below = above = False
        for v in values:
            ok = _usable(v, self.log)
            below |= bool((v[ok] < lo - tol).any())
            above |= bool((v[ok] > hi + tol).any())
        return {(False, False): "neither", (True, False): "min", (False, True): "max"}.get((below, above), "both")


def _fmt(x: float) -> str:
    return f"{x:.3g}".replace("-", "\N{MINUS SIGN}")


def _axis_labels(surface: Surface) -> tuple[str, str]:
    if surface.kind == "hessian" and surface.eigenvalues is not None:
        lmax, lmin = surface.eigenvalues
        return f"{_ALPHA} · v_max (λ={_fmt(lmax)})", f"{_BETA} · v_min (λ={_fmt(lmin)})"
    labels = []
    for sym, name, norm in ((_ALPHA, surface.labels[0], surface.d1_norm), (_BETA, surface.labels[1], surface.d2_norm)):
        text = f"{sym} · {name}"
        if math.isfinite(norm) and not math.isclose(norm, 1.0, rel_tol=1e-6):
            text += f"  (‖d‖={_fmt(norm)})"
        labels.append(text)
    return labels[0], labels[1]


def _bad_counts(values: np.ndarray, log_scale: bool) -> str:
    """'2 masked: 1 NaN, 1 +inf' or ''."""
    parts = []
    for name, mask in (
        ("NaN", np.isnan(values)),
        ("+inf", np.isposinf(values)),
        ("\N{MINUS SIGN}inf", np.isneginf(values)),
        ("≤ 0", np.isfinite(values) & (values <= 0) if log_scale else np.zeros(values.shape, bool)),
    ):
        n = int(mask.sum())
        if n:
            parts.append(f"{n} {name}")
    if not parts:
        return ""
    total = int((~_usable(values, log_scale)).sum())
    return f"{total} masked: " + ", ".join(parts)


def _ordered_planes(snapshot: Snapshot) -> list[tuple[str, Surface]]:
    names = [n for n in _PLANE_ORDER if n in snapshot.planes]
    names += [n for n in snapshot.planes if n not in names]
    return [(n, snapshot.planes[n]) for n in names]


_OUTLINE = [patheffects.withStroke(linewidth=3.0, foreground="black")]


def _aspect(surface: Surface) -> float | None:
    """Width / height of the plane in its coordinates, or ``None`` if too extreme to draw to scale."""
    span_x = float(surface.alphas[-1] - surface.alphas[0])
    span_y = float(surface.betas[-1] - surface.betas[0])
    if not (span_x > 0 and span_y > 0) or max(span_x, span_y) > 5 * min(span_x, span_y):
        return None
    return span_x / span_y


def _draw_plane(
    ax: Axes,
    surface: Surface,
    values: np.ndarray,
    scale: _Scale,
    extend: str,
    title: str,
) -> QuadContourSet:
    values = np.asarray(values, dtype=np.float64)
    masked = np.ma.masked_array(values, mask=~_usable(values, scale.log))
    alphas, betas = np.asarray(surface.alphas, dtype=np.float64), np.asarray(surface.betas, dtype=np.float64)
    ax.set_facecolor(BAD_COLOR)
    filled = ax.contourf(alphas, betas, masked, levels=scale.edges, cmap=CMAP, norm=scale.norm, extend=extend)
    n_bands = len(scale.edges) - 1
    step = max(1, n_bands // 10)
    line_levels = scale.edges[step:-1:step]
    if masked.count() and len(line_levels):
        lines = ax.contour(alphas, betas, masked, levels=line_levels, colors="black", linewidths=0.5, alpha=0.55)
        ax.clabel(lines, np.asarray(lines.levels)[::2], inline=True, fontsize=6.5, fmt=_fmt)
    bad = ~_usable(values, scale.log)
    if bad.any():
        bi, aj = np.nonzero(bad)
        ax.scatter(alphas[aj], betas[bi], marker="x", s=22, c="black", linewidths=1.2, zorder=4)
    ax.plot([0.0], [0.0], marker="+", ms=13, mew=2.0, color="white", path_effects=_OUTLINE, zorder=5, clip_on=False)
    gm = grid_minimum(surface, values=np.where(_usable(values, scale.log), values, np.nan))
    if math.isfinite(gm.loss):
        ax.plot([gm.alpha], [gm.beta], marker="*", ms=13, color="red", mec="white", mew=0.9, zorder=6, clip_on=False)
        title += f"\nmin {_fmt(gm.loss)} at ({_fmt(gm.alpha)}, {_fmt(gm.beta)})"
    counts = _bad_counts(values, scale.log)
    title += f"\n{counts}" if counts else "\n "
    ax.set_title(title, fontsize=9.5)
    xlabel, ylabel = _axis_labels(surface)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.set_xlim(float(alphas[0]), float(alphas[-1]))
    ax.set_ylim(float(betas[0]), float(betas[-1]))
    if _aspect(surface) is not None:
        ax.set_aspect("equal", adjustable="box")
    else:  # a strip too thin to read: keep it readable and say so
        ax.set_aspect("auto")
        ax.text(0.99, 0.01, "axes not to scale", transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    return filled


def _line_title(name: str, line: Line, snapshot: Snapshot) -> str:
    hess = snapshot.planes.get("hessian")
    if hess is not None and hess.eigenvalues is not None and name in ("v_max", "v_min"):
        lam = hess.eigenvalues[0 if name == "v_max" else 1]
        return f"1-D cut along {name} (λ={_fmt(lam)})"
    return f"1-D cut along {line.label or name}"


def _draw_line(
    ax: Axes, name: str, line: Line, snapshot: Snapshot, log_scale: bool, ylim: tuple[float, float] | None
) -> None:
    ts = np.asarray(line.ts, dtype=np.float64)
    series: list[tuple[str, np.ndarray, dict[str, Any]]] = [
        ("train", np.asarray(line.losses, dtype=np.float64), {"color": "C0", "lw": 1.6})
    ]
    if line.val_losses is not None:
        series.append(
            ("validation", np.asarray(line.val_losses, dtype=np.float64), {"color": "C1", "lw": 1.4, "ls": "--"})
        )
    use_log = log_scale and any(_usable(v, True).any() for _, v, _ in series)
    if use_log:
        ax.set_yscale("log")
    mid = len(ts) // 2
    n_bad = 0
    for label, values, style in series:
        ok = _usable(values, use_log)
        ax.plot(ts, np.where(ok, values, np.nan), label=label, **style)
        n_bad += int((~ok).sum())
        if not ok.all():
            ax.plot(
                ts[~ok],
                np.full(int((~ok).sum()), 0.97),
                ls="none",
                marker="x",
                color=style["color"],
                transform=ax.get_xaxis_transform(),
            )
        if ok[mid]:
            ax.plot([ts[mid]], [values[mid]], marker="+", ms=11, mew=1.8, color="black", zorder=5)
    ax.axvline(0.0, color="0.5", lw=0.8, ls=":", zorder=0)
    if ylim is not None:
        lo, hi = ylim
        if use_log:
            pad = 10 ** (0.05 * max(math.log10(hi / lo), 0.02))
            ax.set_ylim(lo / pad, hi * pad)
        else:
            pad = 0.05 * max(hi - lo, 1e-12 * max(abs(hi), 1.0))
            ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlim(float(ts[0]), float(ts[-1]))
    title = _line_title(name, line, snapshot)
    if n_bad:
        title += f" · {n_bad} masked (x)"
    ax.set_title(title, fontsize=9.5)
    ax.set_xlabel(f"t  (‖d‖={_fmt(line.d_norm)})" if math.isfinite(line.d_norm) else "t", fontsize=9)
    ax.set_ylabel("loss", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, lw=0.4, alpha=0.5)
    if len(series) > 1:
        ax.legend(fontsize=7.5, loc="best")


_PLANE_H, _LINE_H, _AX_H = 5.0, 2.7, 3.6


def figure_size(snapshot: Snapshot, show_val: bool = False) -> tuple[float, float]:
    """Width and height (inches) that :func:`snapshot_figure` gives this snapshot: planes drawn to
    scale about 3.6 in high, 1-D cuts below; take the largest over the frames of an animation."""
    planes = [s for _, s in _ordered_planes(snapshot)]
    n_rows = 2 if show_val and any(s.val_losses is not None for s in planes) else 1
    width = sum(min(_aspect(s) or 1.3, 2.5) * _AX_H + 1.0 for s in planes) + (1.3 if planes else 0.0)
    width = max(width, 4.0 * len(snapshot.lines) + 0.5, 6.0)
    height = (n_rows * _PLANE_H if planes else 0.0) + (_LINE_H if snapshot.lines else 0.0) + 0.5
    return round(width, 2), round(max(height, 2.5), 2)


def _center_loss(snapshot: Snapshot) -> tuple[float, float | None]:
    for _, s in _ordered_planes(snapshot):
        mid_b, mid_a = len(s.betas) // 2, len(s.alphas) // 2
        val = None if s.val_losses is None else float(s.val_losses[mid_b, mid_a])
        return s.center_loss, val
    for line in snapshot.lines.values():
        mid = len(line.ts) // 2
        return float(line.losses[mid]), None if line.val_losses is None else float(line.val_losses[mid])
    return math.nan, None


def snapshot_figure(
    snapshot: Snapshot,
    limits: tuple[float, float] | None = None,
    log_scale: bool = False,
    levels: int = 20,
    show_val: bool = False,
    *,
    line_limits: tuple[float, float] | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: float = 100.0,
) -> Figure:
    """One figure of a snapshot: its planes side by side (random left, Hessian right) and its 1-D cuts below.

    Args:
        snapshot: the frame to draw.
        limits: the colour range, in the units of :func:`color_limits` with the same ``log_scale``
            (decades of ``log10(loss)`` on a log scale); ``None``: this snapshot's own range.
        log_scale: colour (and 1-D cuts) on ``log10(loss)``; losses ``<= 0`` are masked.
        levels: number of colour bands (contour lines are drawn on about ten of their edges).
        show_val: add a second row of planes with the validation losses (same colour scale).
        line_limits: fixed y-range (loss units) of the 1-D cuts, for animations; ``None``: autoscale.
        figsize: inches; ``None``: :func:`figure_size` of this snapshot (pass one size for all
            frames of an animation).
        dpi: pixels per inch of the figure (and of :func:`figure_to_rgb`).

    The figure has one axes per drawn plane, one shared colour bar (if any plane) and one axes per
    1-D cut, in that order in ``fig.axes``.
    """
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels!r}")
    planes = _ordered_planes(snapshot)
    rows: list[tuple[str, bool]] = [("", False)]
    if show_val and any(s.val_losses is not None for _, s in planes):
        rows.append((" · validation", True))
    if planes and limits is None:
        try:
            limits = color_limits([s for _, s in planes], log_scale, include_val=len(rows) > 1)
        except ValueError:  # nothing finite anywhere: draw the grey grids and say so
            limits = (0.0, 1.0)
    lines = list(snapshot.lines.items())
    if figsize is None:
        figsize = figure_size(snapshot, show_val)
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    center, val_center = _center_loss(snapshot)
    title = f"step {snapshot.step}  ·  epoch {snapshot.epoch}  ·  centre loss {_fmt(center)}"
    if val_center is not None:
        title += f"  (validation {_fmt(val_center)})"
    fig.suptitle(title, fontsize=11.5)

    top: FigureBase
    bottom: FigureBase
    if planes and lines:
        subs = np.asarray(fig.subfigures(2, 1, height_ratios=[len(rows) * _PLANE_H, _LINE_H]), dtype=object)
        top, bottom = cast(FigureBase, subs[0]), cast(FigureBase, subs[1])
    else:
        top = bottom = fig
    if planes:
        assert limits is not None
        scale = _Scale.make(limits, log_scale, levels)
        grids = [
            np.asarray(s.val_losses if is_val else s.losses, dtype=np.float64)
            for _, is_val in rows
            for _, s in planes
            if not is_val or s.val_losses is not None
        ]
        extend = scale.extend(grids)
        ratios = [_aspect(s) or 1.0 for _, s in planes]
        axes = top.subplots(len(rows), len(planes), squeeze=False, width_ratios=ratios)
        filled = None
        for r, (suffix, is_val) in enumerate(rows):
            for c, (name, surface) in enumerate(planes):
                ax = axes[r][c]
                values = surface.val_losses if is_val else surface.losses
                if values is None:
                    ax.set_axis_off()
                    ax.text(0.5, 0.5, "no validation grid", ha="center", va="center", transform=ax.transAxes)
                    continue
                head = _PLANE_TITLES.get(surface.kind, f"{surface.kind} plane")
                if name not in _PLANE_ORDER and name != surface.kind:
                    head += f" '{name}'"
                filled = _draw_plane(ax, surface, values, scale, extend, head + suffix)
        assert filled is not None
        cbar = top.colorbar(filled, ax=axes.ravel().tolist(), shrink=0.9, pad=0.02, aspect=30)
        cbar.set_label("loss (log scale)" if log_scale else "loss", fontsize=9)
        cbar.ax.tick_params(labelsize=8)
        cbar.set_ticks(list(scale.ticks()))
        cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _fmt(x)))
        cbar.ax.minorticks_off()
        handles: list[Any] = [
            Line2D([], [], ls="none", marker="+", ms=10, mew=2.0, color="white", path_effects=_OUTLINE),
            Line2D([], [], ls="none", marker="*", ms=11, color="red", mec="white", mew=0.8),
            Line2D([], [], ls="none", marker="x", ms=6, mew=1.2, color="black"),
            Patch(facecolor=BAD_COLOR, edgecolor="black", lw=0.5),
        ]
        names = [
            "centre = current weights",
            "grid minimum",
            "masked point (non-finite" + (" or ≤ 0)" if log_scale else ")"),
            "no data, not interpolated",
        ]
        ncol = 4 if fig.get_figwidth() >= 8.5 else 2
        top.legend(handles, names, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
    if lines:
        line_axes = bottom.subplots(1, len(lines), squeeze=False)[0]
        for ax, (name, line) in zip(line_axes, lines):
            _draw_line(ax, name, line, snapshot, log_scale, line_limits)
    if not planes and not lines:
        fig.text(0.5, 0.5, "empty snapshot: no planes and no 1-D cuts", ha="center", va="center")
    return fig


# --------------------------------------------------------------------------------------------
# pixels and animations


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """The figure drawn by Agg, as an ``(H, W, 3)`` ``uint8`` array (no pyplot involved)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()  # type: ignore[no-untyped-call]
    rgba = np.asarray(canvas.buffer_rgba())  # type: ignore[no-untyped-call]
    return np.array(rgba[..., :3], dtype=np.uint8, copy=True)


def _frames_to_images(frames: Sequence[np.ndarray]) -> list[Image.Image]:
    """Palette images sharing one palette, converted one frame at a time (frames may be loaded lazily)."""
    if len(frames) == 0:
        raise ValueError("an animation needs at least one frame")
    shape = np.asarray(frames[0]).shape
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"frames must be (H, W, 3) arrays, got shape {shape}")

    def rgb_image(i: int) -> Image.Image:
        arr = np.asarray(frames[i])
        if arr.shape != shape:
            raise ValueError(f"all frames must have the same size: frame 0 is {shape}, frame {i} is {arr.shape}")
        return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="RGB")

    # One palette for all frames (from the first, middle and last), so that a colour means the
    # same loss in every frame instead of shimmering with per-frame palettes.
    picks = sorted({0, len(frames) // 2, len(frames) - 1})
    strip = Image.new("RGB", (shape[1], shape[0] * len(picks)))
    for k, i in enumerate(picks):
        strip.paste(rgb_image(i), (0, k * shape[0]))
    palette = strip.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    return [rgb_image(i).quantize(palette=palette, dither=Image.Dither.NONE) for i in range(len(frames))]


def gif_bytes(frames: Sequence[np.ndarray], fps: float = 2.0) -> bytes:
    """Encode ``(H, W, 3)`` ``uint8`` frames of one size as an animated GIF that loops forever.

    All frames share one palette. Note that GIF stores durations in 10 ms steps, and that
    consecutive identical frames are merged into one longer frame by Pillow.
    """
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be positive, got {fps!r}")
    images = _frames_to_images(frames)
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=max(round(1000.0 / fps), 20),
        loop=0,
        disposal=1,
    )
    return buffer.getvalue()


def write_gif(frames: Sequence[np.ndarray], path: Path, fps: float = 2.0) -> Path:
    """Write :func:`gif_bytes` to ``path`` atomically (temporary file, then ``os.replace``); return the path."""
    data = gif_bytes(frames, fps)
    return atomic_write(Path(path), lambda fh: fh.write(data))


def _save_png(rgb: np.ndarray, path: Path) -> Path:
    """The pixels of :func:`figure_to_rgb` as a PNG (drawn once for both the PNG and the GIF)."""
    return atomic_write(path, lambda fh: Image.fromarray(rgb, mode="RGB").save(fh, format="PNG", optimize=False))


# --------------------------------------------------------------------------------------------
# whole runs


def snapshot_dirs(directory: Path) -> list[Path]:
    """Snapshot directories under ``directory``: itself if it holds ``step_*.npz`` files, else its
    ``landscape/<prefix>/`` folders (a run dir), else its own sub-folders (a ``landscape`` dir)."""
    directory = Path(directory)
    if list_snapshots(directory):
        return [directory]
    for parent in (directory / "landscape", directory):
        if parent.is_dir():
            found = sorted(p for p in parent.iterdir() if p.is_dir() and list_snapshots(p))
            if found:
                return found
    return []


def render_run(
    directory: Path,
    out: Path | None = None,
    log_scale: bool = False,
    clip: float | None = None,
    fps: float = 2.0,
    levels: int = 20,
    *,
    show_val: bool = False,
) -> list[Path]:
    """Re-render every snapshot of a snapshot directory (or of each ``landscape/<prefix>/`` of a run dir).

    Each snapshot becomes ``<out>/step_<step>.png``, all with ONE colour scale
    (:func:`color_limits` over every snapshot's planes) and fixed 1-D-cut axes, and the frames
    become ``<out>/animation.gif``. ``out`` defaults to the snapshot directory itself; for a run
    dir it gets one sub-folder per prefix. Returns the written paths (PNGs in step order, then the
    GIF, per directory). Raises :class:`NoSnapshotsError` if there is nothing to render.
    """
    directory = Path(directory)
    sources = snapshot_dirs(directory)
    if not sources:
        raise NoSnapshotsError(
            f"no landscape snapshots (step_*.npz) in {directory} or in its landscape/<prefix>/ folders"
        )
    written: list[Path] = []
    for source in sources:
        if out is None:
            target = source
        elif source == directory:
            target = Path(out)
        else:
            target = Path(out) / source.name
        written += _render_directory(source, target, log_scale, clip, fps, levels, show_val)
    return written


def _render_directory(
    source: Path, target: Path, log_scale: bool, clip: float | None, fps: float, levels: int, show_val: bool
) -> list[Path]:
    paths = list_snapshots(source)
    snapshots = [load_snapshot(p) for p in paths]
    surfaces = [s for snap in snapshots for s in snap.planes.values()]
    sizes = [figure_size(snap, show_val) for snap in snapshots]
    figsize = (max(w for w, _ in sizes), max(h for _, h in sizes))
    limits: tuple[float, float] | None = None
    if surfaces:
        try:
            limits = color_limits(surfaces, log_scale, clip, include_val=show_val)
        except ValueError:
            if clip is not None:
                raise
            limits = (0.0, 1.0)  # nothing finite in any frame: grey grids, honestly
    line_limits = _line_limits((line for snap in snapshots for line in snap.lines.values()), log_scale)
    if line_limits is not None and clip is not None:  # the cuts' axes stop where the colour scale does
        line_limits = (line_limits[0], max(min(line_limits[1], clip), line_limits[0]))
    written: list[Path] = []
    for path, snap in zip(paths, snapshots):
        fig = snapshot_figure(snap, limits, log_scale, levels, show_val, line_limits=line_limits, figsize=figsize)
        written.append(_save_png(figure_to_rgb(fig), target / f"{path.stem}.png"))
        del fig
    written.append(write_gif(_PngFrames(list(written)), target / ANIMATION_NAME, fps))
    return written


class _PngFrames(Sequence[np.ndarray]):
    """The written PNGs as animation frames, read one at a time (a long run's frames need not fit in memory)."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = paths

    def __len__(self) -> int:
        return len(self._paths)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[np.ndarray]: ...
    def __getitem__(self, index: int | slice) -> np.ndarray | Sequence[np.ndarray]:
        if isinstance(index, slice):
            return _PngFrames(self._paths[index])
        with Image.open(self._paths[index]) as im:
            return np.asarray(im.convert("RGB"))
