"""Figures and animations of landscape snapshots: rendering never computes, computing never renders.

Everything here only draws data it is given (:class:`~lightning_hessian.snapshots.Snapshot`
files written during training) and never evaluates a loss, so a run can be re-plotted at any
time with another colour scale, clip value or number of levels. Matplotlib is used without
``pyplot``: every figure is a plain :class:`matplotlib.figure.Figure` on its own Agg canvas, so
nothing is registered in pyplot's global figure list, no GUI backend is touched and figures are
freed as soon as they are no longer referenced.

How the colour scale is chosen (:func:`choose_scales`):

* **per plane** by default: the random plane spans one filter unit and the Hessian plane the
  curvature scale, so their losses differ by orders of magnitude and one shared scale paints
  the narrower plane a single colour; ``shared_scale=True`` puts every plane on one scale (to
  compare the planes' values);
* **robust limits**: the 1st to 98th percentile of the finite losses, not the extreme corner;
  values beyond the limits take the end colours and the colour bar gets an arrow;
* **log scale** ``"auto"``: ``log10(loss)`` when the limits span more than 1.5 decades and every
  finite loss is positive; ``True``/``False`` force it. The loss itself is logged, never shifted,
  and losses ``<= 0`` are masked and counted;
* for an animation (:func:`render_run`) the limits, the log choice and each plane's extent are
  computed once over all frames, so nothing jumps between frames (a frame far wider than the
  others, such as one at initialisation, is cropped rather than shrinking the others to a dot).

Honesty rules of the pictures: non-finite losses are masked, never interpolated (grey cells,
``x`` marks, counted in the title); colour bands only ever widen the range to the next round
value; the current weights sit at ``(0, 0)`` (white plus), the lowest grid point is a red star;
the legend lists only what the picture shows.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast, overload

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.contour import QuadContourSet
from matplotlib.figure import Figure, FigureBase
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from PIL import Image

from lightning_hessian._files import atomic_write
from lightning_hessian.indicators import grid_minimum
from lightning_hessian.landscape import Line, Surface
from lightning_hessian.snapshots import Snapshot, list_snapshots, load_snapshot

__all__ = [
    "AUTO_LOG_DECADES",
    "EXTENT_SPREAD",
    "PERCENTILES",
    "LogScale",
    "NoSnapshotsError",
    "PlaneScale",
    "Scales",
    "choose_scales",
    "color_limits",
    "figure_size",
    "figure_to_rgb",
    "gif_bytes",
    "render_run",
    "snapshot_dirs",
    "snapshot_figure",
    "write_gif",
]

LogScale = bool | Literal["auto"]
"""``True``: colour by ``log10(loss)``; ``False``: by the loss; ``"auto"``: log when the range is wide."""

CMAP = "viridis"
BAD_COLOR = "#d4d4d4"
"""What shows through where a sampled grid has no colour (masked cells)."""
OUTSIDE_COLOR = "white"
"""Panel area outside this frame's grid (when a plane's extent is fixed over an animation)."""
ANIMATION_NAME = "animation.gif"
AUTO_LOG_DECADES = 1.5
"""``log_scale="auto"`` draws ``log10(loss)`` when the colour limits span more decades than this."""
PERCENTILES = (1.0, 98.0)
"""Default colour limits: these percentiles of the finite losses (robust to a blown-up corner)."""
EXTENT_SPREAD = 2.0
"""Frames more than this many times wider than an animation's median frame are cropped to the others' extent."""

_PLANE_ORDER = ("random", "hessian")
_ALPHA, _BETA = "\N{GREEK SMALL LETTER ALPHA}", "\N{GREEK SMALL LETTER BETA}"
_PLANE_TITLES = {"random": "random plane", "hessian": "Hessian plane", "custom": "custom plane"}

# Sizes for TensorBoard's image card (shown about 450 px wide): big type, few words.
_FS_SUPTITLE, _FS_TITLE, _FS_LABEL, _FS_TICK, _FS_LEGEND = 17.0, 15.5, 14.0, 13.0, 14.0
_PANEL, _LINE_H = 2.7, 2.9
"""Side of a square plane panel and height of the 1-D cuts' row (inches at 100 dpi)."""


class NoSnapshotsError(FileNotFoundError):
    """No ``step_*.npz`` snapshot was found where one was expected."""


# --------------------------------------------------------------------------------------------
# choosing the colour scale (pure numpy on the saved grids)


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


