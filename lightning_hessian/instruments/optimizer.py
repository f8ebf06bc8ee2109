"""Optimizer-geometry instruments: preconditioned sharpness against the stability edge, step curvature, the diagonal.

Thin wrappers over :mod:`lightning_hessian.stability`, :mod:`lightning_hessian.step_curvature`
and :mod:`lightning_hessian.diagonal` (the math and its evidence live there). They read the
trainer's optimizers from the step's context and never change them: the optimizer state is read
with out-of-place operations and no copy of it outlives a measurement.

An optimizer whose geometry cannot be read (an unsupported class, an adaptive optimizer before
its first step, a learning rate of 0) is not an error: the instrument returns no metrics and says
why in one warning per reason, then stays quiet while the reason holds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from lightning_hessian import _validate
from lightning_hessian.blocks import parameter_blocks
from lightning_hessian.diagonal import diagonal_share, hessian_diagonal
from lightning_hessian.instruments.base import Artifact, Instrument, InstrumentOutput, StepContext
from lightning_hessian.objective import Objective
from lightning_hessian.optim.trust_region import TrustRegion
from lightning_hessian.optimizer_geometry import (
    SUPPORTED,
    GeometryUnavailableError,
    GroupGeometry,
    Preconditioner,
    Rule,
    read_preconditioner,
    reference_lr,
    unwrap_optimizers,
)
from lightning_hessian.stability import preconditioned_sharpness
from lightning_hessian.step_curvature import step_curvature


def _unwrap(optimizers: Sequence[Any]) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind the context's (Lightning's ``LightningOptimizer`` wrappers unwrapped)."""
    return unwrap_optimizers(list(optimizers)) if optimizers else []


