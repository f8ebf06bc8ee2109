"""Curvature instruments: extremal eigenvalues (Lanczos), the Hessian trace (Hutch++) and the HVP-free slope fit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_hessian import _validate
from lightning_hessian._krylov import KrylovSpace
from lightning_hessian.indicators import saddle_visibility
from lightning_hessian.instruments.base import Artifact, Instrument, InstrumentOutput, StepContext
from lightning_hessian.spectrum import EigenResult, extremal_eigenpairs
from lightning_hessian.trace import hutchinson_trace, slope_fit_trace

if TYPE_CHECKING:
    from lightning_hessian.objective import Objective


class Eigenvalues(Instrument):
    """The top ``k`` eigenvalues and, from the same Krylov space, the most negative one (the saddle signal).

    Args:
        k: number of largest eigenvalues (``lambda_2``... are logged too).
        lambda_min: also the most negative eigenvalue and ``negative_ratio`` (more products: the
            bottom of the spectrum converges more slowly than the top).
        lambda_min_every: take ``lambda_min`` at every this many measurements (1: every time); in
            between only the top is converged, which costs a third to a half as much. A Hessian
            landscape plane always gets both ends.
        tol: residual tolerance of the top values, relative to ``|lambda_max|``: the certified
            bound of each point (the residual: some eigenvalue lies that close). The default 3e-3
            certifies a curve to 0.3 %; the actual errors were 3e-6 to 1e-5 on the benchmarks
            (Lanczos's error is about the residual squared over the gap), 1/160 of PyHessian's
            default or less, at its wall time or less. 1e-5 for more certified digits.
        tol_min: tolerance of ``lambda_min``, relative to the spectral width.
        max_hvp: hard budget of Hessian-vector products; values that did not converge say so
            (``lambda_max_converged`` is 0).
        warm_start: start from the previous measurement's eigenvectors (kept across checkpoints).
        gradient_start: without a warm start (the first measurement), add the probe gradient to
            the random start vector (``benchmarks/bench_curvature.py`` prints its products and
            errors against a random start's). It cost one product more near those minima and
            saved one early in a CIFAR ResNet's training (``benchmarks/bench_start_vectors.py``).
            Warm starts add it too once a warm run took at least as many products as the last
            guided one (measured, per instrument). The gradient is shared with the step's other
            instruments.
        every_n_steps, every_n_epochs: this instrument's own cadence (default: the monitor's).

    Metrics: ``lambda_max`` (with ``_residual`` and ``_converged``), ``lambda_<i>``, ``lambda_min``
    (with ``_residual``, ``_converged``), ``negative_ratio``, ``lanczos_hvp_count`` and
    ``lanczos_hvp_top``. The learning rate's stability edge is
    :class:`~lightning_hessian.instruments.OptimizerCurvature`'s ``stability_ratio`` (it replaces
    ``lr_times_lambda_max``, which said nothing for Adam).
    """

    name = "eigenvalues"

    def __init__(
        self,
        k: int = 1,
        lambda_min: bool = True,
        lambda_min_every: int = 4,
        tol: float = 3e-3,
        tol_min: float = 1e-3,
        max_hvp: int = 100,
        warm_start: bool = True,
        gradient_start: bool = True,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        self.k = _validate.positive_int("k", k)
        self.lambda_min = _validate.flag("lambda_min", lambda_min)
        self.lambda_min_every = _validate.positive_int("lambda_min_every", lambda_min_every)
        self.tol = _validate.positive_float("tol", tol, below=1.0)
        self.tol_min = _validate.positive_float("tol_min", tol_min, below=1.0)
        self.max_hvp = _validate.positive_int("max_hvp", max_hvp)
        if self.max_hvp < self.k + 1:
            raise ValueError(
                f"max_hvp={max_hvp} cannot find k={k} eigenvalues: Lanczos needs at least k + 1 = {k + 1} "
                "products; lower k or raise max_hvp"
            )
        self.warm_start = _validate.flag("warm_start", warm_start)
        self.gradient_start = _validate.flag("gradient_start", gradient_start)
        self._warm: EigenResult | Tensor | None = None
        self._warm_names: list[str] | None = None
        self._runs = 0
        self._measured: dict[str, float] = {"warm": 0.0, "both": 0.0}  # products of the last run of each kind
        self._top_counts: dict[str, int] = {}  # products of the last top-only run by start: cold, warm, guided
        self._last_hvps: float | None = None

    def expected_hvps(self) -> float:
        """Of the next run, measured where it can be: one product more than the last run of the same
        kind took (a warm top-only run after a warm top-only run, a both-ends run after a both-ends run).

        Lanczos's count varies by about one from run to run at the budget's spacing (4-6 for a warm
        run on the CIFAR ResNet of ``benchmarks/bench_overhead.py``). Planned at the last count, a
        run that took one more overspent: at the fit-end point, where no later run pays it back, the
        defaults spent 5.3-5.9 % of the training time against their 5 %. One more keeps the budget.
        Before any such run: 6 cold (a guided first run on that ResNet at the default ``tol=3e-3``:
        3-5 products, plus the gradient and the one-off symmetry check), 6 for the first warm one
        (4-6 products there, 300-450 steps after the previous run), and ``MIN_BOTTOM_PRODUCTS`` (20)
        and more, 30, for both ends. A prior below the truth makes the budget overspend: a warm
        prior of 5 after a first run of 6 planned the second run at 4.6 s, which cost 5.6-5.7 s.
        """
        if self._wants_bottom():
            return self._measured["both"] + 1.0 if self._measured["both"] else 30.0
        if self.warm_start and self._warm is not None:
            return self._measured["warm"] + 1.0 if self._measured["warm"] else 6.0
        return 6.0

    def last_run_hvps(self) -> float | None:
        """The last run's Lanczos products (a cold run's one-offs count as one more): see :meth:`expected_hvps`."""
        return self._last_hvps

    def _warm_needs_guide(self) -> bool:
        """Whether warm starts add the gradient too: once a warm top-only run took at least as many
        products as the last gradient-guided one, the previous eigenvector no longer pays alone (on the
        CIFAR ResNet at the budget's spacing of 390-440 steps, warm 6-7 and guided 6-7 by probe
        batch, the two together 6). One step apart a warm start converged in 1-4 products (table 10)
        and stays unguided."""
        warm, guided = self._top_counts.get("warm"), self._top_counts.get("guided")
        return warm is not None and guided is not None and warm >= guided

    def _wants_bottom(self) -> bool:
        """lambda_min at runs every-1, 2*every-1, ...: the first run is top-only, the cheapest to plan."""
        return self.lambda_min and self._runs % self.lambda_min_every == self.lambda_min_every - 1

    def check(self, num_params: int) -> None:
        if self.k >= num_params:
            raise ValueError(f"k={self.k} must be smaller than the number of selected parameters ({num_params})")

    def compute_eigen(self, ctx: StepContext, both_ends: bool | None = None) -> EigenResult:
        """Run Lanczos once for this step and share the result (``ctx.shared["eigen"]``)."""
        objective = ctx.objective
        both = self._wants_bottom() or bool(both_ends)
        warm = self._warm_for(objective)
        guide = None
        if isinstance(ctx.shared.get("eigen"), EigenResult):  # continue this step's top-only run
            warm = ctx.shared["eigen"]
        elif self.gradient_start and (warm is None or self._warm_needs_guide()):
            guide = ctx.gradient()
        kept: list[KrylovSpace] | None = [] if ctx.shared.get("keep_krylov") else None
        eigen = extremal_eigenpairs(
            objective,
            k=self.k,
            tol=self.tol,
            tol_min=self.tol_min,
            max_hvp=self.max_hvp,
            init=warm,
            seed=ctx.seed,
            which="both" if both else "top",
            guide=guide,
            krylov_out=kept,
        )
        self._warm, self._warm_names = eigen, list(objective.param_names)
        if eigen.vector_min is None:  # top-only runs are the ones compared
            self._top_counts["guided" if guide is not None else ("warm" if warm is not None else "cold")] = eigen.n_hvp
        ctx.shared["eigen"] = eigen
        if kept:  # this step's Trace takes it (and frees it); else it goes with the step's context
            ctx.shared["krylov"] = kept[0]
        return eigen

    def _warm_for(self, objective: Objective) -> EigenResult | Tensor | None:
        """The previous result to start from: with warm starts on, and measured over the same parameters."""
        return self._warm if self.warm_start and self._warm_names == objective.param_names else None

    def run(self, ctx: StepContext) -> InstrumentOutput:
        warm = self._warm_for(ctx.objective) is not None  # the start compute_eigen takes
        before = ctx.objective.n_hvp
        eigen = ctx.eigenpairs(both_ends=self._wants_bottom())
        self._runs += 1
        made = ctx.objective.n_hvp - before  # 0 when another instrument of this step ran Lanczos first
        self._last_hvps = None
        if made > 0:
            kind = "both" if eigen.vector_min is not None else ("warm" if warm else None)
            if kind is not None:
                self._measured[kind] = float(made)
            self._last_hvps = float(made) + (0.0 if warm else 1.0)
        metrics = {
            "lambda_max": eigen.lambda_max,
            "lambda_max_residual": eigen.residuals[0],
            "lambda_max_converged": float(eigen.converged_max),
            "lanczos_hvp_count": float(eigen.n_hvp),
        }
        if eigen.n_hvp_top is not None:  # products until the top converged: what a warm start saves
            metrics["lanczos_hvp_top"] = float(eigen.n_hvp_top)
        for i, value in enumerate(eigen.eigenvalues[1:], start=2):
            metrics[f"lambda_{i}"] = value
        if eigen.vector_min is not None:
            metrics["lambda_min"] = eigen.lambda_min
            metrics["lambda_min_residual"] = eigen.residual_min
            metrics["lambda_min_converged"] = float(eigen.converged_min)
            metrics["negative_ratio"] = eigen.negative_ratio
        record = {"eigenvalues": list(eigen.eigenvalues), "ritz_values": list(eigen.ritz_values)}
        return InstrumentOutput(metrics, (Artifact("record", "spectrum", record),))

    def reset(self) -> None:
        self._warm, self._warm_names, self._runs = None, None, 0
        self._measured, self._last_hvps, self._top_counts = {"warm": 0.0, "both": 0.0}, None, {}

    def state_dict(self) -> dict[str, Any]:
        warm = self._warm
        if isinstance(warm, EigenResult):  # one start vector holding every converged direction
            parts = [*warm.eigenvectors, *([] if warm.vector_min is None else [warm.vector_min])]
            warm = torch.stack(parts).sum(0)
        return {
            "warm_start": None if warm is None else warm.detach().cpu(),
            "warm_start_params": self._warm_names,
            "runs": self._runs,
            "measured_hvps": dict(self._measured),
            "top_counts": dict(self._top_counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._warm = state.get("warm_start")
        self._warm_names = state.get("warm_start_params")
        self._runs = int(state.get("runs", 0))
        measured = state.get("measured_hvps") or {}
        self._measured = {kind: float(measured.get(kind, 0.0)) for kind in ("warm", "both")}
        self._top_counts = {str(k): int(v) for k, v in (state.get("top_counts") or {}).items()}


class Trace(Instrument):
    """The Hessian trace by Hutch++ (or Hutchinson), with tr(H^2) and the random-plane saddle probability.

    Args:
        method: ``"hutch++"`` (lower variance for a dominant top of the spectrum) or ``"hutchinson"``.
        n_hvp: budget of Hessian-vector products.
        reuse_lanczos: when an :class:`Eigenvalues` instrument runs at the same step, deflate the
            Krylov space of its Lanczos run for free (:func:`~lightning_hessian.hutchinson_trace`'s
            ``deflate``): its part of the trace is exact, and the ``n_hvp`` products estimate only
            the rest. Unbiased either way; it lowers the variance where the space holds the top of
            the spectrum (``benchmarks/bench_curvature.py --trace-reuse-only``). A space of at
            least ``n_hvp // 3`` vectors (a run with ``lambda_min``) replaces Hutch++'s sketch, a
            smaller one is topped up by it. The basis is held until the trace is done.
        every_n_steps, every_n_epochs: this instrument's own cadence (default: the monitor's).

    Metrics: ``trace`` (with ``trace_stderr`` and the +-2 standard-error band ``trace_lower`` /
    ``trace_upper``), ``trace_sq``, ``mean_curvature`` (trace / N) and
    ``random_plane_saddle_probability`` (how likely a random 2-D plane shows a saddle at all).
    """

    name = "trace"

    def __init__(
        self,
        method: str = "hutch++",
        n_hvp: int = 30,
        reuse_lanczos: bool = True,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        self.method = _validate.choice("method", method, ("hutch++", "hutchinson"))
        self.n_hvp = _validate.positive_int("n_hvp", n_hvp, minimum=3)
        self.reuse_lanczos = _validate.flag("reuse_lanczos", reuse_lanczos)

    def expected_hvps(self) -> float:
        return float(self.n_hvp + 2)

    def run(self, ctx: StepContext) -> InstrumentOutput:
        # Rademacher products a HessianDiagonal at this step reuses (the monitor asks when one runs).
        shared = ctx.shared.get("rademacher_products")
        # Taken out of the context: the basis is freed once the trace is done, not held for the rest of the step.
        space = ctx.shared.pop("krylov", None) if self.reuse_lanczos else None
        ctx.shared.pop("keep_krylov", None)
        estimate = hutchinson_trace(
            ctx.objective,
            n=self.n_hvp,
            method=self.method,  # type: ignore[arg-type]
            seed=ctx.seed,
            products_out=shared if isinstance(shared, list) else None,
            deflate=space if isinstance(space, KrylovSpace) else None,
        )
        n = ctx.objective.num_params
        record = {
            "trace_estimate": {
                "method": self.method,
                "n_hvp": estimate.n_hvp,
                "sketch": estimate.n_sketch,
                "lanczos_space_dim": estimate.n_deflated,
            }
        }
        return InstrumentOutput(
            {
                "trace": estimate.value,
                "trace_stderr": estimate.stderr,
                "trace_lower": estimate.value - 2 * estimate.stderr,
                "trace_upper": estimate.value + 2 * estimate.stderr,
                "trace_sq": estimate.trace_sq,
                "mean_curvature": estimate.value / n,
                "random_plane_saddle_probability": saddle_visibility(estimate.value, estimate.trace_sq),
            },
            (Artifact("record", "trace", record),),
        )


class SlopeFitTrace(Instrument):
    """The trace without any Hessian-vector product, from quadratic fits of the loss along random directions.

    Accurate on smooth models; on ReLU/max-pool networks the finite-scale curvature it measures
    can be far from the autograd trace (measured 10-100 % off), so it is off by default.

    Metrics: ``trace_slope_fit`` and ``trace_slope_fit_stderr``.
    """

    name = "slope_fit"

    def __init__(
        self, directions: int = 20, every_n_steps: int | None = None, every_n_epochs: int | None = None
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        self.directions = _validate.positive_int("directions", directions, minimum=2)

    def expected_hvps(self) -> float:
        return self.directions * 4 / 3  # about four probe forward passes per direction

    def run(self, ctx: StepContext) -> InstrumentOutput:
        estimate = slope_fit_trace(ctx.objective, n_directions=self.directions, seed=ctx.seed)
        return InstrumentOutput({"trace_slope_fit": estimate.value, "trace_slope_fit_stderr": estimate.stderr})