def _finite(grids: Iterable[np.ndarray]) -> np.ndarray:
    """All finite values of many grids, flattened into one array."""
    parts = [g[np.isfinite(g)] for g in (np.asarray(x, dtype=np.float64) for x in grids)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _wants_log(low: float, high: float, smallest: float) -> bool:
    """The ``"auto"`` rule: log when every value is positive and ``[low, high]`` spans > 1.5 decades."""
    return smallest > 0 and low > 0 and high > low * 10.0**AUTO_LOG_DECADES


def _check_percentiles(percentiles: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(percentiles[0]), float(percentiles[1])
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
    return lo, hi


def _check_log_scale(log_scale: object) -> LogScale:
    if isinstance(log_scale, bool):
        return log_scale
    if log_scale == "auto":
        return "auto"
    raise ValueError(f"log_scale must be True, False or 'auto', got {log_scale!r}")


@dataclass(frozen=True)
class PlaneScale:
    """How one plane is coloured and framed.

    Attributes:
        low, high: colour limits in loss units (before rounding the band edges outwards).
        log: colour by ``log10(loss)``.
        extent: half-widths ``(alpha, beta)`` of the drawn panel; ``None``: the grid's own.
    """

    low: float
    high: float
    log: bool
    extent: tuple[float, float] | None = None


@dataclass(frozen=True)
class Scales:
    """Everything that must stay fixed across the frames of one animation.

    Attributes:
        planes: the scale of each plane name (the same limits for all when ``shared``).
        shared: one colour bar for all planes.
        line_limits: y-range of the 1-D cuts in loss units (``None``: autoscale); line_log: log y-axis.
        line_extents: half-width of each 1-D cut's t-axis, by cut name.
    """

    planes: Mapping[str, PlaneScale]
    shared: bool = False
    line_limits: tuple[float, float] | None = None
    line_log: bool = False
    line_extents: Mapping[str, float] = field(default_factory=dict)


_GREY = PlaneScale(0.0, 1.0, False)
"""The scale of a plane with no finite loss at all: grey grids, honestly."""


def _plane_scale(
    grids: Sequence[np.ndarray], log_scale: LogScale, clip: float | None, percentiles: tuple[float, float]
) -> PlaneScale | None:
    """Robust limits and the log decision for the pooled values of some grids; ``None`` if none is usable."""
    values = _finite(grids)
    if log_scale is True:
        values = values[values > 0]
    if values.size == 0:
        return None
    low, high = (float(x) for x in np.percentile(values, percentiles))
    if clip is not None:
        if not math.isfinite(clip) or (log_scale is True and clip <= 0):
            raise ValueError(f"clip must be a finite{' positive' if log_scale is True else ''} loss, got {clip!r}")
        if clip <= low:
            raise ValueError(f"clip={clip!r} is not above the lowest loss on the scale ({low:.4g})")
        high = min(high, float(clip))
    log = log_scale if isinstance(log_scale, bool) else _wants_log(low, high, float(values.min()))
    return PlaneScale(low, high, log)


def color_limits(
    surfaces: Iterable[Surface],
    log_scale: LogScale = False,
    clip: float | None = None,
    *,
    include_val: bool = False,
    percentiles: tuple[float, float] = PERCENTILES,
) -> tuple[float, float]:
    """One colour range ``(low, high)`` pooled over many surfaces (planes, frames).

    The limits are ``percentiles`` of the finite losses (``(0, 100)``: the exact extremes). Units:
    loss units for ``log_scale=False`` and ``"auto"``; decades of ``log10(loss)`` over the
    positive losses for ``True``. ``clip`` (loss units) caps the top; ``include_val`` also counts
    the validation grids. Raises ``ValueError`` when there is nothing to scale or when ``clip``
    is not above the low limit. :func:`choose_scales` gives the full choice (per plane, extents).
    """
    mode = _check_log_scale(log_scale)
    grids = [g for s in surfaces for g in _plane_values(s, include_val)]
    scale = _plane_scale(grids, mode, clip, _check_percentiles(percentiles))
    if scale is None:
        raise ValueError("no finite" + (" positive" if mode is True else "") + " loss to set a colour range from")
    if mode is True:
        return math.log10(scale.low), math.log10(scale.high)
    return scale.low, scale.high


def _robust_half_width(widths: Sequence[float]) -> float:
    """A half-width for all frames: the widest frame's, leaving out frames more than
    :data:`EXTENT_SPREAD` times wider than the median one (a frame at initialisation can be 25
    times wider than the rest: it is cropped instead of shrinking every other frame to a dot)."""
    median = float(np.median(widths))
    return float(max(w for w in widths if w <= EXTENT_SPREAD * median))


def _extent(surfaces: Sequence[Surface]) -> tuple[float, float]:
    """The fixed half-widths ``(alpha, beta)`` of one plane over the frames of an animation."""
    return (
        _robust_half_width([float(np.max(np.abs(s.alphas))) for s in surfaces]),
        _robust_half_width([float(np.max(np.abs(s.betas))) for s in surfaces]),
    )


def _fits(widths: Sequence[float], extent: Sequence[float]) -> bool:
    return all(w <= e * (1.0 + 1e-9) for w, e in zip(widths, extent))


def _shown_values(surfaces: Sequence[Surface], extent: tuple[float, float], include_val: bool) -> list[np.ndarray]:
    """What the colour scale must fit: the frames drawn whole (cropped outlier frames are drawn on their scale)."""
    whole = [s for s in surfaces if _fits((float(np.max(np.abs(s.alphas))), float(np.max(np.abs(s.betas)))), extent)]
    return [g for s in whole or surfaces for g in _plane_values(s, include_val)]


def _line_scale(lines: Sequence[Line], extent: float, log_scale: LogScale) -> tuple[tuple[float, float] | None, bool]:
    """The y-range (loss units, exact extremes) and log choice of 1-D cuts, from the cuts drawn whole."""
    whole = [line for line in lines if _fits([float(np.max(np.abs(line.ts)))], [extent])] or lines
    values = _finite(v for line in whole for v in (line.losses, line.val_losses) if v is not None)
    if log_scale is True:
        values = values[values > 0]
    if values.size == 0:
        return None, log_scale is True
    low, high = float(values.min()), float(values.max())
    return (low, high), log_scale if isinstance(log_scale, bool) else _wants_log(low, high, low)


def _cut_scales(
    snapshots: Sequence[Snapshot], mode: LogScale, clip: float | None
) -> tuple[tuple[float, float] | None, bool, dict[str, float]]:
    """The 1-D cuts' common y-range and log choice, and each cut's fixed t half-width."""
    cuts: dict[str, list[Line]] = {}
    for snap in snapshots:
        for name, line in snap.lines.items():
            cuts.setdefault(name, []).append(line)
    extents = {name: _robust_half_width([float(np.max(np.abs(x.ts))) for x in group]) for name, group in cuts.items()}
    low, high, logs = math.inf, -math.inf, []
    for name, group in cuts.items():
        limits, log = _line_scale(group, extents[name], mode)
        if limits is not None:
            low, high = min(low, limits[0]), max(high, limits[1])
            logs.append(log)
    if not math.isfinite(low):
        return None, mode is True, extents
    if clip is not None:  # the cuts' axes stop where the colour scale does
        high = max(min(high, clip), low)
    line_log = mode if isinstance(mode, bool) else all(logs) and _wants_log(low, high, low)
    return (low, high), line_log, extents


def choose_scales(
    snapshots: Sequence[Snapshot],
    log_scale: LogScale = "auto",
    *,
    shared: bool = False,
    clip: float | None = None,
    percentiles: tuple[float, float] = PERCENTILES,
    include_val: bool = False,
) -> Scales:
    """The colour scales, extents and 1-D-cut axes of one or many frames (one animation).

    Each plane's extent is the widest frame's, leaving out frames more than :data:`EXTENT_SPREAD`
    times wider than the median frame: those are drawn cropped, on the scales the other frames
    set (their overflow shows as the end colours).

    Args:
        snapshots: the frames (one for a single picture).
        log_scale: ``True``, ``False`` or ``"auto"`` (log when the limits span more than
            :data:`AUTO_LOG_DECADES` decades and every finite loss is positive), decided per
            plane, or once for all planes when ``shared``.
        shared: one colour scale for all planes (to compare them) instead of one per plane.
        clip: cap of the colour scale in loss units.
        percentiles: the colour limits are these percentiles of the pooled finite losses.
        include_val: the validation grids count too.
    """
    mode = _check_log_scale(log_scale)
    pcts = _check_percentiles(percentiles)
    by_name: dict[str, list[Surface]] = {}
    for snap in snapshots:
        for name, surface in _ordered_planes(snap):
            by_name.setdefault(name, []).append(surface)
    extents = {name: _extent(surfaces) for name, surfaces in by_name.items()}
    shown = {name: _shown_values(surfaces, extents[name], include_val) for name, surfaces in by_name.items()}
    if shared:
        common = _plane_scale([g for grids in shown.values() for g in grids], mode, clip, pcts) or _GREY
        planes = {name: replace(common, extent=extents[name]) for name in by_name}
    else:
        planes = {
            name: replace(_plane_scale(shown[name], mode, clip, pcts) or _GREY, extent=extents[name])
            for name in by_name
        }
    line_limits, line_log, line_extents = _cut_scales(snapshots, mode, clip)
    return Scales(planes, shared, line_limits, line_log, line_extents)


def _legacy_scales(scales: Scales, limits: tuple[float, float], log_scale: LogScale) -> Scales:
    """Scales with every plane on the given :func:`color_limits` (in that function's units)."""
    low, high = float(limits[0]), float(limits[1])
    if not (math.isfinite(low) and math.isfinite(high)) or high < low:
        raise ValueError(f"colour limits must be finite with low <= high, got {limits!r}")
    if log_scale is True:
        low, high, log = 10.0**low, 10.0**high, True
    elif log_scale is False:
        log = False
    else:
        log = _wants_log(low, high, low)
    planes = {n: PlaneScale(low, high, log, p.extent) for n, p in scales.planes.items()}
    return replace(scales, planes=planes, shared=True)


# --------------------------------------------------------------------------------------------
# colour bands


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
        """Round colour-bar ticks inside the edges: about 5 equal steps, or 1-2-5 (or 1) per decade on a log scale."""
        lo, hi = float(self.edges[0]), float(self.edges[-1])
        if self.log and hi / lo >= 10:
            mant = self.edges / 10.0 ** np.floor(np.log10(self.edges) + 1e-9)
            ticks = self.edges
            for keep in ((1.0, 2.0, 5.0), (1.0,)):
                ticks = np.asarray(
                    self.edges[np.isclose(mant[:, None], np.array(keep)[None, :], rtol=1e-6).any(axis=1)]
                )
                if len(ticks) <= 7:
                    break
            return ticks
        ticks = np.asarray(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi), dtype=float)
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


# --------------------------------------------------------------------------------------------
# one figure


def _fmt(x: float) -> str:
    return f"{x:.3g}".replace("-", "\N{MINUS SIGN}")


def _capped_axes(surface: Surface) -> tuple[bool, bool]:
    """Which Hessian-plane axes had their curvature-scale span capped (from the plane's metadata)."""
    capped = surface.meta.get("span_capped")
    if isinstance(capped, (list, tuple)) and len(capped) == 2:
        return bool(capped[0]), bool(capped[1])
    return False, False


def _axis_labels(surface: Surface) -> tuple[str, str]:
    """Short axis labels that carry the scale: eigenvalues on a Hessian plane, direction norms otherwise."""
    if surface.kind == "hessian" and surface.eigenvalues is not None:
        names = ("v_max", "v_min")
        capped = _capped_axes(surface)
        return cast(
            tuple[str, str],
            tuple(
                f"{sym} · {name} (λ={_fmt(lam)}{', capped' if cap else ''})"
                for sym, name, lam, cap in zip((_ALPHA, _BETA), names, surface.eigenvalues, capped)
            ),
        )
    labels = []
    for k, (sym, name, norm) in enumerate(
        ((_ALPHA, surface.labels[0], surface.d1_norm), (_BETA, surface.labels[1], surface.d2_norm)), start=1
    ):
        text = f"{sym} · d{k}" if surface.kind == "random" else f"{sym} · {name}"
        if math.isfinite(norm) and not math.isclose(norm, 1.0, rel_tol=1e-6):
            text += f" (‖d‖={_fmt(norm)})"
        labels.append(text)
    return labels[0], labels[1]


def _ordered_planes(snapshot: Snapshot) -> list[tuple[str, Surface]]:
    names = [n for n in _PLANE_ORDER if n in snapshot.planes]
    names += [n for n in snapshot.planes if n not in names]
    return [(n, snapshot.planes[n]) for n in names]


@dataclass
class _Shown:
    """What the pictures of one figure actually contain (so that the legend lists only that)."""

    minimum: bool = False
    masked: bool = False
    nonpositive: bool = False


def _draw_plane(
    ax: Axes, surface: Surface, values: np.ndarray, scale: _Scale, extend: str, title: str, plane: PlaneScale
) -> tuple[QuadContourSet, _Shown]:
    """One plane in a square panel: filled bands, a few unlabelled contour lines, the markers."""
    values = np.asarray(values, dtype=np.float64)
    ok = _usable(values, scale.log)
    alphas, betas = np.asarray(surface.alphas, dtype=np.float64), np.asarray(surface.betas, dtype=np.float64)
    ax.set_facecolor(OUTSIDE_COLOR)
    x0, y0 = float(alphas[0]), float(betas[0])
    ax.add_patch(
        Rectangle((x0, y0), float(alphas[-1]) - x0, float(betas[-1]) - y0, facecolor=BAD_COLOR, lw=0, zorder=0.5)
    )
    masked = np.ma.masked_array(values, mask=~ok)
    filled = ax.contourf(alphas, betas, masked, levels=scale.edges, cmap=CMAP, norm=scale.norm, extend=extend)
    line_levels = [t for t in scale.ticks() if scale.edges[0] < t < scale.edges[-1]]
    if masked.count() and line_levels:
        ax.contour(alphas, betas, masked, levels=line_levels, colors="black", linewidths=0.6, alpha=0.45)
    shown = _Shown(masked=bool((~ok).any()), nonpositive=bool((np.isfinite(values) & (values <= 0)).any()))
    if shown.masked:
        bi, aj = np.nonzero(~ok)
        ax.scatter(alphas[aj], betas[bi], marker="x", s=30, c="black", linewidths=1.4, zorder=4)
    ax.plot([0.0], [0.0], marker="P", ms=13, color="white", mec="black", mew=1.2, zorder=5, clip_on=False)
    ex, ey = plane.extent if plane.extent is not None else (abs(x0), abs(y0))
    cropped = abs(x0) > ex * (1 + 1e-9) or abs(y0) > ey * (1 + 1e-9)
    gm = grid_minimum(surface, values=np.where(ok, values, np.nan))
    subtitle = []
    if math.isfinite(gm.loss):
        shown.minimum = True
        ax.plot([gm.alpha], [gm.beta], marker="*", ms=16, color="red", mec="white", mew=1.0, zorder=6, clip_on=cropped)
        subtitle.append(f"min {_fmt(gm.loss)}")
    if shown.masked:
        subtitle.append(f"{int((~ok).sum())} masked")
    if cropped:
        subtitle.append("cropped")
    ax.set_title(title + "\n" + (" · ".join(subtitle) or " "), fontsize=_FS_TITLE)
    xlabel, ylabel = _axis_labels(surface)
    ax.set_xlabel(xlabel, fontsize=_FS_LABEL)
    ax.set_ylabel(ylabel, fontsize=_FS_LABEL)
    ax.tick_params(labelsize=_FS_TICK)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, symmetric=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4, symmetric=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _fmt(x)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _fmt(x)))
    ax.set_xlim(-ex, ex)
    ax.set_ylim(-ey, ey)
    ax.set_box_aspect(1.0)  # square panels: each plane readable whatever its extents (the labels carry the scale)
    return filled, shown