class _Skipper:
    """One warning per reason, then silence: an instrument that cannot measure is skipped, not failing."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.warned: set[str] = set()

    def skip(self, reason: str) -> InstrumentOutput:
        self.once(
            f"{self.owner} is skipped: {reason} (this message is shown once; the instrument logs no metrics while "
            "this holds)"
        )
        return InstrumentOutput()

    def once(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            warnings.warn(message, UserWarning, stacklevel=4)


def _trust_region_geometry(objective: Objective, optimizer: TrustRegion) -> Preconditioner:
    """:meth:`TrustRegion.metric` as a preconditioner: step scale ``M^{-1}`` on the parameters it holds.

    A trust-region step is bounded by its radius, not by a learning rate, so there is no stability
    constant: the learning rate and ``k`` are set to 1 and only the top eigenvalue of
    ``M^{-1/2} H M^{-1/2}`` means something.
    """
    group = optimizer.param_groups[0]
    held = [p for p in group["params"] if p.requires_grad]  # the order TrustRegion.metric() flattens in
    if group["norm"] != "uniform" and not any("second_moment" in optimizer.state.get(p, {}) for p in held):
        return Preconditioner(
            "no_state",
            "TrustRegion has not taken a step yet: its norm M has no second moment before the first step",
            None, None, None, (),
        )  # fmt: skip
    metric = optimizer.metric()
    pieces: dict[int, Tensor] = {}
    if metric is not None:
        for p, piece in zip(held, torch.split(metric.detach().to(torch.float64), [p.numel() for p in held])):
            pieces[id(p)] = piece
    params = dict(objective.model.named_parameters())
    held_ids = {id(p) for p in held}
    inv_parts, lr_parts, names = [], [], []
    for name in objective.param_names:
        p = params[name]
        n, device = p.numel(), p.device
        if id(p) in held_ids:
            names.append(name)
            m = pieces.get(id(p))
            inv_parts.append(torch.ones(n, dtype=torch.float64, device=device) if m is None else 1.0 / m.to(device))
            lr_parts.append(torch.ones(n, dtype=torch.float64, device=device))
        else:
            inv_parts.append(torch.ones(n, dtype=torch.float64, device=device))
            lr_parts.append(torch.zeros(n, dtype=torch.float64, device=device))
    if not names:
        return Preconditioner(
            "unsupported", "no selected parameter is held by the TrustRegion optimizer", None, None, None, ()
        )
    inverse = torch.cat(inv_parts)
    if not bool(torch.isfinite(inverse).all() and (inverse > 0).all()):
        return Preconditioner(
            "degenerate", "TrustRegion's norm M has zero or non-finite entries (eps=0?)", None, None, None, ()
        )
    numel = sum(params[n].numel() for n in names)
    group_geometry = GroupGeometry(
        optimizer="TrustRegion", index=0, rule=cast(Rule, "trust_region"), lr=1.0, momentum=0.0,
        threshold_constant=1.0, names=tuple(names), numel=numel, step=None,
    )  # fmt: skip
    dtype, device = objective.dtype, objective.device
    return Preconditioner(
        status="ok",
        message="",
        inverse_preconditioner=inverse.to(device=device, dtype=dtype),
        effective_lr=torch.cat(lr_parts).to(device=device, dtype=dtype),
        threshold_constant=torch.ones(objective.num_params, dtype=dtype, device=device),
        groups=(group_geometry,),
        untracked=tuple(n for n in objective.param_names if n not in names),
    )


class OptimizerCurvature(Instrument):
    """The curvature the optimizer feels: preconditioned sharpness, the optimizer's stability threshold, their ratio.

    Lanczos on the learning-rate-weighted preconditioned Hessian ``(D/k)^{1/2} H (D/k)^{1/2}``
    (:func:`lightning_hessian.stability.preconditioned_sharpness`), with ``D = lr_eff / P`` read
    from the optimizer state at the measured step and ``k`` the optimizer's stability constant.
    Supported: torch's SGD (plain, heavy-ball, Nesterov), Adam, AdamW (``amsgrad`` too), RMSprop
    (plain, centered, momentum), Adagrad, several optimizers and parameter groups at once (one
    dimensionless ratio). :class:`~lightning_hessian.optim.TrustRegion` is read through its
    :meth:`~lightning_hessian.optim.TrustRegion.metric`: ``preconditioned_lambda_max`` is then the
    top eigenvalue of ``M^{-1/2} H M^{-1/2}`` and no threshold or ratio is logged (a trust-region
    step is bounded by its radius, not by a learning rate; mixing it with other optimizers is not
    supported). Other optimizers, and adaptive ones before their first step, are skipped with one
    warning per reason.

    Args:
        tol: relative tolerance of the preconditioned sharpness (Ritz error bound).
        max_hvp: hard budget of Hessian-vector products; an unconverged value says so
            (``preconditioned_lambda_max_converged`` is 0).
        warm_start: start Lanczos from the previous measurement's vector (kept across checkpoints).
        every_n_steps, every_n_epochs: this instrument's own cadence (default: the monitor's).

    Metrics: ``preconditioned_lambda_max`` (with ``_residual`` and ``_converged``),
    ``stability_threshold`` (2/lr for SGD, (2 + 2b)/lr with heavy-ball momentum b, 38/lr for Adam
    at beta1 = 0.9; in the units of the parameter group holding the most parameters) and
    ``stability_ratio`` (sharpness over threshold: at or above 1 the optimizer is at its stability
    edge). The record (``"optimizer_curvature"`` in the step's JSONL entry) adds the update rule,
    the reference learning rate, whether the groups are mixed, and the HVP count.
    """

    name = "optimizer_curvature"

    def __init__(
        self,
        tol: float = 1e-3,
        max_hvp: int = 100,
        warm_start: bool = True,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        self.tol = _validate.positive_float("tol", tol, below=1.0)
        self.max_hvp = _validate.positive_int("max_hvp", max_hvp, minimum=2)
        self.warm_start = _validate.flag("warm_start", warm_start)
        self._warm: Tensor | None = None
        self._warm_names: list[str] | None = None
        self._curve: list[tuple[int, float, float]] = []  # (step, sharpness, threshold) of this fit
        self._skipper = _Skipper("OptimizerCurvature")

    def geometry(self, ctx: StepContext) -> Preconditioner:
        """The preconditioner of the context's optimizers for its objective (``status`` says when there is none)."""
        optimizers = _unwrap(ctx.optimizers)
        if not optimizers:
            return Preconditioner(
                "unsupported", "the step context has no optimizer (pass optimizers=[...] outside a trainer)",
                None, None, None, (),
            )  # fmt: skip
        trust = [opt for opt in optimizers if isinstance(opt, TrustRegion)]
        if trust and len(optimizers) > 1:
            return Preconditioner(
                "unsupported", "TrustRegion together with other optimizers is not supported", None, None, None, ()
            )
        if trust:
            return _trust_region_geometry(ctx.objective, trust[0])
        return read_preconditioner(ctx.objective, optimizers)

    def run(self, ctx: StepContext) -> InstrumentOutput:
        objective = ctx.objective
        pre = self.geometry(ctx)
        if not pre.ok:
            also = " (lightning_hessian.optim.TrustRegion is read too)" if "supported:" in pre.message else ""
            return self._skipper.skip(f"{pre.status}: {pre.message}{also}")
        init = self._start(objective, pre)
        try:
            result = preconditioned_sharpness(
                objective, pre, tol=self.tol, max_hvp=self.max_hvp, init=init, seed=ctx.seed
            )
        except GeometryUnavailableError as err:
            return self._skipper.skip(str(err))
        self._warm, self._warm_names = result.vector.detach(), list(objective.param_names)
        metrics = {
            "preconditioned_lambda_max": result.value,
            "preconditioned_lambda_max_residual": result.residual,
            "preconditioned_lambda_max_converged": float(result.converged),
        }
        trust_region = result.rule == "trust_region"
        if not trust_region:
            metrics["stability_threshold"] = result.threshold
            metrics["stability_ratio"] = result.ratio
            self._curve.append((ctx.step, result.value, result.threshold))
        record = {
            "optimizer_curvature": {
                "rule": result.rule,
                "reference_lr": None if trust_region else result.reference_lr,
                "mixed_groups": result.mixed,
                "error_bound": result.error_bound,
                "n_hvp": result.n_hvp,
                "warm_started": init is not None,
            }
        }
        return InstrumentOutput(metrics, (Artifact("record", "optimizer_curvature", record),))

    def _start(self, objective: Objective, pre: Preconditioner) -> Tensor | None:
        """The previous Ritz vector, when it belongs to these parameters and touches the coordinates that move."""
        warm = self._warm
        if not self.warm_start or warm is None or self._warm_names != list(objective.param_names):
            return None
        if warm.numel() != objective.num_params:
            return None
        v = warm.reshape(-1).to(device=objective.device, dtype=objective.dtype)
        moving = (pre.stability_scale > 0).to(v.dtype)
        norm = float((v * moving).norm())
        return v if math.isfinite(norm) and norm > 0 else None

    def summary(self) -> InstrumentOutput | None:
        """The sharpness and its stability edge over the fit, as one two-line chart (W&B draws it from data)."""
        if not self._curve:
            return None
        steps, values, thresholds = zip(*self._curve)
        lines = {
            "title": "preconditioned sharpness vs stability edge",
            "x": list(steps),
            "series": {"preconditioned_lambda_max": list(values), "stability_threshold": list(thresholds)},
        }
        return InstrumentOutput({}, (Artifact("lines", "stability_edge", lines),))

    def reset(self) -> None:
        self._warm, self._warm_names = None, None
        self._skipper.warned.clear()
        self._curve = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "warm_start": None if self._warm is None else self._warm.detach().cpu().clone(),
            "warm_start_params": None if self._warm_names is None else list(self._warm_names),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        warm = state.get("warm_start")
        self._warm = warm if isinstance(warm, Tensor) else None
        names = state.get("warm_start_params")
        self._warm_names = list(names) if names is not None else None


class StepCurvature(Instrument):
    """Curvature along the probe gradient and the optimizer's next step, the critical learning rate, the model fidelity.

    :func:`lightning_hessian.step_curvature.step_curvature`: one HVP along the gradient ``g``, one
    along the direction ``d`` (the step per unit learning rate) and one extra probe loss at the
    point a step of the reference group's learning rate would reach. ``d`` is the optimizer's next
    update replayed from its state with the probe gradient standing in for the next mini-batch
    gradient (``"update"``, momentum, bias corrections and weight decay included), the
    momentum-free preconditioned step (``"preconditioned"``: ``P^{-1} g``), or ``g`` itself
    (``"gradient"``, which needs no optimizer). Optimizers whose update cannot be replayed
    (``TrustRegion`` included: use ``"gradient"`` there) are skipped with one warning.

    Args:
        direction: ``"update"``, ``"preconditioned"`` or ``"gradient"``.
        every_n_steps, every_n_epochs: this instrument's own cadence (default: the monitor's).

    Metrics: ``gradient_curvature`` (g.Hg / g.g), ``direction_curvature`` (d.Hd / d.d),
    ``critical_lr`` (2 g.d / d.Hd: the step size at which the quadratic model predicts no
    decrease; ``inf`` without positive curvature along a descent direction), and, when there is a
    learning rate, ``predicted_loss_change`` (-lr g.d + lr^2/2 d.Hd), ``actual_loss_change`` (from
    the extra probe loss) and ``model_fidelity`` (their ratio, the trust-region rho: near 1 the
    quadratic model describes the step).
    """

    name = "step_curvature"
    # A gradient, one or two HVPs and two losses: about 40 % of a top-only lambda_max. A tenth of the
    # eigenvalues' share gives it about a quarter of their points and leaves lambda_max 91 % of the budget.
    budget_weight = 0.1

    def __init__(
        self, direction: str = "update", every_n_steps: int | None = None, every_n_epochs: int | None = None
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        self.direction = _validate.choice("direction", direction, ("update", "preconditioned", "gradient"))
        self._skipper = _Skipper("StepCurvature")

    def expected_hvps(self) -> float:
        """A gradient (about 1/3 HVP), one or two HVPs and two probe losses: about 3."""
        return 3.0

    def run(self, ctx: StepContext) -> InstrumentOutput:
        objective = ctx.objective
        optimizers = _unwrap(ctx.optimizers)
        has_lr = bool(optimizers) and all("lr" in g for opt in optimizers for g in opt.param_groups)
        if self.direction != "gradient":
            if not optimizers:
                return self._skipper.skip(
                    f"direction={self.direction!r} needs the optimizer and the step context has none "
                    "(pass optimizers=[...], or use direction='gradient')"
                )
            if not has_lr or any(isinstance(opt, TrustRegion) for opt in optimizers):
                names = ", ".join(sorted({type(opt).__name__ for opt in optimizers}))
                return self._skipper.skip(
                    f"the next step of {names} cannot be replayed (supported: {SUPPORTED}); "
                    "use StepCurvature(direction='gradient')"
                )
        optimizer = optimizers if has_lr else None
        if optimizer is not None:
            try:
                lr = reference_lr(objective, optimizer)
            except ValueError as err:  # no selected parameter is held by the optimizers
                return self._skipper.skip(str(err))
            if not lr > 0:
                return self._skipper.skip("the learning rate of the reference parameter group is 0: there is no step")
        try:
            result = step_curvature(objective, optimizer, direction=cast(Any, self.direction), gradient=ctx.gradient())
        except GeometryUnavailableError as err:
            hint = "; use StepCurvature(direction='gradient')" if err.status == "unsupported" else ""
            return self._skipper.skip(f"{err}{hint}")
        metrics = {
            "gradient_curvature": result.gradient_curvature,
            "direction_curvature": result.direction_curvature,
            "critical_lr": result.critical_lr,
        }
        if not math.isnan(result.lr):
            metrics["predicted_loss_change"] = result.predicted_change
            metrics["actual_loss_change"] = result.actual_change
            metrics["model_fidelity"] = result.model_fidelity
        return InstrumentOutput(metrics)

    def reset(self) -> None:
        self._skipper.warned.clear()


class HessianDiagonal(Instrument):
    """The Hessian's diagonal (Hutchinson) and the ``diagonal_share`` of its absolute mass (sampled columns), per block.

    :func:`lightning_hessian.diagonal.hessian_diagonal` with ``n_hvp`` Rademacher products and
    :func:`lightning_hessian.diagonal.diagonal_share` with ``n_columns`` exact columns ``H e_j``
    (stratified by parameter tensor: at least two per tensor). Blocks are one per module.

    Args:
        n_hvp: Rademacher products of the diagonal estimate (at least 2).
        n_columns: sampled columns of the share (one HVP each; capped at the number of parameters,
            where the share becomes exact; raised, with one warning, to two per parameter tensor on
            models with more than ``n_columns / 2`` tensors).
        every_n_steps, every_n_epochs: this instrument's own cadence (default: the monitor's).

    Metrics: ``diagonal_share`` (sum_j |H_jj| / sum_ij |H_ij|: 1 for a diagonal Hessian), with
    ``diagonal_share_stderr`` and ``diagonal_share_columns``. The diagonal itself is summarised per
    block in the step's record (``"hessian_diagonal"`` in the JSONL entry: per-block trace with
    standard error, mean diagonal entry, share with standard error and columns, and the totals), never as
    a parameter-sized vector.
    """

    name = "hessian_diagonal"

    def __init__(
        self,
        n_hvp: int = 30,
        n_columns: int = 64,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        self.n_hvp = _validate.positive_int("n_hvp", n_hvp, minimum=2)
        self.n_columns = _validate.positive_int("n_columns", n_columns, minimum=2)
        self._warnings = _Skipper("HessianDiagonal")

    def expected_hvps(self) -> float:
        return float(self.n_hvp + self.n_columns)  # raised to two columns per tensor on deep models

    def check(self, num_params: int) -> None:
        if num_params < 2:
            raise ValueError(f"HessianDiagonal needs at least 2 selected parameters, got {num_params}")

    def run(self, ctx: StepContext) -> InstrumentOutput:
        objective = ctx.objective
        # A Trace at this step leaves its Rademacher products here: reused at no cost, and the new
        # probes come from another seed so that no sample is counted twice.
        reused = list(ctx.shared.get("rademacher_products") or [])[: self.n_hvp]
        estimate = hessian_diagonal(
            objective, n=max(self.n_hvp, 2), seed=ctx.seed + (1 if reused else 0), products=reused
        )
        need = sum(min(2, math.prod(shape)) for _, shape in objective.param_shapes)
        n_columns = max(self.n_columns, need)
        if n_columns > self.n_columns:
            self._warnings.once(
                f"HessianDiagonal: n_columns={self.n_columns} is raised to {need}: the diagonal share samples at "
                f"least two columns of each of the {len(objective.param_shapes)} parameter tensors (one HVP each); "
                "select fewer parameters with params= to spend less"
            )
        share = diagonal_share(objective, n_columns=n_columns, seed=ctx.seed)
        blocks = parameter_blocks(objective)
        shares = {b.name: b for b in share.blocks}
        summary = []
        for block, trace in zip(blocks, estimate.blocks):
            own = shares[block.name]
            summary.append(
                {
                    "name": block.name,
                    "numel": block.num_params,
                    "trace": trace.trace,
                    "trace_stderr": trace.trace_stderr,
                    "mean_diagonal": trace.trace / block.num_params,
                    "share": own.value,
                    "share_stderr": own.stderr,
                    "share_columns": own.n_columns,
                }
            )
        record = {
            "hessian_diagonal": {
                "trace": estimate.trace,
                "trace_stderr": estimate.trace_stderr,
                "n_samples": estimate.n_samples,
                "reused_trace_products": len(reused),
                "share": share.value,
                "share_stderr": share.stderr,
                "diagonal_mass": share.diagonal_mass,
                "total_mass": share.total_mass,
                "n_columns": share.n_columns,
                "blocks": summary,
            }
        }
        metrics = {
            "diagonal_share": share.value,
            "diagonal_share_stderr": share.stderr,
            "diagonal_share_columns": float(share.n_columns),
        }
        return InstrumentOutput(metrics, (Artifact("record", "hessian_diagonal", record),))

    def reset(self) -> None:
        self._warnings.warned.clear()
