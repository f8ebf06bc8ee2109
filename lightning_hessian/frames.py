"""One landscape frame: the random and the Hessian plane, 1-D cuts along both eigenvectors, and their indicators.

The computing half of a landscape snapshot, free of Lightning: given an :class:`Objective`
(and optionally a validation one), it returns a :class:`~lightning_hessian.snapshots.Snapshot`
whose ``scalars`` use the ``landscape/`` metric names (without prefix).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from lightning_hessian.indicators import grid_minimum, plane_curvature
from lightning_hessian.landscape import (
    Line,
    Normalization,
    Surface,
    curvature_span,
    hessian_directions,
    loss_line,
    loss_surface,
    orthogonalize,
    random_direction,
)
from lightning_hessian.objective import Objective
from lightning_hessian.snapshots import Snapshot
from lightning_hessian.spectrum import EigenResult, extremal_eigenpairs

PLANES: tuple[str, ...] = ("random", "hessian")


@dataclass(frozen=True)
class LandscapeConfig:
    """What a landscape frame contains.

    Attributes:
        planes: ``"random"`` (filter-normalised Gaussian directions, fixed for the run) and/or
            ``"hessian"`` (unit eigenvectors of lambda_max and lambda_min).
        resolution: odd number of grid points per axis.
        span: half-width of every plane in its own coordinates; ``None``: 1 for random planes
            (Li et al.'s filter units) and the curvature scale for Hessian planes (where the
            quadratic model rises by ``rise`` times the loss), capped by ``max_span``.
        normalization: of the random directions: ``"filter"``, ``"layer"`` or ``"none"``.
        orthogonalize: make the second random direction orthogonal to the first (Gaussian
            directions in high dimension are nearly orthogonal anyway).
        lines: also take 1-D cuts along both eigenvectors, with ``line_resolution`` points.
        rise: see ``span``.
        seed: seeds the random directions (the same plane in every frame of a run).
        max_span: cap of a Hessian plane's curvature-scale half-width, as a fraction of the
            weights' norm (weight tensors only, biases and normalisation parameters left out: the
            distance the filter-normalised random plane reaches at 1 filter unit); ``None``: no
            cap. A tiny ``|lambda|`` otherwise gives a span far outside the quadratic regime.
    """

    planes: tuple[str, ...] = PLANES
    resolution: int = 21
    span: float | None = None
    normalization: Normalization = "filter"
    orthogonalize: bool = False
    lines: bool = True
    line_resolution: int = 41
    rise: float = 1.0
    seed: int = 0
    max_span: float | None = 0.5

    def __post_init__(self) -> None:
        if not self.planes or set(self.planes) - set(PLANES):
            raise ValueError(f"planes must be a non-empty subset of {PLANES}, got {self.planes!r}")
        for name in ("resolution", "line_resolution"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 3 or value % 2 == 0:
                raise ValueError(
                    f"{name} must be an odd integer >= 3 (the current weights sit in the middle), got {value!r}"
                )
        if self.span is not None and not (math.isfinite(self.span) and self.span > 0):
            raise ValueError(f"span must be a positive number or None, got {self.span!r}")
        if self.normalization not in ("filter", "layer", "none"):
            raise ValueError(f"normalization must be 'filter', 'layer' or 'none', got {self.normalization!r}")
        if not self.rise > 0:
            raise ValueError(f"rise must be positive, got {self.rise!r}")
        if self.max_span is not None and not (math.isfinite(self.max_span) and self.max_span > 0):
            raise ValueError(f"max_span must be a positive number or None, got {self.max_span!r}")


@dataclass
class FrameState:
    """What frames of one run share: the fixed random plane and the last Hessian directions (for signs)."""

    random_plane: tuple[Tensor, Tensor] | None = None
    hessian_plane: tuple[Tensor, Tensor] | None = None


def weight_norm(objective: Objective) -> float:
    """Norm of the weight tensors (``dim > 1``) of the selected parameters, or of all of them if
    there are none: the distance a filter-normalised random direction moves the weights at 1 unit."""
    pieces = objective.split(objective.parameters())
    weights = [p for p in pieces if p.dim() > 1] or list(pieces)
    return math.sqrt(sum(float(p.double().pow(2).sum()) for p in weights))


def hessian_spans(
    objective: Objective, config: LandscapeConfig, center: float, eigenvalues: tuple[float, float]
) -> tuple[tuple[float, float], dict[str, Any]]:
    """Half-widths of the Hessian plane along v_max and v_min, and the record of how they were chosen.

    A fixed ``config.span`` is used as it is; otherwise each axis gets its curvature scale
    ``sqrt(2 rise |loss| / |lambda|)``, capped at ``config.max_span`` times :func:`weight_norm`.
    """
    if config.span is not None:
        spans = (config.span, config.span)
        return spans, {"rule": "fixed", "spans": list(spans), "capped": [False, False], "reason": "span given"}
    curvature = tuple(curvature_span(lam, center, config.rise) for lam in eigenvalues)
    record: dict[str, Any] = {"rule": "curvature", "curvature_spans": list(curvature), "cap": None}
    cap = math.inf
    if config.max_span is not None:
        norm = weight_norm(objective)
        if norm > 0:
            cap = config.max_span * norm
            record.update(cap=cap, weight_norm=norm, max_span=config.max_span)
    spans = (min(curvature[0], cap), min(curvature[1], cap))
    capped = [c > cap for c in curvature]
    record.update(spans=list(spans), capped=capped)
    if any(capped):
        axes = " and ".join(name for name, c in zip(("v_max", "v_min"), capped) if c)
        record["reason"] = (
            f"curvature scale along {axes} exceeds max_span {config.max_span:g} x weight norm "
            f"{record['weight_norm']:.4g} = {cap:.4g}: capped"
        )
    else:
        record["reason"] = "curvature scale sqrt(2 rise |loss| / |lambda|) within the cap"
    return spans, record


def _plane_scalars(name: str, surface: Surface, objective: Objective, d1: Tensor, d2: Tensor) -> dict[str, float]:
    curvature = plane_curvature(objective, d1, d2)
    low = grid_minimum(surface)
    out = {
        f"{name}_curvature_min": curvature.principal[0],
        f"{name}_curvature_max": curvature.principal[1],
        f"{name}_shows_saddle": float(curvature.shows_saddle),
        f"{name}_min_loss": low.loss,
        f"{name}_min_depth": low.depth,
        f"{name}_min_offset": low.offset,
        f"{name}_min_distance": low.distance,
    }
    if surface.val_losses is not None:
        val_low = grid_minimum(surface, surface.val_losses)
        out[f"{name}_val_min_loss"] = val_low.loss
        out[f"{name}_val_min_depth"] = val_low.depth
        out[f"{name}_val_min_offset"] = val_low.offset
    return out


def landscape_frame(
    objective: Objective,
    config: LandscapeConfig,
    state: FrameState,
    *,
    step: int = 0,
    epoch: int = 0,
    eigen: EigenResult | None = None,
    val_objective: Objective | None = None,
    max_hvp: int = 200,
    progress: Callable[[int], object] | None = None,
) -> Snapshot:
    """Measure one frame. ``eigen`` (with ``lambda_min``) is reused for the Hessian plane when given.

    ``state`` carries the run's fixed random plane and the previous Hessian directions; it is
    updated in place.
    """
    start = time.perf_counter()
    loss_before, hvp_before = objective.n_loss, objective.n_hvp
    planes: dict[str, Surface] = {}
    lines: dict[str, Line] = {}
    scalars: dict[str, float] = {}
    with objective.session():
        center = objective.loss()
        if "random" in config.planes:
            if state.random_plane is None or state.random_plane[0].shape != (objective.num_params,):
                d1 = random_direction(objective, seed=config.seed, normalization=config.normalization)
                d2 = random_direction(objective, seed=config.seed + 1, normalization=config.normalization)
                state.random_plane = (d1, orthogonalize(d1, d2) if config.orthogonalize else d2)
            r1, r2 = state.random_plane
            span = config.span if config.span is not None else 1.0
            planes["random"] = loss_surface(
                objective,
                r1,
                r2,
                span=span,
                resolution=config.resolution,
                val_objective=val_objective,
                progress=progress,
                kind="random",
                labels=(
                    f"random d1 ({config.normalization}-normalised)",
                    f"random d2 ({config.normalization}-normalised)",
                ),
            )
            scalars.update(_plane_scalars("random", planes["random"], objective, r1, r2))
        if "hessian" in config.planes:
            if eigen is None or eigen.vector_min is None:
                eigen = extremal_eigenpairs(objective, max_hvp=max_hvp, init=None)
            h1, h2 = hessian_directions(eigen, previous=state.hessian_plane)
            state.hessian_plane = (h1, h2)
            lmax, lmin = eigen.lambda_max, eigen.lambda_min
            spans, span_record = hessian_spans(objective, config, center, (lmax, lmin))
            planes["hessian"] = loss_surface(
                objective,
                h1,
                h2,
                span=spans,
                resolution=config.resolution,
                val_objective=val_objective,
                progress=progress,
                kind="hessian",
                labels=(f"v_max (lambda={lmax:.4g})", f"v_min (lambda={lmin:.4g})"),
                eigenvalues=(lmax, lmin),
            )
            planes["hessian"] = replace(
                planes["hessian"],
                meta={**planes["hessian"].meta, "span": span_record, "span_capped": span_record["capped"]},
            )
            scalars.update(_plane_scalars("hessian", planes["hessian"], objective, h1, h2))
            scalars["hessian_span_max"], scalars["hessian_span_min"] = spans
            if config.lines:
                lines["v_max"] = loss_line(
                    objective,
                    h1,
                    spans[0],
                    config.line_resolution,
                    val_objective=val_objective,
                    progress=progress,
                    label=f"v_max (lambda={lmax:.4g})",
                )
                lines["v_min"] = loss_line(
                    objective,
                    h2,
                    spans[1],
                    config.line_resolution,
                    val_objective=val_objective,
                    progress=progress,
                    label=f"v_min (lambda={lmin:.4g})",
                )
    scalars["center_loss"] = center
    scalars["loss_evaluations"] = float(objective.n_loss - loss_before)
    scalars["hvp_count"] = float(objective.n_hvp - hvp_before)
    scalars["seconds"] = time.perf_counter() - start
    meta = {
        "resolution": config.resolution,
        "span": config.span,
        "normalization": config.normalization,
        "seed": config.seed,
        "rise": config.rise,
        "max_span": config.max_span,
        "num_params": objective.num_params,
    }
    if "hessian" in planes:
        meta["hessian_span"] = planes["hessian"].meta["span"]
    return Snapshot(step=step, epoch=epoch, planes=planes, lines=lines, scalars=scalars, meta=meta)