def _line_title(name: str, line: Line, snapshot: Snapshot) -> str:
    hess = snapshot.planes.get("hessian")
    if hess is not None and hess.eigenvalues is not None and name in ("v_max", "v_min"):
        lam = hess.eigenvalues[0 if name == "v_max" else 1]
        return f"along {name} (λ={_fmt(lam)})"
    return f"along {line.label or name}"


def _line_ylim(ax: Axes, ylim: tuple[float, float], use_log: bool) -> None:
    lo, hi = ylim
    if use_log:
        pad = 10 ** (0.05 * max(math.log10(hi / lo), 0.02))
        ax.set_ylim(lo / pad, hi * pad)
    else:
        pad = 0.05 * max(hi - lo, 1e-12 * max(abs(hi), 1.0))
        ax.set_ylim(lo - pad, hi + pad)


def _draw_line(ax: Axes, name: str, line: Line, snapshot: Snapshot, scales: Scales) -> None:
    """One 1-D cut: train (and validation) loss against t, masked points as ``x`` at the top."""
    ts = np.asarray(line.ts, dtype=np.float64)
    series: list[tuple[str, np.ndarray, dict[str, Any]]] = [
        ("train", np.asarray(line.losses, dtype=np.float64), {"color": "C0", "lw": 2.0})
    ]
    if line.val_losses is not None:
        series.append(
            ("validation", np.asarray(line.val_losses, dtype=np.float64), {"color": "C1", "lw": 1.8, "ls": "--"})
        )
    use_log = scales.line_log and any(_usable(v, True).any() for _, v, _ in series)
    if use_log:
        ax.set_yscale("log")
        lo, hi = scales.line_limits or (1.0, 1.0)
        wide = lo > 0 and hi / lo > 10.0**AUTO_LOG_DECADES
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: _fmt(y)))
        ax.yaxis.set_minor_formatter(NullFormatter())
    mid = len(ts) // 2
    n_bad = 0
    for label, values, style in series:
        ok = _usable(values, use_log)
        ax.plot(ts, np.where(ok, values, np.nan), label=label, **style)
        n_bad += int((~ok).sum())
        if not ok.all():
            top = np.full(int((~ok).sum()), 0.97)
            ax.plot(ts[~ok], top, ls="none", marker="x", color=style["color"], transform=ax.get_xaxis_transform())
        if ok[mid]:
            ax.plot([ts[mid]], [values[mid]], marker="+", ms=13, mew=2.0, color="black", zorder=5)
    ax.axvline(0.0, color="0.5", lw=0.8, ls=":", zorder=0)
    if scales.line_limits is not None and (not use_log or scales.line_limits[0] > 0):
        _line_ylim(ax, scales.line_limits, use_log)
    half = scales.line_extents.get(name, float(np.max(np.abs(ts))))
    ax.set_xlim(-half, half)
    title = _line_title(name, line, snapshot) + (f" · {n_bad} masked" if n_bad else "")
    if not _fits([float(np.max(np.abs(ts)))], [half]):
        title += " · cropped"
    ax.set_title(title, fontsize=_FS_TITLE)
    unit = math.isfinite(line.d_norm) and math.isclose(line.d_norm, 1.0, rel_tol=1e-6)
    ax.set_xlabel("t" if unit or not math.isfinite(line.d_norm) else f"t (‖d‖={_fmt(line.d_norm)})", fontsize=_FS_LABEL)
    ax.set_ylabel("loss", fontsize=_FS_LABEL)
    ax.tick_params(labelsize=_FS_TICK)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, symmetric=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _fmt(x)))
    ax.grid(True, lw=0.4, alpha=0.5)
    if len(series) > 1:
        ax.legend(fontsize=_FS_LEGEND - 1.5, loc="best")


