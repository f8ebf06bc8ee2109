"""What is measured: one class per measurement, run on one shared context per step.

``HessianMonitor(instruments=[...])`` runs them during training; :func:`run_instruments` runs
them once on any :class:`~lightning_hessian.Objective` (a notebook, a saved checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_hessian.instruments.base import Artifact, Instrument, InstrumentOutput, StepContext
from lightning_hessian.instruments.curvature import Eigenvalues, SlopeFitTrace, Trace
from lightning_hessian.instruments.landscape import Landscape
from lightning_hessian.instruments.optimizer import HessianDiagonal, OptimizerCurvature, StepCurvature
from lightning_hessian.instruments.spectra import BlockSpectrum, SpectralDensity
from lightning_hessian.objective import Objective


@dataclass(frozen=True)
class StepResult:
    """What the instruments of one step returned, with the step's cost."""

    metrics: dict[str, float]
    outputs: dict[str, InstrumentOutput] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    eigen: Any = None


def ordered(instruments: Sequence[Instrument]) -> list[Instrument]:
    """Eigenvalues first (others reuse its eigenpairs), then Trace (a HessianDiagonal reuses its
    Rademacher products), then the rest in the given order."""
    return sorted(
        instruments, key=lambda ins: 0 if isinstance(ins, Eigenvalues) else 1 if isinstance(ins, Trace) else 2
    )


def share_products(ctx: StepContext, instruments: Sequence[Instrument]) -> None:
    """Products one instrument of the step can reuse from another: a HessianDiagonal the Trace's
    Rademacher products, a Trace the Krylov space of the Eigenvalues' Lanczos run (kept only then)."""
    names = {type(ins).__name__ for ins in instruments}
    if {"Trace", "HessianDiagonal"} <= names:
        ctx.shared["rademacher_products"] = []
    if any(isinstance(ins, Trace) and ins.reuse_lanczos for ins in instruments) and any(
        isinstance(ins, Eigenvalues) for ins in instruments
    ):
        ctx.shared["keep_krylov"] = True


def eigen_provider(instruments: Sequence[Instrument]) -> Any:
    """The function that computes a step's shared eigenpairs: the monitor's Eigenvalues instrument, if any."""
    found = [ins for ins in instruments if isinstance(ins, Eigenvalues)]
    return found[0].compute_eigen if found else None


def run_instruments(
    objective: Objective,
    instruments: Sequence[Instrument] | None = None,
    *,
    step: int = 0,
    epoch: int = 0,
    optimizers: Sequence[Any] = (),
    val_objective: Objective | None = None,
    seed: int = 0,
    context: StepContext | None = None,
) -> StepResult:
    """Run ``instruments`` (default: :class:`Eigenvalues` and :class:`Trace`) once on one shared context.

    Metrics of all instruments are merged into one dict (``hvp_count`` and ``seconds`` added: the
    step's cost). Errors propagate; the monitor is what isolates them from training.
    """
    chosen = ordered(list(instruments) if instruments is not None else [Eigenvalues(), Trace()])
    ctx = context or StepContext(
        objective, step=step, epoch=epoch, optimizers=optimizers, val_objective=val_objective, seed=seed
    )
    if ctx.eigen_provider is None:
        ctx.eigen_provider = eigen_provider(chosen)
    share_products(ctx, chosen)
    metrics: dict[str, float] = {}
    outputs: dict[str, InstrumentOutput] = {}
    seconds: dict[str, float] = {}
    hvp_before = objective.n_hvp + objective.n_hvp_check
    loss_before = objective.n_loss
    with objective.session():
        for instrument in chosen:
            started = time.perf_counter()
            out = instrument.run(ctx)
            seconds[instrument.name] = time.perf_counter() - started
            outputs[instrument.name] = out
            if instrument.namespace == "hessian":  # the landscape's own scalars stay in its output
                metrics.update(out.metrics)
    metrics["hvp_count"] = float(objective.n_hvp + objective.n_hvp_check - hvp_before)
    metrics["loss_evaluations"] = float(objective.n_loss - loss_before)
    metrics["seconds"] = float(sum(seconds.values()))
    return StepResult(metrics=metrics, outputs=outputs, seconds=seconds, eigen=ctx.shared.get("eigen"))


__all__ = [
    "Artifact",
    "BlockSpectrum",
    "Eigenvalues",
    "HessianDiagonal",
    "Instrument",
    "InstrumentOutput",
    "Landscape",
    "OptimizerCurvature",
    "SlopeFitTrace",
    "SpectralDensity",
    "StepContext",
    "StepCurvature",
    "StepResult",
    "Trace",
    "ordered",
    "run_instruments",
    "share_products",
]
