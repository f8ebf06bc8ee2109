"""One curvature measurement: eigenvalues, traces and indicators of an Objective as named scalar metrics.

This is the computing half of the callback, free of Lightning: it takes an :class:`Objective`
and a :class:`MeasureConfig`, runs the requested estimators and returns a :class:`Measurement`
whose ``metrics`` use the metric names of the design (without prefix).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from lightning_hessian import _validate
from lightning_hessian.indicators import saddle_visibility
from lightning_hessian.objective import Objective
from lightning_hessian.spectrum import EigenResult, extremal_eigenpairs
from lightning_hessian.trace import TraceEstimate, hutchinson_trace, slope_fit_trace

Quantity = Literal["eigenvalues", "lambda_min", "trace", "slope_fit"]
QUANTITIES: tuple[str, ...] = ("eigenvalues", "lambda_min", "trace", "slope_fit")


@dataclass(frozen=True)
class MeasureConfig:
    """What one measurement computes and with which budgets.

    Attributes:
        quantities: subset of ``"eigenvalues"`` (lambda_max, top-k), ``"lambda_min"`` (the most
            negative eigenvalue and the negative ratio, from the same Krylov space),
            ``"trace"`` (Hutch++ or Hutchinson) and ``"slope_fit"`` (HVP-free trace).
        k: number of top eigenvalues.
        tol: Lanczos residual tolerance.
        max_hvp: Lanczos HVP budget.
        trace_method: ``"hutch++"`` or ``"hutchinson"``.
        trace_hvp: HVP budget of the trace estimate.
        slope_directions: directions of the slope fit.
        seed: seeds every random vector (fixed across measurements, so curves are comparable).
    """

    quantities: tuple[str, ...] = ("eigenvalues", "lambda_min", "trace")
    k: int = 1
    tol: float = 1e-4
    max_hvp: int = 100
    trace_method: Literal["hutch++", "hutchinson"] = "hutch++"
    trace_hvp: int = 30
    slope_directions: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quantities is None or isinstance(self.quantities, str):
            raise ValueError(f"quantities must be a non-empty list of names from {QUANTITIES}, got {self.quantities!r}")
        unknown = set(self.quantities) - set(QUANTITIES)
        if unknown or not self.quantities:
            raise ValueError(f"quantities must be a non-empty subset of {QUANTITIES}, got {self.quantities!r}")
        if "lambda_min" in self.quantities and "eigenvalues" not in self.quantities:
            raise ValueError("'lambda_min' needs 'eigenvalues' in quantities (both ends come from one Lanczos run)")
        _validate.positive_int("k", self.k)
        _validate.positive_float("tol", self.tol, below=1.0)
        _validate.positive_int("max_hvp", self.max_hvp)
        if self.max_hvp < self.k + 1:
            raise ValueError(
                f"max_hvp={self.max_hvp} cannot find k={self.k} eigenvalues: Lanczos needs at least k + 1 = "
                f"{self.k + 1} products; lower k or raise max_hvp"
            )
        _validate.choice("trace_method", self.trace_method, ("hutch++", "hutchinson"))
        _validate.positive_int("trace_hvp", self.trace_hvp, minimum=3)
        _validate.positive_int("slope_directions", self.slope_directions, minimum=2)
        _validate.seed(self.seed)


@dataclass(frozen=True)
class Measurement:
    """The outcome of one measurement: the raw results and their flattened metrics."""

    metrics: dict[str, float]
    eigen: EigenResult | None = field(default=None, repr=False)
    trace: TraceEstimate | None = field(default=None, repr=False)
    slope_fit: TraceEstimate | None = field(default=None, repr=False)
    num_params: int = 0


def measure(
    objective: Objective,
    config: MeasureConfig,
    warm_start: EigenResult | Tensor | None = None,
    learning_rate: float | None = None,
) -> Measurement:
    """Run the configured estimators on ``objective`` and name their numbers.

    ``warm_start`` (a previous :class:`EigenResult`, or a start vector) seeds Lanczos. With
    ``learning_rate``, the SGD stability indicator ``lr * lambda_max`` is added (a quadratic model
    diverges under plain gradient descent once it exceeds 2).
    """
    with objective.session():
        return _measure(objective, config, warm_start, learning_rate)


def _measure(
    objective: Objective, config: MeasureConfig, warm_start: EigenResult | Tensor | None, learning_rate: float | None
) -> Measurement:
    start = time.perf_counter()
    hvp_before, loss_before = objective.n_hvp + objective.n_hvp_check, objective.n_loss
    metrics: dict[str, float] = {}
    eigen = trace = slope = None
    n = objective.num_params
    if "eigenvalues" in config.quantities:
        eigen = extremal_eigenpairs(
            objective,
            k=config.k,
            tol=config.tol,
            max_hvp=config.max_hvp,
            init=warm_start,
            seed=config.seed,
            which="both" if "lambda_min" in config.quantities else "top",
        )
        metrics["lambda_max"] = eigen.lambda_max
        metrics["lambda_max_residual"] = eigen.residuals[0]
        metrics["lambda_max_converged"] = float(eigen.converged_max)
        for i, value in enumerate(eigen.eigenvalues[1:], start=2):
            metrics[f"lambda_{i}"] = value
        if eigen.vector_min is not None:
            metrics["lambda_min"] = eigen.lambda_min
            metrics["lambda_min_residual"] = eigen.residual_min
            metrics["lambda_min_converged"] = float(eigen.converged_min)
            metrics["negative_ratio"] = eigen.negative_ratio
        metrics["lanczos_hvp_count"] = float(eigen.n_hvp)
        if learning_rate is not None:
            metrics["lr_times_lambda_max"] = learning_rate * eigen.lambda_max
    if "trace" in config.quantities:
        trace = hutchinson_trace(objective, n=config.trace_hvp, method=config.trace_method, seed=config.seed)
        metrics["trace"] = trace.value
        metrics["trace_stderr"] = trace.stderr
        metrics["trace_lower"] = trace.value - 2 * trace.stderr
        metrics["trace_upper"] = trace.value + 2 * trace.stderr
        metrics["trace_sq"] = trace.trace_sq
        metrics["mean_curvature"] = trace.value / n
        metrics["random_plane_saddle_probability"] = saddle_visibility(trace.value, trace.trace_sq)
    if "slope_fit" in config.quantities:
        slope = slope_fit_trace(objective, n_directions=config.slope_directions, seed=config.seed)
        metrics["trace_slope_fit"] = slope.value
        metrics["trace_slope_fit_stderr"] = slope.stderr
        if "mean_curvature" not in metrics:
            metrics["mean_curvature"] = slope.value / n
    metrics["hvp_count"] = float(objective.n_hvp + objective.n_hvp_check - hvp_before)
    metrics["loss_evaluations"] = float(objective.n_loss - loss_before)
    metrics["seconds"] = time.perf_counter() - start
    return Measurement(metrics=metrics, eigen=eigen, trace=trace, slope_fit=slope, num_params=n)