def _rows(snapshot: Snapshot, show_val: bool) -> list[tuple[str, bool]]:
    planes = snapshot.planes.values()
    rows = [("", False)]
    if show_val and any(s.val_losses is not None for s in planes):
        rows.append((" · validation", True))
    return rows


def figure_size(snapshot: Snapshot, show_val: bool = False, *, shared: bool = False) -> tuple[float, float]:
    """Width and height (inches) that :func:`snapshot_figure` gives this snapshot: square plane
    panels side by side (a colour bar each, or one when ``shared``), the 1-D cuts below; take the
    largest over the frames of an animation."""
    n_planes, n_lines = len(snapshot.planes), len(snapshot.lines)
    colorbars = (1 if n_planes else 0) if shared else n_planes
    width = n_planes * (_PANEL + 0.95) + colorbars * 1.0 + 0.2
    width = max(width, 4.3 * n_lines + 0.3, 4.0)
    legend = 0.5
    planes_h = len(_rows(snapshot, show_val)) * (_PANEL + 1.4) + legend if n_planes else 0.0
    height = planes_h + (_LINE_H if n_lines else 0.0) + 0.5
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


def _legend(section: FigureBase, shown: _Shown, width: float) -> None:
    """Legend entries for what the planes show, and nothing else."""
    entries: list[tuple[Any, str]] = [
        (Line2D([], [], ls="none", marker="P", ms=12, color="white", mec="black", mew=1.2), "weights")
    ]
    if shown.minimum:
        entries.append((Line2D([], [], ls="none", marker="*", ms=14, color="red", mec="white", mew=0.8), "grid min"))
    if shown.masked:
        what = "NaN, inf or ≤ 0" if shown.nonpositive else "NaN or inf"
        entries.append((Line2D([], [], ls="none", marker="x", ms=8, mew=1.4, color="black"), f"masked ({what})"))
        entries.append((Patch(facecolor=BAD_COLOR, edgecolor="black", lw=0.5), "no data"))
    ncol = len(entries) if width >= 8.0 or len(entries) <= 2 else 2
    handles, names = zip(*entries)
    section.legend(
        list(handles), list(names), loc="outside lower center", ncol=ncol, fontsize=_FS_LEGEND, frameon=False
    )


def _colorbar(section: FigureBase, filled: QuadContourSet, axes: list[Axes], scale: _Scale) -> None:
    cbar = section.colorbar(filled, ax=axes, shrink=0.85, pad=0.03, aspect=18)
    cbar.set_label("loss (log)" if scale.log else "loss", fontsize=_FS_LABEL)
    cbar.ax.tick_params(labelsize=_FS_TICK)
    cbar.set_ticks(list(scale.ticks()))
    cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _fmt(x)))
    cbar.ax.minorticks_off()


def _draw_planes(
    section: FigureBase, snapshot: Snapshot, scales: Scales, rows: list[tuple[str, bool]], levels: int, width: float
) -> None:
    """The plane panels (a row per train/validation), their colour bars and the legend."""
    planes = _ordered_planes(snapshot)
    axes = section.subplots(len(rows), len(planes), squeeze=False)
    shown = _Shown()
    columns: list[tuple[QuadContourSet, list[Axes], _Scale]] = []
    for c, (name, surface) in enumerate(planes):
        plane = scales.planes.get(name) or _GREY
        limits = (math.log10(plane.low), math.log10(plane.high)) if plane.log else (plane.low, plane.high)
        scale = _Scale.make(limits, plane.log, levels)
        grids = [np.asarray(g, dtype=np.float64) for g in (surface.losses, surface.val_losses) if g is not None]
        extend = scale.extend(grids[: len(rows)])
        filled = None
        for r, (suffix, is_val) in enumerate(rows):
            ax = axes[r][c]
            values = surface.val_losses if is_val else surface.losses
            if values is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, "no validation grid", ha="center", va="center", transform=ax.transAxes)
                continue
            head = _PLANE_TITLES.get(surface.kind, f"{surface.kind} plane")
            if name not in _PLANE_ORDER and name != surface.kind:
                head += f" '{name}'"
            filled, seen = _draw_plane(ax, surface, values, scale, extend, head + suffix, plane)
            shown.minimum |= seen.minimum
            shown.masked |= seen.masked
            shown.nonpositive |= seen.nonpositive
        if filled is not None:
            columns.append((filled, [axes[r][c] for r in range(len(rows))], scale))
    if scales.shared and columns:
        _colorbar(section, columns[-1][0], [ax for _, col, _ in columns for ax in col], columns[-1][2])
    else:
        for filled, col, scale in columns:
            _colorbar(section, filled, col, scale)
    _legend(section, shown, width)


def snapshot_figure(
    snapshot: Snapshot,
    limits: tuple[float, float] | None = None,
    log_scale: LogScale = "auto",
    levels: int = 20,
    show_val: bool = False,
    *,
    scales: Scales | None = None,
    shared_scale: bool = False,
    percentiles: tuple[float, float] = PERCENTILES,
    line_limits: tuple[float, float] | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: float = 100.0,
) -> Figure:
    """One figure of a snapshot: its planes side by side (random left, Hessian right), its 1-D cuts below.

    Args:
        snapshot: the frame to draw.
        limits: one colour range for all planes, in the units of :func:`color_limits` with the same
            ``log_scale``; ``None``: chosen from this snapshot (see ``scales``).
        log_scale: ``True``, ``False`` or ``"auto"`` (see :func:`choose_scales`).
        levels: number of colour bands.
        show_val: add a second row of planes with the validation losses (on the train row's scales).
        scales: colour scales, extents and cut axes fixed over an animation (:func:`choose_scales`
            over all frames); ``None``: :func:`choose_scales` of this snapshot alone.
        shared_scale: one colour scale for all planes instead of one per plane (without ``scales``).
        percentiles: robust colour limits (without ``scales``).
        line_limits: fixed y-range (loss units) of the 1-D cuts; ``None``: from ``scales``.
        figsize: inches; ``None``: :func:`figure_size` (pass one size for all frames of an animation).
        dpi: pixels per inch of the figure (and of :func:`figure_to_rgb`).

    ``fig.axes`` holds the plane axes (row by row), then the colour bars, then one axes per 1-D cut.
    """
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels!r}")
    mode = _check_log_scale(log_scale)
    rows = _rows(snapshot, show_val)
    if scales is None:
        shared = shared_scale or limits is not None
        scales = choose_scales([snapshot], mode, shared=shared, percentiles=percentiles, include_val=len(rows) > 1)
    if limits is not None:
        scales = _legacy_scales(scales, limits, mode)
    if line_limits is not None:
        scales = replace(scales, line_limits=line_limits, line_log=scales.line_log if mode == "auto" else bool(mode))
    if figsize is None:
        figsize = figure_size(snapshot, show_val, shared=scales.shared)
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    center, val_center = _center_loss(snapshot)
    title = f"step {snapshot.step} · loss {_fmt(center)}"
    if val_center is not None:
        title += f" (val {_fmt(val_center)})"
    fig.suptitle(title, fontsize=_FS_SUPTITLE)
    lines = list(snapshot.lines.items())
    top: FigureBase = fig
    bottom: FigureBase = fig
    if snapshot.planes and lines:
        planes_h = figsize[1] - _LINE_H
        subs = np.asarray(fig.subfigures(2, 1, height_ratios=[planes_h, _LINE_H]), dtype=object)
        top, bottom = cast(FigureBase, subs[0]), cast(FigureBase, subs[1])
    if snapshot.planes:
        _draw_planes(top, snapshot, scales, rows, levels, figsize[0])
    if lines:
        line_axes = bottom.subplots(1, len(lines), squeeze=False)[0]
        for ax, (name, line) in zip(line_axes, lines):
            _draw_line(ax, name, line, snapshot, scales)
    if not snapshot.planes and not lines:
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
    log_scale: LogScale = "auto",
    clip: float | None = None,
    fps: float = 2.0,
    levels: int = 20,
    *,
    show_val: bool = False,
    shared_scale: bool = False,
    percentiles: tuple[float, float] = PERCENTILES,
) -> list[Path]:
    """Re-render every snapshot of a snapshot directory (or of each ``landscape/<prefix>/`` of a run dir).

    Each snapshot becomes ``<out>/step_<step>.png`` and the frames become ``<out>/animation.gif``.
    The colour scales, the log choice, each plane's extent and the 1-D cuts' axes are chosen once
    over all frames (:func:`choose_scales`), so nothing jumps in the animation. ``out`` defaults to
    the snapshot directory itself; for a run dir it gets one sub-folder per prefix. Returns the
    written paths (PNGs in step order, then the GIF, per directory). Raises
    :class:`NoSnapshotsError` if there is nothing to render.
    """
    directory = Path(directory)
    sources = snapshot_dirs(directory)
    if not sources:
        raise NoSnapshotsError(
            f"no landscape snapshots (step_*.npz) in {directory} or in its landscape/<prefix>/ folders"
        )
    options = _RunOptions(_check_log_scale(log_scale), clip, fps, levels, show_val, shared_scale, percentiles)
    written: list[Path] = []
    for source in sources:
        if out is None:
            target = source
        elif source == directory:
            target = Path(out)
        else:
            target = Path(out) / source.name
        written += _render_directory(source, target, options)
    return written


@dataclass(frozen=True)
class _RunOptions:
    log_scale: LogScale
    clip: float | None
    fps: float
    levels: int
    show_val: bool
    shared: bool
    percentiles: tuple[float, float]


def _render_directory(source: Path, target: Path, opt: _RunOptions) -> list[Path]:
    paths = list_snapshots(source)
    snapshots = [load_snapshot(p) for p in paths]
    scales = choose_scales(
        snapshots,
        opt.log_scale,
        shared=opt.shared,
        clip=opt.clip,
        percentiles=opt.percentiles,
        include_val=opt.show_val,
    )
    sizes = [figure_size(snap, opt.show_val, shared=opt.shared) for snap in snapshots]
    figsize = (max(w for w, _ in sizes), max(h for _, h in sizes))
    written: list[Path] = []
    for path, snap in zip(paths, snapshots):
        fig = snapshot_figure(snap, levels=opt.levels, show_val=opt.show_val, scales=scales, figsize=figsize)
        written.append(_save_png(figure_to_rgb(fig), target / f"{path.stem}.png"))
        del fig
    written.append(write_gif(_PngFrames(list(written)), target / ANIMATION_NAME, opt.fps))
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
